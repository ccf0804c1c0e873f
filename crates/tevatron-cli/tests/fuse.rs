//! `tevatron fuse` against ranx on `testdata/fusion` (written by
//! `scripts/fixtures/make_fusion_golden.py`), and its refusals.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

mod common;
use common::{fails_with, ok, repo, tevatron};

type Scores = BTreeMap<String, Vec<(String, f64)>>;

fn fixture(f: &str) -> String {
    repo().join("testdata/fusion").join(f).to_string_lossy().into_owned()
}

/// Runs `tevatron fuse --runs <fixture runs> <flags> --output <dir>/fused.tsv` and reads the
/// output per query, in file order.
fn fuse(dir: &Path, runs: &[String], flags: &[&str]) -> Scores {
    let mut args = vec!["fuse", "--runs"];
    args.extend(runs.iter().map(String::as_str));
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--output", "fused.tsv"]);
    ok(tevatron(dir, &args));
    let mut fused = Scores::new();
    for line in std::fs::read_to_string(dir.join("fused.tsv")).unwrap().lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 3, "{line}");
        fused.entry(cols[0].into()).or_default().push((cols[1].into(), cols[2].parse().unwrap()));
    }
    fused
}

/// Each query's documents come best first, ties by doc id descending (trec_eval's order, which
/// compares scores in single precision).
fn assert_trec_order(fused: &Scores) {
    for (q, docs) in fused {
        for w in docs.windows(2) {
            let ((d0, s0), (d1, s1)) = (&w[0], &w[1]);
            let (a, b) = (*s0 as f32, *s1 as f32);
            assert!(a > b || (a == b && d0 > d1), "{q}: {d0} {s0} before {d1} {s1}");
        }
    }
}

fn runs(expected: &Value) -> Vec<String> {
    expected["runs"].as_array().unwrap().iter().map(|r| fixture(r.as_str().unwrap())).collect()
}

