//! Every measure equals pytrec_eval on a run full of edge cases (see
//! `scripts/fixtures/make_eval_golden.py`, which wrote `testdata/eval/`).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::PathBuf;

use serde_json::Value;
use tevatron_ir::metrics::{evaluate, Measure};
use tevatron_ir::trec::{Qrels, Run};

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/eval")
}

fn check(run_file: &str, complete: bool) {
    let dir = testdata();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let names: Vec<String> = expected["measures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let measures: Vec<Measure> = names.iter().map(|n| Measure::parse(n).unwrap()).collect();
    let run = Run::read(&dir.join(run_file)).unwrap();
    let qrels = Qrels::read(&dir.join("qrels.txt")).unwrap();
    let got = evaluate(&run, &qrels, &measures, complete);
    let means = &expected[if complete { "means_complete" } else { "means" }];
    assert_eq!(got.means.len(), names.len(), "one mean per measure");
    for (name, mean) in names.iter().zip(&got.means) {
        let want = means[name].as_f64().unwrap();
        assert!((mean - want).abs() <= 1e-6, "{run_file} -c={complete} {name}: {mean} vs {want}");
    }
    let per_query = expected["per_query"].as_object().unwrap();
    if !complete {
        assert_eq!(got.per_query.len(), per_query.len(), "evaluated queries differ");
    }
    for (qid, values) in &got.per_query {
        assert_eq!(values.len(), names.len(), "{qid}: one value per measure");
        for (name, v) in names.iter().zip(values) {
            let want = per_query.get(qid).map_or(0.0, |q| q[name].as_f64().unwrap());
            assert!((v - want).abs() <= 1e-6, "{qid} {name}: {v} vs {want}");
        }
    }
}

#[test]
fn every_measure_matches_pytrec_eval() {
    check("run.trec", false);
    check("run.tsv", false);
}

#[test]
fn complete_averaging_matches_trec_eval_c() {
    check("run.trec", true);
    check("run.tsv", true);
}
