//! Preemption against poison: savers killed while holding a healthy task never get it parked,
//! while a task whose own save dies is parked at once with the reason.

use std::time::{Duration, Instant};

use luna_e2e::{Env, count, files, saver_binary, spawn_saver};
use luna_job::{EventKind, ImageFormat, ImageInput, JobId, SaveRequest, SaveTask};

const LONG: Duration = Duration::from_secs(120);

/// One task that takes a saver a second or more: 3072x3072 noise at PNG level 9.
fn slow_task() -> SaveTask {
    let (w, h) = (3072u32, 3072u32);
    let mut x = 0x2545_f491_u32;
    let pixels: Vec<u8> = (0..w * h * 3)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let req = SaveRequest {
        filename: "slow".into(),
        png_compression: 9,
        images: vec![ImageInput {
            pixels: pixels.into(),
            width: w,
            height: h,
            format: ImageFormat::Png,
            ..Default::default()
        }],
        ..Default::default()
    };
    req.into_tasks(&JobId::new(), chrono::Local::now().fixed_offset())
        .remove(0)
}

/// Waits until a saver has taken the task off the queue.
async fn taken(env: &Env) {
    let deadline = Instant::now() + LONG;
    while env.broker.task_queue_depth().await.expect("depth") > 0 {
        assert!(Instant::now() < deadline, "no saver took the task");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pid of `parent`'s child process running an isolated save, once it exists.
async fn isolated_child(parent: u32) -> u32 {
    let deadline = Instant::now() + LONG;
    loop {
        for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Field 4 of stat, after the parenthesised command name, is the parent pid.
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let isolated = cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == luna_saver::isolate::ISOLATED_ARG.as_bytes());
            if isolated && ppid == Some(parent) {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "no isolated save started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_healthy_task_survives_savers_killed_under_it_again_and_again() {
    let bin = tokio::task::spawn_blocking(saver_binary)
        .await
        .expect("build");
    let env = Env::new().await;
    let log = env.record_events().await;
    let task = slow_task();
    env.broker
        .publish_task(task.clone(), &Default::default())
        .await
        .expect("publish");
    // Twelve preemptions, each while the task is being saved: more than --max-attempts (5)
    // and than the task queue's x-delivery-limit (10).
    for kill in 0..12u64 {
        let mut saver = spawn_saver(&bin, &env);
        if kill == 0 {
            taken(&env).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        } else {
            // Come back once, the task is saved in a child process: kill the saver around it.
            isolated_child(saver.id()).await;
            tokio::time::sleep(Duration::from_millis(20 * kill)).await;
        }
        saver.kill().expect("SIGKILL");
        saver.wait().expect("reaped");
        let saved = count(&log.snapshot(), "image_saved", None);
        assert_eq!(
            saved, 0,
            "the kill must land before the save ends (kill {kill})"
        );
        // The broker takes the task back when it sees the connection gone.
        let deadline = Instant::now() + LONG;
        while env.broker.task_queue_depth().await.expect("depth") == 0 {
            assert!(Instant::now() < deadline, "the task never came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut saver = spawn_saver(&bin, &env);
    let events = log
        .wait_until(LONG, |e| {
            count(e, "image_saved", None) + count(e, "image_failed", None) > 0
        })
        .await;
    saver.kill().expect("stop");
    saver.wait().expect("reaped");
    assert_eq!(count(&events, "image_saved", None), 1, "{events:?}");
    assert_eq!(count(&events, "image_failed", None), 0, "{events:?}");
    assert_eq!(env.broker.parked_count().await.expect("parked"), 0);
    assert_eq!(files(env.output.path()), ["slow.png"]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_that_kills_its_isolated_save_is_parked_with_the_reason() {
    let bin = tokio::task::spawn_blocking(saver_binary)
        .await
        .expect("build");
    let env = Env::new().await;
    let log = env.record_events().await;
    let task = slow_task();
    env.broker
        .publish_task(task.clone(), &Default::default())
        .await
        .expect("publish");
    // The first saver dies with it (in process, nothing tells whose fault that was).
    let mut first = spawn_saver(&bin, &env);
    taken(&env).await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");

    // The redelivery is saved in a child process; that child dying is the task's doing.
    let mut second = spawn_saver(&bin, &env);
    let child = isolated_child(second.id()).await;
    let killed = std::process::Command::new("kill")
        .args(["-9", &child.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let events = log
        .wait_until(LONG, |e| {
            e.iter()
                .any(|e| matches!(e.kind, EventKind::ImageFailed { is_final: true, .. }))
        })
        .await;
    let reason = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::ImageFailed { error, .. } => Some(error.clone()),
            _ => None,
        })
        .expect("failure event");
    assert!(
        reason.contains("crashed an isolated saver process (killed by signal 9)"),
        "{reason}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.broker.parked_count().await.expect("parked") < 1 {
        assert!(Instant::now() < deadline, "the task was not parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The saver itself lives on.
    assert!(
        second.try_wait().expect("status").is_none(),
        "the saver died too"
    );
    second.kill().expect("stop");
    second.wait().expect("reaped");
    assert!(files(env.output.path()).is_empty());
    env.cleanup().await;
}
