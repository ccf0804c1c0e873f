//! Calls into dependencies that panic on some malformed inputs instead of returning an error
//! (the parquet crate's assertions, the tokenizers crate's decoders): [`catch`] turns the panic
//! into an error message, and the panic hook the binary installs ([`install_hook`]) stays
//! silent meanwhile, so that a user sees one clear error rather than a panic report above it.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Calls of [`catch`] in flight, in any thread: a dependency may panic on a worker thread of
/// its own (the tokenizers crate encodes batches on rayon's), so a thread-local flag would not
/// see it.
static CATCHING: AtomicUsize = AtomicUsize::new(0);

/// Runs `f`; a panic in it is returned as its message.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    CATCHING.fetch_add(1, Ordering::SeqCst);
    let result = catch_unwind(AssertUnwindSafe(f));
    CATCHING.fetch_sub(1, Ordering::SeqCst);
    result.map_err(|panic| message(panic.as_ref()))
}

/// The text of a panic's payload.
pub fn message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Keeps the default panic report for every panic except those that [`catch`] turns into
/// errors. A panic elsewhere while a `catch` runs on another thread goes unreported here, but
/// it still ends the process with its exit status.
pub fn install_hook() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if CATCHING.load(Ordering::SeqCst) == 0 {
            report(info)
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_a_value_passes_through() {
        assert_eq!(catch(|| 7), Ok(7));
        assert_eq!(catch(|| -> u8 { panic!("bad {}", 1) }), Err("bad 1".to_string()));
        assert_eq!(catch(|| -> u8 { panic!("static") }), Err("static".to_string()));
        assert_eq!(CATCHING.load(Ordering::SeqCst), 0);
    }
}
