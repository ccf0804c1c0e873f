//! Matryoshka training (`train --matryoshka_dims`) and truncated representations
//! (`encode`/`search --truncate_dim`): the record the trainer leaves, the cut vectors, the
//! warning for a width the model was not trained for, and the refusals.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;

use tevatron_ir::vectors::Vectors;

mod common;
use common::{fails_with, ok, path, tevatron};

fn train(d: &Path, out: &str, model: &str, flags: &[&str]) -> std::process::Output {
    train_on(d, out, model, &path("testdata/train/tiny.jsonl"), flags)
}

fn train_on(d: &Path, out: &str, model: &str, data: &str, flags: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--output_dir",
        out,
        "--model_name_or_path",
        model,
        "--dataset_path",
        data,
        "--dataset_cache_dir",
        "cache",
        "--per_device_train_batch_size",
        "4",
        "--train_group_size",
        "3",
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "3",
        "--logging_steps",
        "1",
        "--query_max_len",
        "16",
        "--passage_max_len",
        "32",
        "--normalize",
        "--pooling",
        "mean",
        "--quiet",
    ];
    args.extend_from_slice(flags);
    tevatron(d, &args)
}

fn encode(d: &Path, model: &str, out: &str, extra: &[&str]) -> std::process::Output {
    common::encode_toy(d, model, out, &[&["--passage_max_len", "16"], extra].concat())
}