#[test]
fn every_method_and_normalisation_equals_ranx() {
    let dir = tempfile::tempdir().unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let runs = runs(&expected);
    let cases = expected["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let flags: Vec<&str> =
            case["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
        let got = fuse(dir.path(), &runs, &flags);
        assert_trec_order(&got);
        let want = case["scores"].as_object().unwrap();
        assert_eq!(got.len(), want.len(), "{flags:?}: queries");
        for (q, docs) in &got {
            let want = want[q].as_object().unwrap();
            assert_eq!(docs.len(), want.len(), "{flags:?} {q}: documents");
            for (d, s) in docs {
                let w = want[d].as_f64().unwrap();
                assert!((s - w).abs() <= 1e-12 * w.abs().max(1.0), "{flags:?} {q} {d}: {s} vs {w}");
            }
        }
    }
}

#[test]
fn defaults_depth_and_the_runs_order_of_weights() {
    let dir = tempfile::tempdir().unwrap();
    let runs = vec![fixture("a.tsv"), fixture("b.trec"), fixture("c.tsv")];
    // --method wsum without weights weighs the runs equally, min-max normalised.
    let equal = fuse(dir.path(), &runs, &["--method", "wsum"]);
    let ones = fuse(dir.path(), &runs, &["--method", "wsum", "--weights", "1", "1", "1"]);
    let explicit = fuse(dir.path(), &runs, &["--method", "wsum", "--normalization", "min-max"]);
    assert_eq!(equal, explicit);
    assert_eq!(equal.len(), 8, "every query of the fixture");
    for (q, docs) in &equal {
        assert!(docs.len() >= 5 && docs.len() == ones[q].len(), "{q}");
        for ((d, s), (d1, s1)) in docs.iter().zip(&ones[q]) {
            assert_eq!(d, d1);
            assert!((s * 3.0 - s1).abs() < 1e-12, "{q} {d}");
        }
    }
    // Weights follow --runs: swapping both gives the same fusion.
    let ab = fuse(dir.path(), &runs[..2], &["--method", "wsum", "--weights", "0.9", "0.1"]);
    let ba = fuse(
        dir.path(),
        &[runs[1].clone(), runs[0].clone()],
        &["--method", "wsum", "--weights", "0.1", "0.9"],
    );
    assert_eq!(ab.len(), 8);
    assert_eq!(ab.keys().collect::<Vec<_>>(), ba.keys().collect::<Vec<_>>());
    for (q, docs) in &ab {
        assert_eq!(docs.len(), ba[q].len(), "{q}");
        for ((d, s), (d1, s1)) in docs.iter().zip(&ba[q]) {
            assert_eq!(d, d1, "{q}");
            assert!((s - s1).abs() < 1e-12, "{q} {d}");
        }
    }
    // --k keeps each query's best documents of the full fusion; RRF's k defaults to 60.
    let full = fuse(dir.path(), &runs, &[]);
    assert_eq!(full, fuse(dir.path(), &runs, &["--method", "rrf", "--rrf.k", "60"]));
    let top = fuse(dir.path(), &runs, &["--k", "3"]);
    assert_eq!(full.len(), 8);
    for (q, docs) in &full {
        assert!(docs.len() > 3, "{q}");
        assert_eq!(top[q], docs[..3], "{q}");
    }
    // --depth reads only each run's best documents: at depth 1 a query has at most one
    // document a run.
    let shallow = fuse(dir.path(), &runs, &["--depth", "1"]);
    for (q, docs) in &shallow {
        assert!(!docs.is_empty() && docs.len() <= runs.len(), "{q}: {docs:?}");
    }
    // ... and keeps every run's best: some query has more than one (the output is not cut).
    assert!(shallow.values().any(|docs| docs.len() > 1), "{shallow:?}");
    assert_ne!(shallow, full);
    // The older spelling and the z-score spellings.
    assert_eq!(top, fuse(dir.path(), &runs, &["--rrf.max_docs", "3"]));
    let zmuv = ["--method", "wsum", "--normalization", "zmuv", "--weights", "1", "2", "3"];
    let zscore = ["--method", "wsum", "--normalization", "zscore", "--weights", "1", "2", "3"];
    assert_eq!(fuse(dir.path(), &runs, &zmuv), fuse(dir.path(), &runs, &zscore));
}

#[test]
fn a_query_missing_from_a_run_is_fused_from_the_others_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let only_q0 = dir.path().join("q0.tsv");
    std::fs::write(&only_q0, "q0\tdx\t3.0\nq0\tdy\t1.0\n").unwrap();
    let runs = [fixture("a.tsv"), only_q0.to_string_lossy().into_owned()];
    let args = ["--method", "wsum", "--normalization", "min-max", "--weights", "0.5", "2"];
    let fused = fuse(dir.path(), &runs, &args);
    let alone = fuse(
        dir.path(),
        &[runs[0].clone(), runs[0].clone()],
        &["--method", "wsum", "--weights", "0.5", "0"],
    );
    assert_eq!(fused.len(), 8);
    for (q, docs) in &fused {
        if q == "q0" {
            // dx and dy come from the second run only: 2 x 1 and 2 x 0.
            assert_eq!(docs[0], ("dx".to_string(), 2.0));
            assert!(docs.iter().any(|d| d == &("dy".to_string(), 0.0)));
        } else {
            assert_eq!(docs, &alone[q], "{q}: the first run's alone");
        }
    }
    let out = tevatron(dir.path(), &["fuse", "--runs", &runs[0], &runs[1], "--output", "f.tsv"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(err.contains("7 of 8 queries are missing from some runs"), "{err}");
}

#[test]
fn bad_fusion_input_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (fixture("a.tsv"), fixture("b.trec"));
    let nan = dir.path().join("nan.tsv");
    std::fs::write(&nan, "q0\td1\t1.5\nq0\td2\tnan\n").unwrap();
    let nan = nan.to_string_lossy().into_owned();
    let broken = dir.path().join("broken.tsv");
    std::fs::write(&broken, "q0\td1\t1.5\nq0\td2\n").unwrap();
    let broken = broken.to_string_lossy().into_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![&a, &b, "--weights", "1", "2"],
            "--weights and --normalization apply to --method wsum",
        ),
        (vec![&a, &b, "--normalization", "zmuv"], "apply to --method wsum"),
        (vec![&a, &b, "--method", "wsum", "--rrf_k", "10"], "--rrf_k applies to --method rrf"),
        (vec![&a, &b, "--method", "wsum", "--weights", "1"], "1 weights for 2 runs"),
        (vec![&a, &b, "--method", "wsum", "--weights", "1", "2", "3"], "3 weights for 2 runs"),
        (vec![&a, &b, "--method", "wsum", "--weights", "1", "inf"], "weight inf is not a finite"),
        (vec![&a, &b, "--rrf_k", "-2"], "the RRF constant k must be 0 or more, got -2"),
        (vec![&a, &b, "--depth", "0"], "--depth and --k must be at least 1"),
        (vec![&a, &nan], "nan.tsv:2: score \"nan\" is not a finite number"),
        (vec![&a, &broken], "broken.tsv:2: run line needs 6 columns"),
        (vec![&a, "missing.tsv"], "reading --runs missing.tsv"),
    ];
    for (runs, needle) in cases {
        let mut args = vec!["fuse", "--runs"];
        args.extend(runs);
        args.extend_from_slice(&["--output", "fused.tsv"]);
        fails_with(tevatron(dir.path(), &args), needle);
        assert!(!dir.path().join("fused.tsv").exists(), "{needle}: output written");
    }
}
