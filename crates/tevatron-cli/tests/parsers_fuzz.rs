//! No input may panic a parser (issue 19), for the two files only the binary reads: the JSON
//! arguments file (`tevatron eval args.json`) and `trainer_state.json` as `tevatron plot` reads
//! it. The binary gets arbitrary bytes, byte-level mutations of a valid file and JSON-aware
//! mutations, and must exit 0 or 2 (never a panic's 101 or a signal) within a time bound. A
//! file the arguments parser refuses (not UTF-8, not a JSON object, an object-valued argument)
//! must be named in the error; a file it accepts goes on to clap and the command, whose errors
//! are about flag values. A `trainer_state.json` that `plot` cannot use must be named, and
//! `plot --compare`'s labels must fit its runs.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;

#[path = "../../tevatron-ir/tests/fuzz/mod.rs"]
mod fuzz;
use fuzz::{assert_names, config, inputs, testdata, write, LIMIT};

/// Runs `tevatron args...` in `dir`, killing it past [`LIMIT`]; returns its exit code and
/// stderr, after checking that it neither panicked nor died of a signal.
fn run(dir: &Path, args: &[&str]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tevatron"))
        .current_dir(dir)
        .args(args)
        .env("TEVATRON_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).ok();
        text
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > LIMIT {
            child.kill().ok();
            panic!("tevatron {args:?} did not exit within {LIMIT:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let err = reader.join().unwrap();
    assert!(!err.contains("panicked"), "tevatron {args:?} panicked: {err}");
    let code = status.code().unwrap_or_else(|| panic!("killed by a signal ({status}): {err}"));
    assert!(code == 0 || code == 2, "exit code {code}: {err}");
    (code, err)
}

/// Whether `tevatron`'s arguments parser accepts `bytes`: UTF-8 text of one JSON object whose
/// values are not objects.
fn expandable(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else { return false };
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
        .is_ok_and(|m| m.values().all(|v| !v.is_object()))
}

const EVAL_ARGS: &str = r#"{"qrels": "qrels.txt", "run": "run.tsv", "metric": ["mrr@10", "ndcg@10"], "complete": true, "json": false, "per_query": null}"#;

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn json_arguments_file_never_panics(bytes in inputs(EVAL_ARGS.as_bytes().to_vec())) {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("qrels.txt"), &testdata("eval/qrels.txt"));
        write(&dir.path().join("run.tsv"), &testdata("eval/run.tsv"));
        let path = dir.path().join("fuzz-args.json");
        write(&path, &bytes);
        let (code, err) = run(dir.path(), &["eval", path.to_str().unwrap()]);
        if !expandable(&bytes) {
            assert_eq!(code, 2, "{err}");
            assert_names(&err, &path);
        }
    }
}

fn trainer_state() -> Vec<u8> {
    let log: Vec<serde_json::Value> = (1..=12)
        .map(|s| serde_json::json!({"step": s, "epoch": s as f64 / 12.0, "loss": 1.0 / s as f64, "grad_norm": 0.5, "learning_rate": 1e-5 * (13 - s) as f64}))
        .chain([serde_json::json!({"step": 12, "train_loss": 0.4})])
        .collect();
    serde_json::to_vec_pretty(&serde_json::json!({"global_step": 12, "log_history": log})).unwrap()
}

proptest! {
    // Each case draws two pictures: fewer of them.
    #![proptest_config(config(32))]

    #[test]
    fn plotted_trainer_state_never_panics(bytes in inputs(trainer_state())) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("fuzz-run");
        let path = out.join("trainer_state.json");
        write(&path, &bytes);
        let (code, err) = run(dir.path(), &["plot", out.to_str().unwrap()]);
        if code != 0 {
            assert_names(&err, &path);
        }
    }
}

/// `plot --compare` draws the runs in one picture; `--labels` must name each run, and without
/// `--compare` it is refused rather than ignored.
#[test]
fn plot_compares_runs_and_checks_its_labels() {
    let dir = tempfile::tempdir().unwrap();
    let runs = ["a", "b"].map(|name| {
        let out = dir.path().join(name);
        write(&out.join("trainer_state.json"), &trainer_state());
        out.to_str().unwrap().to_string()
    });
    let (code, err) = run(dir.path(), &["plot", &runs[0], "--compare", &runs[1]]);
    assert_eq!(code, 0, "{err}");
    assert!(dir.path().join("a/training_curves_compared.png").is_file());
    let (code, err) = run(dir.path(), &["plot", &runs[0], "--compare", &runs[1], "--labels", "x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--labels gives 1 label(s) for 2 runs"), "{err}");
    let (code, err) = run(dir.path(), &["plot", &runs[0], "--labels", "x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--compare"), "{err}");
}
