//! Saves run below the priority of everything else in the process.
//!
//! A save is seconds of CPU that nobody waits for; the gateway's answer, the event confirms
//! and, beside `luna up`, the generation loop that just handed its pixels over are waited for.
//! Each save runs on a thread of its own whose nice value is `--save-nice` above the process's
//! (threads it starts, such as the AVIF and EXR encoders' helpers, inherit it), so when every
//! core is busy the scheduler gives the waiting work the cores first, and the saves take what
//! is left, which on an idle machine is everything.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

/// Lowers the calling thread's priority by `nice` levels (capped at 19, the lowest). Linux
/// applies a nice value per thread; elsewhere it is the whole process's, which is what the
/// isolated save's child process wants anyway. Failures are logged and ignored: a save at the
/// normal priority is still a correct save.
pub fn lower_this_thread(nice: u8) {
    if nice == 0 {
        return;
    }
    let result = rustix::process::getpriority_process(None).and_then(|current| {
        rustix::process::setpriority_process(None, (current + i32::from(nice)).min(19))
    });
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not lower the save thread's priority");
    }
}

/// Runs `save` on a new thread `nice` levels below this process; `Err` with the panic's
/// message when it panicked. A thread per save costs some tens of microseconds against the
/// milliseconds to seconds of a save, and needs no pool to size.
pub async fn run_lowered<T, F>(nice: u8, save: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    // Shared with the thread so that the save is still here if the thread cannot start.
    let slot = Arc::new(Mutex::new(Some(save)));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("luna-save".into()).spawn({
        let slot = slot.clone();
        move || {
            lower_this_thread(nice);
            if let Some(save) = take(&slot) {
                let _ = tx.send(catch_unwind(AssertUnwindSafe(save)).map_err(panic_message));
            }
        }
    });
    if let Err(e) = spawned {
        // No thread to be had (a thread limit): save on the runtime's blocking pool instead.
        tracing::warn!(error = %e, "could not start a save thread; saving at normal priority");
        let save = take(&slot).ok_or_else(|| "the save thread could not start".to_owned())?;
        return tokio::task::spawn_blocking(save)
            .await
            .map_err(|join| format!("the save panicked: {join}"));
    }
    rx.await
        .map_err(|_| "the save thread ended without an answer".to_owned())?
}

fn take<F>(slot: &Mutex<Option<F>>) -> Option<F> {
    slot.lock().ok().and_then(|mut save| save.take())
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let detail = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    format!("the save panicked: {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of_this_thread() -> i32 {
        rustix::process::getpriority_process(None).expect("getpriority")
    }

    #[tokio::test]
    async fn saves_run_below_the_caller_and_the_caller_keeps_its_priority() {
        let before = nice_of_this_thread();
        let inside = run_lowered(5, nice_of_this_thread).await.expect("ran");
        assert_eq!(inside, (before + 5).min(19));
        assert_eq!(nice_of_this_thread(), before);
        let unchanged = run_lowered(0, nice_of_this_thread).await.expect("ran");
        assert_eq!(unchanged, before);
    }

    #[tokio::test]
    async fn a_panicking_save_is_an_error_with_its_message() {
        let err = run_lowered(3, || -> u32 { panic!("broken pixels") })
            .await
            .expect_err("panicked");
        assert!(err.contains("broken pixels"), "{err}");
    }
}
