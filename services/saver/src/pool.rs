//! The elastic pool of save slots.
//!
//! Each slot is one consumer with prefetch 1 on its own channel: RabbitMQ applies prefetch
//! when a consumer starts, so changing concurrency means adding or removing consumers, and a
//! busy process never hoards tasks that an idle saver elsewhere could take. Every
//! `--scale-interval` the pool looks at the queue: when tasks are waiting and every slot is busy
//! it adds a slot (up to `--max-workers`); a slot beyond `--min-workers` that has had no work
//! for `--idle-timeout` is stopped. Every change is logged with its reason.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use luna_store::LEDGER_RETENTION;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Context;
use crate::metrics::Live;
use crate::worker;

/// What the scaler knows about a slot.
#[derive(Debug)]
struct Slot {
    id: usize,
    stop: CancellationToken,
    busy: Arc<AtomicBool>,
    last_work: Arc<Mutex<Instant>>,
}

/// Runs slots until `stop` is cancelled, then waits for in-flight saves up to the grace period.
pub async fn run(ctx: Context, stop: CancellationToken) {
    let tracker = TaskTracker::new();
    let mut slots: Vec<Slot> = Vec::new();
    let mut next_id = 0;
    for _ in 0..ctx.config.min_workers {
        slots.push(start_slot(&ctx, &tracker, &stop, &mut next_id));
    }
    set_active(&ctx, slots.len());
    tracing::info!(
        slots = slots.len(),
        "save pool started with the minimum number of slots"
    );

    let sweep_every = Duration::from_secs(3600).min(ctx.config.blob_ttl);
    let mut last_sweep = Instant::now();
    let mut tick = tokio::time::interval(ctx.config.scale_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        scale(&ctx, &tracker, &stop, &mut slots, &mut next_id).await;
        if last_sweep.elapsed() >= sweep_every {
            last_sweep = Instant::now();
            sweep_blobs(&ctx);
        }
    }

    tracker.close();
    let grace = ctx.config.shutdown_grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            "shutdown grace over; unfinished tasks return to the queue"
        );
    } else {
        tracing::info!("all in-flight saves finished");
    }
}

async fn scale(
    ctx: &Context,
    tracker: &TaskTracker,
    stop: &CancellationToken,
    slots: &mut Vec<Slot>,
    next_id: &mut usize,
) {
    slots.retain(|s| !s.stop.is_cancelled());
    let busy = slots
        .iter()
        .filter(|s| s.busy.load(Ordering::Relaxed))
        .count();
    Live::set(&ctx.metrics.live.slots_busy, busy as u64);
    let depth = match ctx.broker.task_queue_depth().await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "queue depth unavailable");
            return;
        }
    };
    Live::set(&ctx.metrics.live.queue_depth, u64::from(depth));
    match ctx.broker.parked_count().await {
        Ok(parked) => Live::set(&ctx.metrics.live.parked, u64::from(parked)),
        Err(e) => tracing::debug!(error = %e, "parked count unavailable"),
    }

    if depth > 0 && busy == slots.len() && slots.len() < ctx.config.max_workers {
        let slot = start_slot(ctx, tracker, stop, next_id);
        tracing::info!(
            slot = slot.id,
            slots = slots.len() + 1,
            max = ctx.config.max_workers,
            waiting = depth,
            "adding a save slot: {depth} tasks waiting and all {} slots busy",
            slots.len()
        );
        slots.push(slot);
        set_active(ctx, slots.len());
        return;
    }
    if slots.len() > ctx.config.min_workers {
        let idle_timeout = ctx.config.idle_timeout;
        for i in (0..slots.len()).rev() {
            let slot = &slots[i];
            let idle_for = slot.last_work.lock().await.elapsed();
            if !slot.busy.load(Ordering::Relaxed) && idle_for >= idle_timeout {
                slot.stop.cancel();
                tracing::info!(
                    slot = slot.id,
                    slots = slots.len() - 1,
                    min = ctx.config.min_workers,
                    "removing a save slot: no work for {}",
                    humantime::format_duration(idle_timeout)
                );
                slots.remove(i);
                set_active(ctx, slots.len());
                break;
            }
        }
    }
}

fn set_active(ctx: &Context, n: usize) {
    Live::set(&ctx.metrics.live.slots_active, n as u64);
}

fn start_slot(
    ctx: &Context,
    tracker: &TaskTracker,
    stop: &CancellationToken,
    next_id: &mut usize,
) -> Slot {
    let id = *next_id;
    *next_id += 1;
    let slot = Slot {
        id,
        stop: stop.child_token(),
        busy: Arc::new(AtomicBool::new(false)),
        last_work: Arc::new(Mutex::new(Instant::now())),
    };
    tracker.spawn(slot_loop(
        ctx.clone(),
        id,
        slot.stop.clone(),
        slot.busy.clone(),
        slot.last_work.clone(),
    ));
    slot
}

async fn slot_loop(
    ctx: Context,
    id: usize,
    stop: CancellationToken,
    busy: Arc<AtomicBool>,
    last_work: Arc<Mutex<Instant>>,
) {
    let tag = format!("{}-slot{id}", ctx.worker_id);
    let mut backoff = Duration::from_millis(200);
    while !stop.is_cancelled() {
        // Declared here, idempotently, so a saver started before any gateway still finds its
        // queue; a failure shows up as the consume error below.
        if let Err(e) = ctx.broker.declare_topology().await {
            tracing::debug!(slot = id, error = %e, "declaring the topology failed");
        }
        let mut stream = match ctx.broker.consume_tasks(&tag).await {
            Ok(s) => {
                backoff = Duration::from_millis(200);
                s
            }
            Err(e) => {
                tracing::warn!(slot = id, error = %e, ?backoff, "cannot consume tasks; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        ctx.metrics.live.consumers.fetch_add(1, Ordering::Relaxed);
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => None,
                next = stream.next() => Some(next),
            };
            match next {
                None => {
                    ctx.metrics.live.consumers.fetch_sub(1, Ordering::Relaxed);
                    stream.cancel().await;
                    return;
                }
                Some(Some(Ok(delivery))) => {
                    busy.store(true, Ordering::Relaxed);
                    worker::handle(&ctx, delivery).await;
                    *last_work.lock().await = Instant::now();
                    busy.store(false, Ordering::Relaxed);
                }
                Some(Some(Err(e))) => {
                    tracing::warn!(slot = id, error = %e, "consumer failed; reconnecting");
                    break;
                }
                Some(None) => {
                    tracing::warn!(
                        slot = id,
                        "consumer was cancelled by the broker; reconnecting"
                    );
                    break;
                }
            }
        }
        ctx.metrics.live.consumers.fetch_sub(1, Ordering::Relaxed);
        stream.cancel().await;
    }
}

fn sweep_blobs(ctx: &Context) {
    let store = ctx.store.clone();
    tokio::task::spawn_blocking(move || match store.sweep_ledger(LEDGER_RETENTION) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "removed expired submission records"),
        Err(e) => tracing::warn!(error = %e, "submission ledger sweep failed"),
    });
    if let Some(blobs) = ctx.blobs.clone() {
        let ttl = ctx.config.blob_ttl;
        tokio::task::spawn_blocking(move || match blobs.sweep(ttl) {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed stale blobs"),
            Err(e) => tracing::warn!(error = %e, "blob sweep failed"),
        });
    }
}
