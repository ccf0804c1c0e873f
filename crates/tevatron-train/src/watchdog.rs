//! A deadline for work that has none of its own. The TCP transport's every wait ends after
//! `--ddp_timeout`, but NCCL's collectives wait on the GPU without a deadline: when a rank dies
//! inside one (out of memory in its backward, say), the others' next synchronisation would wait
//! forever. While a [`Watch`] is held, the [`Watchdog`] ends the process with a message once
//! the watched work has taken longer than the timeout, as PyTorch's NCCL watchdog does.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// What the watchdog thread and the watches share.
#[derive(Default)]
struct State {
    /// The watched work and when it began; `None` between watches.
    watched: Option<(String, Instant)>,
    /// Set when the watchdog is dropped.
    stopped: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.0.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A thread that calls its expiry action when one watch lasts longer than its timeout.
pub struct Watchdog {
    shared: Shared,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the thread. `expire` receives a message naming the work and the timeout; the
    /// trainer's ends the process ([`exit_with`]), the tests' records it.
    pub fn start(timeout: Duration, expire: impl FnOnce(String) + Send + 'static) -> Result<Self> {
        let shared: Shared = Arc::default();
        let watched = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ddp-watchdog".into())
            .spawn(move || {
                let mut state = lock(&watched);
                loop {
                    if state.stopped {
                        return;
                    }
                    let wait = match &state.watched {
                        Some((what, since)) if since.elapsed() >= timeout => {
                            let message = format!(
                                "{what} has taken more than {} s (--ddp_timeout): another rank \
                                 has probably stopped inside a GPU collective, which has no \
                                 deadline of its own; ending this rank rather than waiting \
                                 forever",
                                timeout.as_secs_f64()
                            );
                            drop(state);
                            expire(message);
                            return;
                        }
                        Some((_, since)) => timeout - since.elapsed(),
                        None => timeout,
                    };
                    state = watched
                        .1
                        .wait_timeout(state, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            })
            .map_err(|e| Error::Invalid(format!("starting the collectives' watchdog: {e}")))?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// Watches `what` until the returned guard is dropped.
    pub fn watch(&self, what: impl Into<String>) -> Watch {
        lock(&self.shared).watched = Some((what.into(), Instant::now()));
        self.shared.1.notify_all();
        Watch(self.shared.clone())
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        lock(&self.shared).stopped = true;
        self.shared.1.notify_all();
        if let Some(thread) = self.thread.take() {
            // The thread only waits, or runs `expire`, which ends the process in training.
            let _ = thread.join();
        }
    }
}

/// Work under watch; dropping it ends the watch.
pub struct Watch(Shared);

impl Drop for Watch {
    fn drop(&mut self) {
        lock(&self.0).watched = None;
        self.0 .1.notify_all();
    }
}

/// The trainer's expiry action: the message on the log and standard error, then exit status 1.
pub fn exit_with(message: String) {
    tracing::error!("{message}");
    eprintln!("error: {message}");
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Work that outlasts the timeout expires with a message naming it; work that ends in
    /// time, and the time between watches, do not.
    #[test]
    fn only_watched_work_that_outlasts_the_timeout_expires() {
        let (tx, rx) = mpsc::channel();
        let dog =
            Watchdog::start(Duration::from_millis(300), move |m| tx.send(m).unwrap()).unwrap();
        for _ in 0..3 {
            let _step = dog.watch("a short step");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(rx.try_recv(), Err(mpsc::TryRecvError::Empty), "expired without a long watch");
        let _step = dog.watch("step 7");
        let message = rx.recv_timeout(Duration::from_secs(10)).expect("the long step expires");
        assert!(
            message.starts_with("step 7 has taken more than 0.3 s (--ddp_timeout)"),
            "{message}"
        );
    }

    /// Dropping the watchdog ends its thread even while it waits out a watch.
    #[test]
    fn dropping_the_watchdog_stops_it() {
        let (tx, rx) = mpsc::channel::<String>();
        let dog = Watchdog::start(Duration::from_secs(3600), move |m| tx.send(m).unwrap()).unwrap();
        let watch = dog.watch("a step");
        let started = Instant::now();
        drop(dog);
        drop(watch);
        assert!(started.elapsed() < Duration::from_secs(5));
        // Nothing expired, and the thread is gone: it dropped the callback and its sender.
        assert_eq!(rx.try_recv(), Err(mpsc::TryRecvError::Disconnected));
    }
}
