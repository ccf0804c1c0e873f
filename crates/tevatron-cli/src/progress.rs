//! Progress on stderr with rate and ETA: a bar on a terminal (indicatif), and, when stderr is
//! a file or pipe (batch jobs, where indicatif draws nothing), a log line every 30 seconds.
//! `--quiet` hides both.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting `unit`s toward `total` (or a spinner when the total is unknown).
pub fn bar(total: Option<u64>, unit: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::new_spinner(),
    };
    let template = format!(
        "{{spinner}} [{{elapsed_precise}}] {{wide_bar}} {{human_pos}}/{{human_len}} {unit} ({{per_sec}}, ETA {{eta}}) {{msg}}"
    );
    pb.set_style(ProgressStyle::with_template(&template).expect("static template is valid"));
    pb
}

/// Periodic progress lines for non-terminal stderr.
pub struct LogProgress {
    total: usize,
    done: usize,
    /// Items done before this process started (a resumed run); not part of the rate.
    before: usize,
    unit: &'static str,
    start: Instant,
    last: Instant,
    enabled: bool,
}

impl LogProgress {
    /// Logs only when stderr is not a terminal and the command is not quiet.
    pub fn new(total: usize, unit: &'static str, quiet: bool) -> Self {
        let now = Instant::now();
        Self {
            total,
            done: 0,
            before: 0,
            unit,
            start: now,
            last: now,
            enabled: !quiet && !std::io::stderr().is_terminal(),
        }
    }

    /// Starts the count at `done` items finished by an earlier run (resumed training), so that
    /// the line reads `61/80` and the rate and ETA cover this run's work only.
    pub fn resume_at(&mut self, done: usize) {
        self.done = done;
        self.before = done;
    }

    /// `done/total unit (rate/s, ETA s)` after `secs` seconds of this process's work.
    fn line(&self, secs: f64) -> String {
        let rate = (self.done - self.before) as f64 / secs.max(1e-9);
        let eta = (self.total.saturating_sub(self.done)) as f64 / rate.max(1e-9);
        // Three significant digits at most, so that a slow rate (a training step every 30 s)
        // does not read 0.0/s.
        let digits = if rate >= 10.0 {
            1
        } else if rate >= 0.1 {
            2
        } else {
            3
        };
        format!("{}/{} {} ({rate:.digits$}/s, ETA {eta:.0} s)", self.done, self.total, self.unit)
    }

    /// Counts `n` more items and logs if 30 seconds passed since the last line.
    pub fn advance(&mut self, n: usize) {
        self.done += n;
        if !self.enabled || self.last.elapsed() < Duration::from_secs(30) {
            return;
        }
        self.last = Instant::now();
        tracing::info!("{}", self.line(self.start.elapsed().as_secs_f64()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_run_counts_from_its_checkpoint_and_rates_only_its_own_work() {
        let mut p = LogProgress::new(80, "steps", true);
        p.resume_at(60);
        p.advance(10);
        assert_eq!(p.line(20.0), "70/80 steps (0.50/s, ETA 20 s)");
        // Slow and fast rates keep their digits.
        assert_eq!(p.line(400.0), "70/80 steps (0.025/s, ETA 400 s)");
        p.advance(4);
        assert_eq!(p.line(0.5), "74/80 steps (28.0/s, ETA 0 s)");
    }
}
