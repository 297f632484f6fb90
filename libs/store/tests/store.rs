//! Placement rules, no-replace publishing, collision suffixes and idempotency.

use std::fs;
use std::path::Path;

use chrono::DateTime;
use luna_imaging::Encoded;
use luna_job::task::TaskKey;
use luna_job::{ImageFormat, ImageInput, JobId, QualityGate, SaveRequest, SaveTask};
use luna_store::placement::{Placement, PlacementError};
use luna_store::{LocalStore, Outcome, Store, StoreError, save_task};

fn task(req: SaveRequest) -> SaveTask {
    let at = DateTime::parse_from_rfc3339("2025-12-09T14:30:05+01:00").expect("time");
    req.into_tasks(&JobId::new(), at).remove(0)
}

fn image(affix: &str, format: ImageFormat, subdir: bool) -> ImageInput {
    ImageInput {
        pixels: vec![0; 12].into(),
        width: 2,
        height: 2,
        affix: affix.into(),
        format,
        subdir,
        ..Default::default()
    }
}

fn path_of(req: SaveRequest) -> Result<String, PlacementError> {
    Placement::for_task(&task(req)).map(|p| p.relative_path(0))
}

#[test]
fn placement_follows_the_contract() {
    let base = || SaveRequest {
        save_path: "%model_name%/%time:YYYY-mm-dd%".into(),
        filename: "%time:HH.MM.SS%_%index%".into(),
        model_name: "sdxl/juggernaut.safetensors".into(),
        index: 3,
        ..Default::default()
    };
    let with = |img: ImageInput| SaveRequest {
        images: vec![img],
        ..base()
    };
    assert_eq!(
        path_of(with(image("", ImageFormat::Png, true))).expect("ok"),
        "juggernaut/2025-12-09/14.30.05_3.png"
    );
    assert_eq!(
        path_of(with(image("FINAL", ImageFormat::Webp, true))).expect("ok"),
        "juggernaut/2025-12-09/FINAL/14.30.05_3_FINAL.webp"
    );
    assert_eq!(
        path_of(with(image("RAW", ImageFormat::Jpeg, false))).expect("ok"),
        "juggernaut/2025-12-09/14.30.05_3_RAW.jpg"
    );
    let mut batch = image("UPSCALED", ImageFormat::Png, true);
    batch.batch_index = Some(2);
    batch.batch_size = Some(4);
    assert_eq!(
        path_of(with(batch.clone())).expect("ok"),
        "juggernaut/2025-12-09/UPSCALED/14.30.05_3_UPSCALED_2.png"
    );
    batch.batch_size = Some(1);
    assert_eq!(
        path_of(with(batch)).expect("ok"),
        "juggernaut/2025-12-09/UPSCALED/14.30.05_3_UPSCALED.png"
    );
}

#[test]
fn defaults_and_filename_folders() {
    let req = SaveRequest {
        images: vec![image("", ImageFormat::Png, true)],
        ..Default::default()
    };
    assert_eq!(
        path_of(req).expect("ok"),
        "2025_12_09.14.30.05_UnknownModel.png"
    );
    let req = SaveRequest {
        filename: "%model_dir%/%model_name%".into(),
        model_name: "SDXL\\dream.ckpt".into(),
        images: vec![image("A", ImageFormat::Png, true)],
        ..Default::default()
    };
    assert_eq!(
        path_of(req).expect("ok"),
        "A/SDXL/dream_A.png",
        "filename folders go below the affix folder"
    );
}

#[test]
fn discarded_goes_beside_the_file() {
    let t = task(SaveRequest {
        save_path: "out".into(),
        images: vec![image("X", ImageFormat::Png, true)],
        ..Default::default()
    });
    let p = Placement::for_task(&t).expect("ok").discarded();
    assert!(
        p.relative_path(0).starts_with("out/X/_discarded/"),
        "{}",
        p.relative_path(0)
    );
}