#[test]
fn matryoshka_training_is_recorded_and_truncation_cuts_and_renormalises() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let bert = path("testdata/tiny/bert");
    let out = ok(train(
        d,
        "m",
        &bert,
        &["--matryoshka_dims", "32,16,8", "--matryoshka_weights", "1,1,0.5"],
    ));
    drop(out);
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("m/training_args.json")).unwrap())
            .unwrap();
    assert_eq!(args["matryoshka_dims"], serde_json::json!([32, 16, 8]));
    let losses = common::logged_losses(&d.join("m"));
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
    // The sum over three widths is not the plain loss: the same run without them differs.
    ok(train(d, "plain", &bert, &[]));
    let plain = common::logged_losses(&d.join("plain"));
    assert!((plain[0] - losses[0]).abs() > 1e-3, "{plain:?} vs {losses:?}");

    let model = d.join("m").to_string_lossy().into_owned();
    ok(encode(d, &model, "full.safetensors", &[]));
    let out = encode(d, &model, "cut.safetensors", &["--truncate_dim", "16"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && !err.contains("WARN"), "{err}");
    let full = Vectors::open(&d.join("full.safetensors")).unwrap();
    let cut = Vectors::open(&d.join("cut.safetensors")).unwrap();
    assert_eq!((full.dim(), cut.dim()), (32, 16));
    assert_eq!(cut.metadata()["matryoshka_dims"], "32,16,8");
    for (f, c) in full.to_f32().chunks(32).zip(cut.to_f32().chunks(16)) {
        let norm = f[..16].iter().map(|x| x * x).sum::<f32>().sqrt();
        for (x, y) in f[..16].iter().zip(c) {
            assert!((x / norm - y).abs() < 1e-6, "the cut is the prefix, re-normalised");
        }
    }
    // search --truncate_dim over the full vectors ranks as the search over the cut ones.
    let q = path("testdata/toy/queries.jsonl");
    let query_args = ["--encode_is_query", "--query_max_len", "8"];
    let mut qa = vec!["encode", "--model_name_or_path", &model, "--dataset_path", &q];
    qa.extend_from_slice(&query_args);
    ok(tevatron(d, &[qa.as_slice(), &["--encode_output_path", "q.safetensors"]].concat()));
    ok(tevatron(
        d,
        &[qa.as_slice(), &["--encode_output_path", "qcut.safetensors", "--truncate_dim", "16"]]
            .concat(),
    ));
    let search = |q: &str, p: &str, out: &str, extra: &[&str]| {
        let mut args = vec!["search", "--query_reps", q, "--passage_reps", p, "--depth", "4"];
        args.extend_from_slice(&["--save_ranking_to", out, "--save_text", "--quiet"]);
        args.extend_from_slice(extra);
        tevatron(d, &args)
    };
    ok(search("qcut.safetensors", "cut.safetensors", "a.tsv", &[]));
    ok(search("q.safetensors", "full.safetensors", "b.tsv", &["--truncate_dim", "16"]));
    // Compact codes of passages encoded at the width: full-width queries are cut to them.
    let mut index = vec!["index", "--passage_reps", "cut.safetensors", "--quantize", "int8"];
    index.extend(["--output_dir", "codes", "--quiet"]);
    ok(tevatron(d, &index));
    let compact = ["--truncate_dim", "16", "--quantize", "int8", "--rescore_multiplier", "100"];
    let codes = ["--compact_reps", "codes/*.safetensors"];
    ok(search("q.safetensors", "cut.safetensors", "e.tsv", &[&compact[..], &codes].concat()));
    // Codes of full vectors cannot serve a cut.
    let mut index = vec!["index", "--passage_reps", "full.safetensors", "--quantize", "int8"];
    index.extend(["--output_dir", "fullcodes", "--quiet"]);
    ok(tevatron(d, &index));
    fails_with(
        search(
            "q.safetensors",
            "full.safetensors",
            "x.tsv",
            &[&compact[..], &["--compact_reps", "fullcodes/*.safetensors"]].concat(),
        ),
        "--compact_reps were made from the full vectors of full.safetensors (32 dimensions)",
    );
    let docs = |f: &str| {
        let text = std::fs::read_to_string(d.join(f)).unwrap();
        text.lines()
            .map(|l| l.split('\t').take(2).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
    };
    assert_eq!(docs("a.tsv"), docs("b.tsv"));
    assert_eq!(docs("a.tsv"), docs("e.tsv"), "every row rescored: the exact ranking");
    // A width the model was not trained for works, with a warning; too wide is an error.
    let out = encode(d, &model, "c4.safetensors", &["--truncate_dim", "4"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && err.contains("--matryoshka_dims [32, 16, 8], not 4"), "{err}");
    // Queries encoded at a width no record names, against wider passages cut by search: the
    // warning is about the passages' width, whatever the queries' own.
    let out = search("c4.safetensors", "full.safetensors", "x.tsv", &["--truncate_dim", "4"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && err.contains("--matryoshka_dims [32, 16, 8], not 4"), "{err}");
    let out = encode(d, &bert, "b4.safetensors", &["--truncate_dim", "4"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && err.contains("there is no record that"), "{err}");
    // The full width cuts nothing: no warning, whatever the record says (here one of widths
    // that leave the full width out, and none at all).
    let record = d.join("plain/training_args.json");
    let mut args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    args["matryoshka_dims"] = serde_json::json!([16, 8]);
    std::fs::write(&record, args.to_string()).unwrap();
    let narrow = d.join("plain").to_string_lossy().into_owned();
    for (m, file) in [(&narrow, "n32.safetensors"), (&bert, "b32.safetensors")] {
        let out = encode(d, m, file, &["--truncate_dim", "32"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success() && !err.contains("--truncate_dim 32:"), "{err}");
    }
    // (vectors of a model with no record: they would warn at any narrower width)
    let out = search("b32.safetensors", "b32.safetensors", "c.tsv", &["--truncate_dim", "32"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && !err.contains("--truncate_dim 32:"), "{err}");
    fails_with(
        encode(d, &model, "x.safetensors", &["--truncate_dim", "33"]),
        "--truncate_dim 33: the model's embeddings have 32 dimensions",
    );
    // A width the passages cannot take: the error alone too (the warning came first).
    let out = search("q.safetensors", "cut.safetensors", "x.tsv", &["--truncate_dim", "20"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("--truncate_dim 20:"), "{err}");
    fails_with(out, "cut.safetensors: cannot be cut to 20 dimensions: its vectors have 16");
    // A width the query vectors cannot take is the error alone, with no warning about the
    // model's widths before it (the warnings start "--truncate_dim K:").
    let out = search("q.safetensors", "full.safetensors", "x.tsv", &["--truncate_dim", "40"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("--truncate_dim 40:"), "{err}");
    fails_with(out, "q.safetensors: cannot be cut to 40 dimensions: its vectors have 32");
}

/// Matryoshka with a LoRA decoder and the distillation loss in one run: it trains, the widths
/// are recorded with the adapter, and encoding through the adapter finds them (no warning).
#[test]
fn matryoshka_trains_a_lora_decoder_by_distillation() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Teacher scores: the positive above its negatives, each negative lower than the last.
    let rows = std::fs::read_to_string(path("testdata/train/tiny.jsonl")).unwrap();
    let mut scored = String::new();
    for line in rows.lines() {
        let mut row: serde_json::Value = serde_json::from_str(line).unwrap();
        for p in row["positive_passages"].as_array_mut().unwrap() {
            p["score"] = serde_json::json!(2.0);
        }
        for (i, p) in row["negative_passages"].as_array_mut().unwrap().iter_mut().enumerate() {
            p["score"] = serde_json::json!(-(i as f64));
        }
        scored += &format!("{row}\n");
    }
    std::fs::write(d.join("scored.jsonl"), scored).unwrap();
    let llama = path("testdata/tiny/llama");
    let flags = ["--lora", "--distillation", "--distil_temperature", "0.5"];
    let out = train_on(
        d,
        "a",
        &llama,
        "scored.jsonl",
        &[&flags[..], &["--matryoshka_dims", "32,8"]].concat(),
    );
    ok(out);
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("a/training_args.json")).unwrap())
            .unwrap();
    assert_eq!(args["matryoshka_dims"], serde_json::json!([32, 8]));
    assert_eq!(
        (&args["distillation"], &args["lora"]),
        (&serde_json::json!(true), &serde_json::json!(true))
    );
    let losses = common::logged_losses(&d.join("a"));
    assert!(losses.len() == 3 && losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(d.join("a/adapter_model.safetensors").exists());
    // The same run without the widths gives another loss: the prefixes are in it.
    ok(train_on(d, "b", &llama, "scored.jsonl", &flags));
    let plain = common::logged_losses(&d.join("b"));
    assert!((plain[0] - losses[0]).abs() > 1e-4, "{plain:?} vs {losses:?}");

    let out =
        encode(d, &llama, "cut.safetensors", &["--lora_name_or_path", "a", "--truncate_dim", "8"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && !err.contains("WARN"), "{err}");
    let cut = Vectors::open(&d.join("cut.safetensors")).unwrap();
    assert_eq!((cut.dim(), cut.metadata()["matryoshka_dims"].as_str()), (8, "32,8"));
}

/// `--matryoshka_kl_weight` puts the narrower widths' KL from the full width into the loss
/// (another loss than without it, recorded in the arguments), and says when no width is
/// narrower than the model's.
#[test]
fn matryoshka_self_distillation_is_in_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let bert = path("testdata/tiny/bert");
    ok(train(d, "plain", &bert, &["--matryoshka_dims", "32,8"]));
    let kl = ["--matryoshka_kl_weight", "2", "--matryoshka_kl_temperature", "0.1"];
    ok(train(d, "kl", &bert, &[&["--matryoshka_dims", "32,8"], &kl[..]].concat()));
    let (plain, with) =
        (common::logged_losses(&d.join("plain")), common::logged_losses(&d.join("kl")));
    assert!(with[0] - plain[0] > 1e-4, "{with:?} vs {plain:?}");
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("kl/training_args.json")).unwrap())
            .unwrap();
    assert_eq!(args["matryoshka_kl_weight"], serde_json::json!(2.0));
    // Only the full width: nothing to distil, said so; the loss is the plain one.
    let out = train(d, "full", &bert, &[&["--matryoshka_dims", "32"], &kl[..]].concat());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && err.contains("--matryoshka_kl_weight changes nothing"),
        "{err}"
    );
    ok(train(d, "full-plain", &bert, &["--matryoshka_dims", "32"]));
    let (full, full_plain) =
        (common::logged_losses(&d.join("full")), common::logged_losses(&d.join("full-plain")));
    assert_eq!(full, full_plain);
}

#[test]
fn bad_matryoshka_flags_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let bert = path("testdata/tiny/bert");
    fails_with(
        train(d, "w", &bert, &["--matryoshka_dims", "64"]),
        "--matryoshka_dims 64: each width must be between 1 and the model's 32",
    );
    // Flag errors are found before the output folder is made.
    fails_with(
        train(d, "o", &bert, &["--matryoshka_dims", "32,8", "--matryoshka_weights", "1"]),
        "--matryoshka_weights gives 1 weight(s) for 2 --matryoshka_dims",
    );
    fails_with(
        train(d, "o", &bert, &["--matryoshka_weights", "1"]),
        "--matryoshka_weights needs --matryoshka_dims",
    );
    fails_with(
        train(d, "o", &bert, &["--matryoshka_kl_weight", "1"]),
        "--matryoshka_kl_weight and --matryoshka_kl_temperature need --matryoshka_dims",
    );
    fails_with(
        train(d, "o", &bert, &["--matryoshka_dims", "8", "--matryoshka_kl_temperature", "1"]),
        "--matryoshka_kl_temperature needs --matryoshka_kl_weight",
    );
    fails_with(
        train(d, "o", &bert, &["--matryoshka_dims", "8", "--matryoshka_kl_weight=-1"]),
        "--matryoshka_kl_weight must be finite and not negative",
    );
    let zero_temperature = ["--matryoshka_kl_weight", "1", "--matryoshka_kl_temperature", "0"];
    fails_with(
        train(d, "o", &bert, &[&["--matryoshka_dims", "8"], &zero_temperature[..]].concat()),
        "--matryoshka_kl_temperature must be positive",
    );
    fails_with(
        train(d, "o", &bert, &["--matryoshka_dims", "0"]),
        "--matryoshka_dims 0: each width must be at least 1",
    );
    fails_with(
        train(d, "o", &bert, &["--matryoshka_dims", "16,8,16"]),
        "--matryoshka_dims gives 16 twice (width 3 of 3)",
    );
    let out = tevatron(
        d,
        &[
            "train-reranker",
            "--output_dir",
            "o",
            "--model_name_or_path",
            &bert,
            "--matryoshka_dims",
            "8",
        ],
    );
    fails_with(out, "a reranker's output is one score, which has no prefixes");
    assert!(!d.join("o").exists());
}
