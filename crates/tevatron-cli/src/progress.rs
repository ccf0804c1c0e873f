//! Progress bars on stderr with rate and ETA, hidden by `--quiet` or when stderr is not a TTY
//! consumer that wants them (indicatif decides).

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
        "{{spinner}} [{{elapsed_precise}}] {{wide_bar}} {{human_pos}}/{{human_len}} {unit} ({{per_sec}}, ETA {{eta}})"
    );
    pb.set_style(ProgressStyle::with_template(&template).expect("static template is valid"));
    pb
}