#[test]
fn escaping_paths_and_bad_names_are_rejected() {
    let with = |save_path: &str, filename: &str, affix: &str| SaveRequest {
        save_path: save_path.into(),
        filename: filename.into(),
        images: vec![image(affix, ImageFormat::Png, true)],
        ..Default::default()
    };
    assert!(matches!(
        path_of(with("/etc", "x", "")),
        Err(PlacementError::SavePath(_))
    ));
    assert!(matches!(
        path_of(with("a/../..", "x", "")),
        Err(PlacementError::SavePath(_))
    ));
    assert!(matches!(
        path_of(with("", "../x", "")),
        Err(PlacementError::Filename(_))
    ));
    assert!(matches!(
        path_of(with("", "./", "")),
        Err(PlacementError::EmptyName)
    ));
    assert!(matches!(
        path_of(with("", "x", "..")),
        Err(PlacementError::Affix(_))
    ));
    assert!(matches!(
        path_of(with("", &"x".repeat(300), "")),
        Err(PlacementError::TooLong(_))
    ));
    assert_eq!(
        path_of(with("", "x", "a/b")).expect("ok"),
        "a_b/x_a_b.png",
        "an affix is one folder"
    );
    let problem = PlacementError::Affix("..".into()).to_problem("images[1]");
    assert_eq!(problem.field, "images[1].affix");
}

fn encoded(bytes: &[u8]) -> Encoded {
    Encoded {
        bytes: bytes.to_vec(),
        sidecar: None,
    }
}

fn placement(stem: &str) -> Placement {
    Placement {
        dirs: vec!["a".into(), "b".into()],
        stem: stem.into(),
        ext: "png",
    }
}

fn key(job: &str, index: u32) -> TaskKey {
    TaskKey {
        job_id: JobId::parse(job).expect("id"),
        image_index: index,
    }
}

/// Every file (not folder) under `dir`, recursively, as relative paths; symlinks are not followed.
fn listing(dir: &Path) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|p| !fs::symlink_metadata(dir.join(p)).is_ok_and(|m| m.is_dir()))
        .collect()
}

fn both_identities(root: &Path) -> [LocalStore; 2] {
    [
        LocalStore::new(root.join("xattr")),
        LocalStore::new(root.join("content")).use_xattrs(false),
    ]
}

#[test]
fn collisions_get_suffixes_and_nothing_is_replaced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for store in both_identities(tmp.path()) {
        let dir = store.root().join("a/b");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("img.png"), b"someone else's file").expect("write");
        let first = store
            .put(&key("job-a", 0), &placement("img"), &encoded(b"one"))
            .expect("put");
        let second = store
            .put(&key("job-b", 0), &placement("img"), &encoded(b"two"))
            .expect("put");
        assert_eq!(
            (first.path.as_str(), second.path.as_str()),
            ("a/b/img_1.png", "a/b/img_2.png")
        );
        assert_eq!(
            fs::read(dir.join("img.png")).expect("read"),
            b"someone else's file"
        );
        assert_eq!(fs::read(dir.join("img_2.png")).expect("read"), b"two");
        assert_eq!(
            listing(&dir),
            ["img.png", "img_1.png", "img_2.png"],
            "no temp files left"
        );
    }
}

#[test]
fn the_same_task_twice_writes_one_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for store in both_identities(tmp.path()) {
        let first = store
            .put(&key("job-a", 1), &placement("img"), &encoded(b"pixels"))
            .expect("put");
        let mtime = fs::metadata(store.root().join(&first.path))
            .expect("stat")
            .modified()
            .expect("mtime");
        // Another job takes the next name meanwhile; the redelivery must still find its own file.
        store
            .put(&key("job-b", 1), &placement("img"), &encoded(b"other"))
            .expect("put");
        let again = store
            .put(&key("job-a", 1), &placement("img"), &encoded(b"pixels"))
            .expect("put");
        assert_eq!(again.path, first.path);
        assert!(again.already_stored && !first.already_stored);
        assert_eq!(
            fs::metadata(store.root().join(&again.path))
                .expect("stat")
                .modified()
                .expect("mtime"),
            mtime
        );
        assert_eq!(listing(&store.root().join("a/b")), ["img.png", "img_1.png"]);
    }
}

