//! Where a training step's time goes, for tuning on a GPU: with `TEVATRON_PROFILE_STEPS=1`
//! set, each phase of a step ends with a device synchronisation, and stderr gets one line per
//! step with, for each phase, the milliseconds the host took to issue its work and the
//! milliseconds until the device finished it. Issue time close to the total means the host is
//! the bottleneck (kernel launches, bookkeeping), not the device. Off, every call is a no-op;
//! on, the synchronisations cost some overlap, so steps run a little slower.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{Device, Result};

/// One phase: name, host milliseconds to issue, milliseconds until the device was done.
type Phase = (&'static str, f64, f64);

/// This thread's current step: when its current phase began, and its finished phases.
struct Step {
    phase_start: Option<Instant>,
    phases: Vec<Phase>,
}

thread_local! {
    static STEP: RefCell<Step> = const { RefCell::new(Step { phase_start: None, phases: Vec::new() }) };
}

/// Whether `TEVATRON_PROFILE_STEPS` is set (to anything but empty or 0).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("TEVATRON_PROFILE_STEPS").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// Ends phase `name`: the host has issued its work; waits for `device` to finish it.
pub fn mark(name: &'static str, device: &Device) -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let start = STEP.with(|s| *s.borrow_mut().phase_start.get_or_insert_with(Instant::now));
    let issued = start.elapsed().as_secs_f64() * 1e3;
    device.synchronize()?;
    let done = start.elapsed().as_secs_f64() * 1e3;
    STEP.with(|s| {
        let mut s = s.borrow_mut();
        s.phases.push((name, issued, done));
        s.phase_start = Some(Instant::now());
    });
    Ok(())
}

/// Writes step `step`'s phases to stderr and starts the next step's.
pub fn report(step: usize) {
    if !enabled() {
        return;
    }
    STEP.with(|s| {
        let mut s = s.borrow_mut();
        let total: f64 = s.phases.iter().map(|(_, _, done)| done).sum();
        let parts: Vec<String> =
            s.phases.iter().map(|(n, issued, done)| format!("{n} {issued:.1}/{done:.1}")).collect();
        eprintln!("profile step {step}: {total:.1} ms; issued/done ms: {}", parts.join(", "));
        s.phases.clear();
        s.phase_start = Some(Instant::now());
    });
}
