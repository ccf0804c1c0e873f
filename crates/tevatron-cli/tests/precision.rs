//! The precision flags of inference end to end: `encode --int8` and `rerank --int8` on the tiny
//! models of every backbone family (the int8 projections run: the embeddings differ from F32's,
//! and stay near them; the file records it; the flag is refused beside --fp16/--bf16), `encode
//! --bf16` likewise on a CPU with AMX-BF16 or (except on Intel's) AVX-512 BF16, and `--fp16` (and `--bf16` on other CPUs) on the
//! CPU, computed in F32 with a warning. The kernels are tested against their scalar references
//! in `backbone/int8.rs` and `backbone/bf16.rs`; MiniLM against F32 on real text in the model
//! crate's `tests/minilm.rs`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;

use tevatron_ir::vectors::Vectors;

mod common;
use common::{fails_with, ok, path, tevatron};

fn encode(d: &Path, model: &str, out: &str, extra: &[&str]) -> std::process::Output {
    let flags = ["--passage_max_len", "24", "--pooling", "mean", "--quiet"];
    common::encode_toy(d, model, out, &[&flags[..], extra].concat())
}

fn rows(file: &Path) -> (Vec<Vec<f32>>, std::collections::BTreeMap<String, String>) {
    let v = Vectors::open(file).unwrap();
    let rows = v.to_f32().chunks(v.dim()).map(<[f32]>::to_vec).collect();
    (rows, v.metadata().clone())
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn int8_encode_runs_on_every_family_and_stays_near_f32() {
    reduced_encode_runs_on_every_family_and_stays_near_f32("int8", 0.99);
}

/// Whether `--bf16` inference on this CPU runs a bf16 kernel (AMX's `tdpbf16ps`, or
/// `vdpbf16ps` where it outruns F32).
fn has_bf16_kernels() -> bool {
    tevatron_model::backbone::bf16::Bf16Kernels::detect().is_some_and(|k| k.faster_than_f32())
}

#[test]
fn bf16_encode_on_a_cpu_with_avx512_bf16_runs_on_every_family_and_stays_near_f32() {
    if has_bf16_kernels() {
        reduced_encode_runs_on_every_family_and_stays_near_f32("bf16", 0.9999);
    } else {
        // The kernel and the layers that use it are tested on an emulation of the instruction
        // in the model crate (backbone/bf16.rs, cpu_infer.rs); here the CLI says F32 instead.
        eprintln!("skipped: --bf16 computes in F32 on this CPU (half_precision_on_the_cpu_says_what_it_computes covers it)");
    }
}

/// `encode --{precision}` on the tiny model of every family: the file records it, the
/// embeddings differ from F32's (the kernels ran) and stay at cosine `floor` or more from them.
fn reduced_encode_runs_on_every_family_and_stays_near_f32(precision: &str, floor: f64) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let flag = format!("--{precision}");
    // BERT-style layers on raw buffers (bert, roberta, distilbert), ModernBERT through the
    // composed ops, and the decoder layer (llama, qwen3).
    for family in ["bert", "roberta", "distilbert", "modernbert", "llama", "qwen3"] {
        let model = path(&format!("testdata/tiny/{family}"));
        let reduced = format!("{family}.{precision}.safetensors");
        ok(encode(d, &model, &format!("{family}.f32.safetensors"), &["--device", "cpu"]));
        ok(encode(d, &model, &reduced, &[&flag, "--device", "cpu"]));
        let (f, fmeta) = rows(&d.join(format!("{family}.f32.safetensors")));
        let (q, qmeta) = rows(&d.join(reduced));
        assert_eq!(qmeta.get(precision).map(String::as_str), Some("true"), "{family}");
        assert!(!fmeta.contains_key(precision), "{family}");
        assert_eq!(f.len(), q.len());
        assert!(f != q, "{family}: {flag} changed nothing");
        for (i, (a, b)) in f.iter().zip(&q).enumerate() {
            let c = cosine(a, b);
            assert!(c > floor, "{family}: passage {i} at cosine {c} from F32 with {flag}");
        }
    }
}

#[test]
fn int8_rerank_scores_near_f32_and_int8_is_refused_beside_half_precision() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let run = d.join("run.trec");
    std::fs::write(&run, "q1 Q0 d1 1 9 r\nq1 Q0 d3 2 8 r\nq1 Q0 d2 3 7 r\n3 Q0 d3 1 2 r\n")
        .unwrap();
    let scores = |out: &str, extra: &[&str]| {
        let model = path("testdata/tiny-reranker/bert");
        let (queries, corpus) =
            (path("testdata/toy/queries.jsonl"), path("testdata/toy/corpus.jsonl"));
        let mut args = vec![
            "rerank",
            "--model_name_or_path",
            &model,
            "--run_path",
            run.to_str().unwrap(),
            "--query_path",
            &queries,
            "--corpus_path",
            &corpus,
            "--rerank_output_path",
            out,
            "--quiet",
        ];
        args.extend_from_slice(extra);
        ok(tevatron(d, &args));
        let mut s: Vec<(String, f64)> = std::fs::read_to_string(d.join(out))
            .unwrap()
            .lines()
            .map(|l| {
                let c: Vec<&str> = l.split('\t').collect();
                (format!("{} {}", c[0], c[1]), c[2].parse().unwrap())
            })
            .collect();
        s.sort_by(|a, b| a.0.cmp(&b.0));
        s
    };
    let f = scores("f32.txt", &[]);
    let q = scores("int8.txt", &["--int8"]);
    assert_eq!(f.len(), 4);
    assert!(f != q, "--int8 changed nothing");
    for (a, b) in f.iter().zip(&q) {
        assert_eq!(a.0, b.0);
        assert!((a.1 - b.1).abs() < 0.05 * a.1.abs().max(1.0), "{a:?} vs {b:?}");
    }
    let bert = path("testdata/tiny/bert");
    fails_with(encode(d, &bert, "x.safetensors", &["--int8", "--bf16"]), "--int8 is exclusive");
    fails_with(encode(d, &bert, "x.safetensors", &["--int8", "--fp16"]), "--int8 is exclusive");
}

#[test]
fn half_precision_on_the_cpu_says_what_it_computes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let bert = path("testdata/tiny/bert");
    ok(encode(d, &bert, "f32.safetensors", &["--device", "cpu"]));
    let f = rows(&d.join("f32.safetensors")).0;
    for flag in ["--bf16", "--fp16"] {
        let flags = ["--passage_max_len", "24", "--pooling", "mean", "--device", "cpu", flag];
        let out = common::encode_toy(d, &bert, "half.safetensors", &flags);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        ok(out);
        if flag == "--bf16" && has_bf16_kernels() {
            let kernels = tevatron_model::backbone::bf16::Bf16Kernels::detect().unwrap();
            let said = format!("the projections as bf16 products with {}", kernels.name());
            assert!(log.contains(&said), "{log}");
            assert_ne!(rows(&d.join("half.safetensors")).0, f, "{flag}");
        } else {
            assert!(log.contains(&format!("{flag} on the CPU computes in F32")), "{log}");
            assert_eq!(rows(&d.join("half.safetensors")).0, f, "{flag}");
        }
    }
}