#[test]
fn xattr_identity_tells_equal_bytes_of_different_tasks_apart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::new(tmp.path());
    let a = store
        .put(&key("job-a", 0), &placement("img"), &encoded(b"same"))
        .expect("put");
    let b = store
        .put(&key("job-b", 0), &placement("img"), &encoded(b"same"))
        .expect("put");
    assert_ne!(a.path, b.path);
}

#[test]
fn a_stale_partial_temp_file_is_never_published() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::new(tmp.path());
    let dir = tmp.path().join("a/b");
    fs::create_dir_all(&dir).expect("mkdir");
    // What a saver killed mid-write leaves behind.
    fs::write(
        dir.join(".luna-job-a-0.tmp"),
        b"partial garbage that is longer",
    )
    .expect("write");
    let stored = store
        .put(&key("job-a", 0), &placement("img"), &encoded(b"full"))
        .expect("put");
    assert_eq!(
        fs::read(tmp.path().join(&stored.path)).expect("read"),
        b"full"
    );
    assert_eq!(listing(&dir), ["img.png"]);
}

#[test]
fn a_task_being_written_elsewhere_is_busy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::new(tmp.path());
    let dir = tmp.path().join("a/b");
    fs::create_dir_all(&dir).expect("mkdir");
    let other = fs::File::create(dir.join(".luna-job-a-0.lock")).expect("create");
    rustix::fs::flock(&other, rustix::fs::FlockOperation::LockExclusive).expect("lock");
    let err = store
        .put(&key("job-a", 0), &placement("img"), &encoded(b"x"))
        .expect_err("busy");
    assert!(matches!(err, StoreError::Busy) && err.is_transient());
    drop(other);
    store
        .put(&key("job-a", 0), &placement("img"), &encoded(b"x"))
        .expect("free again");
}

#[test]
fn concurrent_writers_of_one_task_make_one_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::new(tmp.path());
    let paths: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    loop {
                        match store.put(
                            &key("job-a", 0),
                            &placement("img"),
                            &encoded(&[7; 100_000]),
                        ) {
                            Ok(stored) => return stored.path,
                            Err(StoreError::Busy) => std::thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert!(paths.iter().all(|p| p == "a/b/img.png"), "{paths:?}");
    assert_eq!(listing(&tmp.path().join("a/b")), ["img.png"]);
}

#[test]
fn sidecars_are_published_and_completed_on_redelivery() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::new(tmp.path());
    // A first attempt that died between publishing the image and its sidecar.
    store
        .put(&key("job-a", 0), &placement("img"), &encoded(b"jpeg"))
        .expect("put");
    let full = Encoded {
        bytes: b"jpeg".to_vec(),
        sidecar: Some(b"{\"workflow\": {}}".to_vec()),
    };
    let stored = store
        .put(&key("job-a", 0), &placement("img"), &full)
        .expect("put");
    assert!(stored.already_stored);
    assert_eq!(
        fs::read(tmp.path().join("a/b/img.png.json")).expect("sidecar"),
        b"{\"workflow\": {}}"
    );
    assert_eq!(
        listing(&tmp.path().join("a/b")),
        ["img.png", "img.png.json"]
    );
}

fn gated(keep_rejected: bool, pixels: Vec<u8>) -> SaveTask {
    task(SaveRequest {
        save_path: "g".into(),
        filename: "f".into(),
        quality_gate: QualityGate::Variance,
        min_quality_threshold: 0.5,
        keep_rejected,
        images: vec![ImageInput {
            pixels: pixels.into(),
            width: 4,
            height: 4,
            channels: 1,
            ..Default::default()
        }],
        ..Default::default()
    })
}

