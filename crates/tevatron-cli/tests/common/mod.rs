//! Helpers shared by the end-to-end tests: run the real binary and check its outcome.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A path under the repository root, as a string argument.
pub fn path(rel: &str) -> String {
    repo().join(rel).to_string_lossy().into_owned()
}

/// `tevatron encode` of the toy corpus with `model` into `out` (in `dir`), `extra` flags after.
pub fn encode_toy(dir: &Path, model: &str, out: &str, extra: &[&str]) -> Output {
    let corpus = path("testdata/toy/corpus.jsonl");
    let mut args = vec![
        "encode",
        "--model_name_or_path",
        model,
        "--dataset_path",
        &corpus,
        "--encode_output_path",
        out,
    ];
    args.extend_from_slice(extra);
    tevatron(dir, &args)
}

/// Runs `tevatron args...` in `dir`.
pub fn tevatron(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tevatron"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("binary runs")
}

/// Asserts success and returns stdout.
pub fn ok(out: Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts exit code 2, a single `tevatron: ...` line containing `needle`, and no panic.
pub fn fails_with(out: Output, needle: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    let last = err.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("tevatron: "), "stderr: {err}");
    assert!(last.contains(needle), "expected {needle:?} in {last:?}");
    assert!(!err.contains("panicked"), "{err}");
    last
}

/// The entry names of a folder, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The losses a training output logged (`trainer_state.json`'s `log_history`), in order.
pub fn logged_losses(out: &Path) -> Vec<f64> {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    state["log_history"].as_array().unwrap().iter().filter_map(|e| e["loss"].as_f64()).collect()
}

/// Copies the files of folder `from` into a new folder `to` (a checkpoint to resume from).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The steps of the checkpoints a training log says it saved (`saved .../checkpoint-N`): a
/// resumed run saves only after the step it resumed from, a run started afresh from step 1.
pub fn saved_steps(log: &str) -> Vec<usize> {
    log.lines()
        .filter_map(|l| {
            let at = l.find("saved ")?;
            let name = l[at..].rsplit("checkpoint-").next()?;
            name.trim().parse().ok()
        })
        .collect()
}
