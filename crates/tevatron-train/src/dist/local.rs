//! The in-process transport: ranks that are threads of one process.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::Transport;
use crate::{Error, Result};

/// Ranks that are threads of one process (tests of the collective logic).
pub struct LocalTransport {
    rank: usize,
    shared: Arc<LocalShared>,
}

struct LocalShared {
    world: usize,
    timeout: Duration,
    state: Mutex<LocalState>,
    changed: Condvar,
}

#[derive(Default)]
struct LocalState {
    slots: Vec<Option<Vec<u8>>>,
    filled: usize,
    /// The finished round, read by every rank before the next may start.
    result: Option<Arc<Vec<Vec<u8>>>>,
    readers: usize,
}

impl LocalTransport {
    /// `world` connected ranks; a rank waiting longer than `timeout` for the others fails.
    pub fn group(world: usize, timeout: Duration) -> Vec<Self> {
        let shared = Arc::new(LocalShared {
            world,
            timeout,
            state: Mutex::new(LocalState { slots: vec![None; world], ..LocalState::default() }),
            changed: Condvar::new(),
        });
        (0..world).map(|rank| Self { rank, shared: shared.clone() }).collect()
    }

    fn wait<'a>(
        &self,
        guard: std::sync::MutexGuard<'a, LocalState>,
        until: impl Fn(&LocalState) -> bool,
    ) -> Result<std::sync::MutexGuard<'a, LocalState>> {
        let (guard, timed_out) = self
            .shared
            .changed
            .wait_timeout_while(guard, self.shared.timeout, |s| !until(s))
            .map_err(|_| Error::Invalid("a rank panicked".into()))?;
        if timed_out.timed_out() {
            return Err(Error::Invalid(format!(
                "rank {}: the other ranks did not answer within {} s",
                self.rank,
                self.shared.timeout.as_secs_f64()
            )));
        }
        Ok(guard)
    }
}

impl Transport for LocalTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let state =
            self.shared.state.lock().map_err(|_| Error::Invalid("a rank panicked".into()))?;
        let mut state = self.wait(state, |s| s.result.is_none())?;
        state.slots[self.rank] = Some(data.to_vec());
        state.filled += 1;
        if state.filled == self.shared.world {
            let all = state.slots.iter_mut().map(|s| s.take().unwrap_or_default()).collect();
            state.result = Some(Arc::new(all));
            state.filled = 0;
            state.readers = 0;
            self.shared.changed.notify_all();
        }
        let mut state = self.wait(state, |s| s.result.is_some())?;
        let result = state.result.clone().expect("checked by the wait");
        state.readers += 1;
        if state.readers == self.shared.world {
            state.result = None;
            self.shared.changed.notify_all();
        }
        Ok((*result).clone())
    }
}