#[test]
fn save_task_applies_the_gate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::new(tmp.path());
    let flat = vec![100u8; 16];
    let checker: Vec<u8> = (0..16)
        .map(|i| if (i + i / 4) % 2 == 0 { 0 } else { 255 })
        .collect();

    match save_task(&gated(true, flat.clone()), &store, None).expect("saved") {
        Outcome::Rejected {
            score,
            threshold,
            stored: Some(s),
            ..
        } => {
            assert_eq!((score, threshold), (0.0, 0.5));
            assert_eq!(s.path, "g/_discarded/f.png");
        }
        other => panic!("{other:?}"),
    }
    match save_task(&gated(false, flat), &store, None).expect("saved") {
        Outcome::Rejected { stored: None, .. } => {}
        other => panic!("{other:?}"),
    }
    match save_task(&gated(false, checker), &store, None).expect("saved") {
        Outcome::Saved {
            stored,
            quality_score,
        } => {
            assert_eq!(quality_score, Some(1.0));
            assert_eq!(stored.path, "g/f.png");
            image::open(tmp.path().join(&stored.path)).expect("a real PNG");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(listing(tmp.path()), ["g/_discarded/f.png", "g/f.png"]);
}

#[test]
fn bad_tasks_are_permanent_failures() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::new(tmp.path());
    let mut bad = gated(true, vec![0; 16]);
    bad.options.png_compression = 42;
    let err = save_task(&bad, &store, None).expect_err("invalid");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("png_compression is 42"), "{err}");
    let mut escaping = gated(true, vec![0; 16]);
    escaping.options.save_path = "../../x".into();
    assert!(
        !save_task(&escaping, &store, None)
            .expect_err("escapes")
            .is_transient()
    );
    assert!(listing(tmp.path()).is_empty());
}

/// Every entry under `dir` (recursively), symlinks included and never followed.
fn entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            let meta = fs::symlink_metadata(&p).expect("lstat");
            if meta.is_dir() {
                stack.push(p.clone());
            }
            out.push(
                p.strip_prefix(dir)
                    .expect("inside")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    out.sort();
    out
}

#[test]
fn a_symlinked_folder_inside_the_root_is_never_followed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
    fs::create_dir_all(root.join("a")).expect("mkdir");
    fs::create_dir_all(&outside).expect("mkdir");
    std::os::unix::fs::symlink(&outside, root.join("a/b")).expect("symlink");
    for store in [
        LocalStore::new(&root),
        LocalStore::new(&root).use_xattrs(false),
    ] {
        let err = store
            .put(&key("job-a", 0), &placement("img"), &encoded(b"png"))
            .expect_err("a symlinked folder is refused");
        assert!(
            matches!(err, StoreError::Unsafe { .. }) && !err.is_transient(),
            "{err:?}"
        );
    }
    assert!(entries(&outside).is_empty(), "{:?}", entries(&outside));
}

#[test]
fn symlinks_planted_at_work_file_names_are_never_followed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
    let dir = root.join("a/b");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::create_dir_all(&outside).expect("mkdir");
    let victim = outside.join("victim");
    fs::write(&victim, b"precious").expect("write");
    // Every name the store uses for its own work files, old and new.
    for name in [
        ".luna-job-a-0.tmp",
        ".luna-job-a-0.lock",
        ".luna-job-a-0.json.tmp",
    ] {
        std::os::unix::fs::symlink(&victim, dir.join(name)).expect("symlink");
    }
    let store = LocalStore::new(&root);
    let result = store.put(&key("job-a", 0), &placement("img"), &encoded(b"png bytes"));
    assert_eq!(fs::read(&victim).expect("read"), b"precious");
    if let Ok(stored) = result {
        let meta = fs::symlink_metadata(root.join(&stored.path)).expect("lstat");
        assert!(
            meta.file_type().is_file(),
            "published a {:?}",
            meta.file_type()
        );
        assert_eq!(
            fs::read(root.join(&stored.path)).expect("read"),
            b"png bytes"
        );
    }
    assert_eq!(entries(&outside), ["victim"]);
}

#[test]
fn a_symlink_at_a_final_name_is_a_taken_name_never_a_target() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
    let dir = root.join("a/b");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::create_dir_all(&outside).expect("mkdir");
    std::os::unix::fs::symlink(outside.join("new"), dir.join("img.png")).expect("symlink");
    let stored = LocalStore::new(&root)
        .put(&key("job-a", 0), &placement("img"), &encoded(b"png"))
        .expect("put");
    assert_eq!(stored.path, "a/b/img_1.png");
    assert!(entries(&outside).is_empty());
}

#[test]
fn names_the_file_system_cannot_hold_are_rejected_at_placement() {
    let long = "x".repeat(256);
    let req = |save_path: &str, filename: &str| SaveRequest {
        save_path: save_path.into(),
        filename: filename.into(),
        images: vec![image("", ImageFormat::Png, true)],
        ..Default::default()
    };
    assert!(matches!(
        path_of(req(&long, "ok")),
        Err(PlacementError::ComponentTooLong(_))
    ));
    assert!(matches!(
        path_of(req(&format!("a/{long}/b"), "ok")),
        Err(PlacementError::ComponentTooLong(_))
    ));
    // A `%time:` format repeated into a long name, as the reproduction did.
    let stamp = "%time:YYYY-mm-dd_HH.MM.SS%".repeat(20);
    assert!(path_of(req(&stamp, "ok")).is_err());
    let deep = vec!["d".repeat(200); 21].join("/");
    assert!(matches!(
        path_of(req(&deep, "ok")),
        Err(PlacementError::PathTooLong(_))
    ));
    assert!(path_of(req(&"d".repeat(255), "ok")).is_ok());
}

#[test]
fn a_name_too_long_for_the_disk_is_a_permanent_failure() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let placement = Placement {
        dirs: vec!["y".repeat(300)],
        stem: "img".into(),
        ext: "png",
    };
    let err = LocalStore::new(tmp.path())
        .put(&key("job-a", 0), &placement, &encoded(b"png"))
        .expect_err("too long");
    assert!(!err.is_transient(), "{err:?}");
}

#[test]
fn an_idempotent_resubmission_finds_the_files_of_the_first_attempt() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::new(tmp.path());
    let job = JobId::for_idempotency_key("client-submission-1").expect("key");
    let attempt = |at: &str| {
        let req = SaveRequest {
            save_path: "%time:YYYY-mm-dd%".into(),
            filename: "%time:HH.MM.SS%".into(),
            images: vec![ImageInput {
                pixels: vec![9; 12].into(),
                width: 2,
                height: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        let at = DateTime::parse_from_rfc3339(at).expect("time");
        let mut task = req.into_tasks(&job, at).remove(0);
        task.idempotent = true;
        task
    };
    let first = save_task(&attempt("2025-12-09T23:59:58+01:00"), &store, None).expect("first");
    // The retry reaches a gateway two seconds later, after midnight.
    let retry = save_task(&attempt("2025-12-10T00:00:00+01:00"), &store, None).expect("retry");
    let path = |o: &Outcome| match o {
        Outcome::Saved { stored, .. } => (stored.path.clone(), stored.already_stored),
        other => panic!("{other:?}"),
    };
    assert_eq!(path(&first), ("2025-12-09/23.59.58.png".to_owned(), false));
    assert_eq!(path(&retry), ("2025-12-09/23.59.58.png".to_owned(), true));
    let images: Vec<_> = listing(tmp.path())
        .into_iter()
        .filter(|p| !p.starts_with(".luna/"))
        .collect();
    assert_eq!(images, ["2025-12-09/23.59.58.png"]);
    // A job without a key keeps its own time and leaves no record.
    let mut plain = attempt("2025-12-10T00:00:01+01:00");
    plain.idempotent = false;
    plain.job_id = JobId::new();
    assert_eq!(
        path(&save_task(&plain, &store, None).expect("plain")).0,
        "2025-12-10/00.00.01.png"
    );
    assert_eq!(listing(&tmp.path().join(".luna/jobs")), [job.to_string()]);
    assert_eq!(
        store
            .sweep_ledger(std::time::Duration::ZERO)
            .expect("sweep"),
        1
    );
    assert!(listing(&tmp.path().join(".luna/jobs")).is_empty());
}
