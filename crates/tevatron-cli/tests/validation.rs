//! Validation during training on the tiny BERT: the logged `eval_ndcg@10` (and MRR@10,
//! Recall@100) of a checkpoint equals `tevatron encode` + `search` + `eval` on that checkpoint;
//! the best checkpoint is recorded, kept by `--save_total_limit` and written as the final model
//! with `--load_best_model_at_end`; a resumed run keeps the best metric; bad flags are refused.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::Path;

use common::{fails_with, ok, repo, tevatron};

/// Validation data from the tiny training set: its queries, all its passages, and qrels that
/// judge each query's positive.
fn write_eval_data(d: &Path) {
    let train = std::fs::read_to_string(repo().join("testdata/train/tiny.jsonl")).unwrap();
    let (mut queries, mut corpus, mut qrels) = (String::new(), String::new(), String::new());
    for line in train.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let qid = row["query_id"].as_str().unwrap();
        queries += &format!("{}\n", serde_json::json!({"query_id": qid, "query": row["query"]}));
        for p in row["positive_passages"].as_array().unwrap() {
            qrels += &format!("{qid} 0 {} 1\n", p["docid"].as_str().unwrap());
        }
        for p in ["positive_passages", "negative_passages"] {
            for x in row[p].as_array().unwrap() {
                corpus += &format!(
                    "{}\n",
                    serde_json::json!({"docid": x["docid"], "title": x["title"], "text": x["text"]})
                );
            }
        }
    }
    // Distractors past 100 passages, so that recall@100 is not 1 for any model: the first 40
    // passages with their words reversed (close to the originals in a bag of words).
    let passages: Vec<serde_json::Value> =
        corpus.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(passages.len() < 100 && passages.len() + 40 > 100, "{}", passages.len());
    for (i, p) in passages.iter().take(40).enumerate() {
        let words: Vec<&str> = p["text"].as_str().unwrap().split(' ').rev().collect();
        let text = words.join(" ");
        corpus += &format!("{}\n", serde_json::json!({"docid": format!("r{i}"), "text": text}));
    }
    std::fs::write(d.join("queries.jsonl"), queries).unwrap();
    std::fs::write(d.join("corpus.jsonl"), corpus).unwrap();
    std::fs::write(d.join("qrels.txt"), qrels).unwrap();
}

fn train(d: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    train_model(d, out, "testdata/tiny/bert", &["--pooling", "mean"], extra)
}

/// [`train`] with another model and its pooling flags.
fn train_model(
    d: &Path,
    out: &str,
    model: &str,
    pooling: &[&str],
    extra: &[&str],
) -> std::process::Output {
    let retrieval = [
        "--eval_query_path",
        "queries.jsonl",
        "--eval_corpus_path",
        "corpus.jsonl",
        "--eval_qrels_path",
        "qrels.txt",
        "--per_device_eval_batch_size",
        "5",
    ];
    train_with(d, out, model, &[pooling, &retrieval, extra].concat())
}

/// Six steps of `tevatron train` on the tiny training data with `model` and `flags`.
fn train_with(d: &Path, out: &str, model: &str, flags: &[&str]) -> std::process::Output {
    let lengths = ["--query_max_len", "16", "--passage_max_len", "32"];
    six_steps(d, "train", out, model, &[&lengths[..], flags].concat())
}

/// Six steps of a training `command` on the tiny training data with `model` and `flags`.
fn six_steps(
    d: &Path,
    command: &str,
    out: &str,
    model: &str,
    flags: &[&str],
) -> std::process::Output {
    let model = repo().join(model).to_string_lossy().into_owned();
    let data = repo().join("testdata/train/tiny.jsonl").to_string_lossy().into_owned();
    let mut args = vec![
        command,
        "--output_dir",
        out,
        "--model_name_or_path",
        &model,
        "--dataset_path",
        &data,
        "--dataset_cache_dir",
        "cache",
        "--per_device_train_batch_size",
        "4",
        "--train_group_size",
        "3",
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "6",
        "--quiet",
    ];
    args.extend_from_slice(flags);
    tevatron(d, &args)
}

/// Validation and a checkpoint every 2 of the six steps, a lower nDCG@10 counting as better, so
/// that the best checkpoint is an early one (the tiny model's nDCG rises as it trains).
const EVERY_2_LOWER_IS_BETTER: [&str; 8] = [
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "2",
    "--save_steps",
    "2",
    "--greater_is_better",
    "false",
];

fn state(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap()).unwrap()
}

/// The logged evaluations: (step, {measure: value}).
fn evaluations(
    state: &serde_json::Value,
) -> Vec<(u64, serde_json::Map<String, serde_json::Value>)> {
    state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("eval_ndcg@10").is_some())
        .map(|e| (e["step"].as_u64().unwrap(), e.as_object().unwrap().clone()))
        .collect()
}

/// `tevatron eval` of `model` through encode and search, with the flags validation uses.
fn eval_with_commands(d: &Path, model: &Path) -> serde_json::Value {
    eval_encoded_with(d, model, &[])
}

/// Encodes `input` with `model` into `out` with the lengths and batch validation uses here,
/// and more flags.
fn encode(d: &Path, model: &str, input: &str, out: &str, flags: &[&str]) {
    let mut args = vec![
        "encode",
        "--model_name_or_path",
        model,
        "--dataset_path",
        input,
        "--encode_output_path",
        out,
        "--query_max_len",
        "16",
        "--passage_max_len",
        "32",
        "--per_device_eval_batch_size",
        "5",
        "--quiet",
    ];
    args.extend_from_slice(flags);
    ok(tevatron(d, &args));
}

/// [`eval_with_commands`] with more encoding flags (a decoder's pooling, an adapter).
fn eval_encoded_with(d: &Path, model: &Path, flags: &[&str]) -> serde_json::Value {
    eval_searched_with(d, model, flags, &[])
}

/// [`eval_encoded_with`] with more search flags (`--truncate_dim`).
fn eval_searched_with(
    d: &Path,
    model: &Path,
    flags: &[&str],
    search_flags: &[&str],
) -> serde_json::Value {
    let model = model.to_string_lossy();
    let enc = |input: &str, out: &str, extra: &[&str]| {
        encode(d, &model, input, out, &[extra, flags].concat());
    };
    enc("queries.jsonl", "q.safetensors", &["--encode_is_query"]);
    enc("corpus.jsonl", "p.safetensors", &[]);
    let mut search = vec!["search", "--query_reps", "q.safetensors", "--passage_reps"];
    search.extend(["p.safetensors", "--depth", "100", "--save_text", "--save_ranking_to"]);
    search.extend(["run.tsv", "--quiet"]);
    search.extend_from_slice(search_flags);
    ok(tevatron(d, &search));
    let out = ok(tevatron(
        d,
        &[
            "eval",
            "--qrels",
            "qrels.txt",
            "--run",
            "run.tsv",
            "--json",
            "-m",
            "ndcg@10",
            "-m",
            "mrr@10",
            "-m",
            "recall@100",
        ],
    ));
    serde_json::from_str(&out).unwrap()
}

/// Matryoshka training is validated at each narrower width too: `eval_dim8_ndcg@10` (and MRR,
/// recall) of a normalising model equal encode + `search --truncate_dim 8` (which re-normalises
/// the cut) + eval on the checkpoint, the full width is
/// logged under the plain names only, and `--metric_for_best_model dim8_ndcg@10` picks by it.
#[test]
fn matryoshka_training_is_validated_at_each_narrower_width() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_eval_data(d);
    // Normalised: each cut is re-normalised, in validation as in search.
    let flags = ["--matryoshka_dims", "32,8", "--normalize", "--eval_strategy", "steps"];
    let flags = [&flags[..], &["--eval_steps", "3"]].concat();
    let pick = ["--save_steps", "3", "--metric_for_best_model", "dim8_ndcg@10"];
    ok(train(d, "run", &[&flags[..], &pick].concat()));
    let st = state(&d.join("run"));
    let evals = evaluations(&st);
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [3, 6]);
    for (_, e) in &evals {
        for k in ["eval_dim8_ndcg@10", "eval_dim8_mrr@10", "eval_dim8_recall@100"] {
            assert!(e.contains_key(k), "{k} missing: {e:?}");
        }
        assert!(!e.keys().any(|k| k.starts_with("eval_dim32")), "{e:?}");
    }
    let best = evals.iter().map(|(_, e)| e["eval_dim8_ndcg@10"].as_f64().unwrap());
    assert_eq!(st["best_metric"].as_f64(), Some(best.fold(f64::MIN, f64::max)));
    let got = eval_searched_with(d, &d.join("run/checkpoint-6"), &[], &["--truncate_dim", "8"]);
    let full = eval_with_commands(d, &d.join("run/checkpoint-6"));
    let logged = &evals[1].1;
    for m in ["ndcg@10", "mrr@10", "recall@100"] {
        let (a, b) =
            (got[m].as_f64().unwrap(), logged[&format!("eval_dim8_{m}")].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-6, "{m} at 8 dims: tevatron eval {a}, logged {b}");
        let (a, b) = (full[m].as_f64().unwrap(), logged[&format!("eval_{m}")].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-6, "{m}: tevatron eval {a}, logged {b}");
    }
    assert_ne!(got["ndcg@10"], full["ndcg@10"], "8 dimensions should rank otherwise than 32");
}

#[test]
fn logged_metrics_equal_tevatron_eval_and_the_best_checkpoint_is_kept_and_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_eval_data(d);
    // The best checkpoint is an early one, which the limit of 1 must keep beside the latest and
    // the final model must be.
    let keep = ["--save_total_limit", "1", "--load_best_model_at_end"];
    ok(train(d, "run", &[&EVERY_2_LOWER_IS_BETTER[..], &keep].concat()));
    let out = d.join("run");
    let st = state(&out);
    let evals = evaluations(&st);
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4, 6]);
    for (_, e) in &evals {
        for k in ["eval_ndcg@10", "eval_mrr@10", "eval_recall@100", "eval_runtime", "epoch"] {
            assert!(e.contains_key(k), "{k} missing: {e:?}");
        }
    }
    let (best_step, best) = evals
        .iter()
        .map(|(s, e)| (*s, e["eval_ndcg@10"].as_f64().unwrap()))
        .fold((0, f64::INFINITY), |acc, x| if x.1 < acc.1 { x } else { acc });
    let first = evals[0].1["eval_ndcg@10"].as_f64().unwrap();
    assert!(
        evals.iter().any(|(_, e)| e["eval_ndcg@10"].as_f64() != Some(first)),
        "training should change nDCG@10 on its own queries: {evals:?}"
    );
    assert!(best_step < 6, "training should raise nDCG@10 on its own queries: {evals:?}");
    assert_eq!(st["best_metric"].as_f64(), Some(best));
    // The corpus is deeper than 100, so recall@100 says something (compared with eval below).
    assert!(
        evals.iter().any(|(_, e)| e["eval_recall@100"].as_f64().unwrap() < 1.0),
        "recall@100 is 1 at every evaluation: {evals:?}"
    );
    let best_dir = out.join(format!("checkpoint-{best_step}"));
    // As Hugging Face, the path is the output folder as given (relative here) joined with it.
    assert_eq!(
        st["best_model_checkpoint"].as_str(),
        Some(format!("run/checkpoint-{best_step}").as_str())
    );
    // The limit of 1 keeps the best checkpoint besides the latest.
    let checkpoints: Vec<String> =
        common::names(&out).into_iter().filter(|n| n.starts_with("checkpoint-")).collect();
    assert_eq!(checkpoints, [format!("checkpoint-{best_step}"), "checkpoint-6".to_string()]);
    // The logged values of the best checkpoint equal tevatron eval on its run (1e-6).
    let got = eval_with_commands(d, &best_dir);
    let logged = &evals.iter().find(|e| e.0 == best_step).unwrap().1;
    for (m, key) in
        [("ndcg@10", "eval_ndcg@10"), ("mrr@10", "eval_mrr@10"), ("recall@100", "eval_recall@100")]
    {
        let (a, b) = (got[m].as_f64().unwrap(), logged[key].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-6, "{m}: tevatron eval {a}, logged {b}");
    }
    // The final model is the best checkpoint's.
    let final_eval = eval_with_commands(d, &out);
    assert_eq!(final_eval["ndcg@10"], got["ndcg@10"]);
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(best_dir.join("model.safetensors")).unwrap()
    );
}

#[test]
fn a_resumed_run_keeps_the_best_metric_and_ends_as_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_eval_data(d);
    // The best is an early checkpoint: the resumed run must carry it over rather than find it
    // again at its last step.
    let flags = EVERY_2_LOWER_IS_BETTER;
    ok(train(d, "whole", &flags));
    // The same run stopped after step 4: its checkpoint-4 and nothing later.
    ok(train(d, "part", &flags));
    let part = d.join("part");
    std::fs::remove_dir_all(part.join("checkpoint-6")).unwrap();
    for f in ["model.safetensors", "trainer_state.json"] {
        std::fs::remove_file(part.join(f)).unwrap();
    }
    let before = state(&part.join("checkpoint-4"));
    assert!(before["best_metric"].as_f64().is_some(), "{before}");
    let out = train(d, "part", &[&flags[..], &["--quiet", "false"]].concat());
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    // It resumed (a fresh run finds the same best again): it saved after step 4 only.
    let saved = common::saved_steps(&log);
    assert!(log.contains("resuming from") && saved == [6], "{log}");
    let (whole, resumed) = (state(&d.join("whole")), state(&part));
    let best = whole["best_model_checkpoint"].as_str().unwrap().to_string();
    assert!(!best.ends_with("-6"), "the best should be an early checkpoint: {best}");
    assert_eq!(resumed["best_metric"], whole["best_metric"]);
    assert_eq!(
        std::fs::read(d.join("whole/model.safetensors")).unwrap(),
        std::fs::read(part.join("model.safetensors")).unwrap(),
        "the resumed run ends on the uninterrupted run's weights"
    );
    assert_eq!(
        resumed["best_model_checkpoint"].as_str().map(|p| p.replace("part/", "whole/")),
        whole["best_model_checkpoint"].as_str().map(String::from)
    );
    let strip = |e: Vec<(u64, serde_json::Map<String, serde_json::Value>)>| -> Vec<(u64, serde_json::Value)> {
        e.into_iter().map(|(s, m)| (s, m["eval_ndcg@10"].clone())).collect()
    };
    assert_eq!(strip(evaluations(&resumed)), strip(evaluations(&whole)));
    // Resumed with the output folder spelled otherwise (`./kept`): the limit of 1 still knows
    // the best checkpoint (it was deleted, and the run failed loading it at the end).
    let kept = [&flags[..], &["--save_total_limit", "1", "--load_best_model_at_end"]].concat();
    ok(train(d, "kept", &kept));
    std::fs::remove_dir_all(d.join("kept/checkpoint-6")).unwrap();
    for f in ["model.safetensors", "trainer_state.json"] {
        std::fs::remove_file(d.join("kept").join(f)).unwrap();
    }
    ok(train(d, "./kept", &kept));
    // Resumed from another folder's checkpoint, with no better evaluation after it: the best
    // is loaded from where it was recorded (it was looked for in the new folder, and the run
    // failed after training).
    let elsewhere = [&kept[..], &["--resume_from_checkpoint", "whole/checkpoint-4"]].concat();
    ok(train(d, "moved", &elsewhere));
    assert_eq!(
        std::fs::read(d.join("moved/model.safetensors")).unwrap(),
        std::fs::read(d.join(&best).join("model.safetensors")).unwrap(),
        "the run resumed elsewhere ends on the best checkpoint it was given, {best}"
    );
    let best = best.replace("whole/", "kept/");
    assert_eq!(
        std::fs::read(d.join("kept/model.safetensors")).unwrap(),
        std::fs::read(d.join(&best).join("model.safetensors")).unwrap(),
        "the resumed run ends on its best checkpoint, {best}"
    );
}

/// The measures logged at the last step equal `tevatron eval` of the final model (1e-6).
fn last_evaluation_equals_tevatron_eval(d: &Path, out: &str, encode_flags: &[&str]) {
    let st = state(&d.join(out));
    let evals = evaluations(&st);
    let (step, logged) = evals.last().unwrap();
    assert_eq!(*step, 6, "{evals:?}");
    let model = d.join(out);
    let got = if encode_flags.contains(&"--lora_name_or_path") {
        eval_encoded_with(d, &repo().join("testdata/tiny/mistral"), encode_flags)
    } else {
        eval_encoded_with(d, &model, encode_flags)
    };
    for (m, key) in
        [("ndcg@10", "eval_ndcg@10"), ("mrr@10", "eval_mrr@10"), ("recall@100", "eval_recall@100")]
    {
        let (a, b) = (got[m].as_f64().unwrap(), logged[key].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-6, "{out} {m}: tevatron eval {a}, logged {b}");
    }
}

#[test]
fn validation_works_on_two_ranks_with_grad_cache_and_on_a_lora_decoder() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_eval_data(d);
    let every = ["--eval_strategy", "steps", "--eval_steps", "3", "--save_steps", "3"];
    // Two ranks (rank 0 validates while the other waits at the next step), with GradCache.
    let mut flags = every.to_vec();
    flags.extend(["--nproc_per_node", "2", "--grad_cache", "--gc_q_chunk_size", "2"]);
    flags.extend(["--gc_p_chunk_size", "3", "--per_device_train_batch_size", "2"]);
    flags.extend(["--quiet", "false"]); // the log says how many ranks trained
    let out = train(d, "ranks", &flags);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("micro-batches of 2 x 2 rank(s)"), "two ranks trained: {log}");
    last_evaluation_equals_tevatron_eval(d, "ranks", &["--pooling", "mean"]);
    // LoRA on a decoder, last-token pooling: validation encodes through the live adapter,
    // `tevatron encode` through the saved one merged.
    let adapter = d.join("lora").to_string_lossy().into_owned();
    let decoder = ["--pooling", "eos", "--append_eos_token", "--normalize"];
    let mut flags = every.to_vec();
    flags.extend(["--lora", "--lora_r", "4", "--temperature", "0.05"]);
    ok(train_model(d, "lora", "testdata/tiny/mistral", &decoder, &flags));
    let mut encode = decoder.to_vec();
    encode.extend(["--lora_name_or_path", &adapter]);
    last_evaluation_equals_tevatron_eval(d, "lora", &encode);
    // The adapter moved the measures: validation ignoring it would not match.
    let base = eval_encoded_with(d, &repo().join("testdata/tiny/mistral"), &decoder);
    let logged = evaluations(&state(&d.join("lora"))).pop().unwrap().1;
    assert!(
        ["ndcg@10", "mrr@10"]
            .iter()
            .any(|m| (base[m].as_f64().unwrap() - logged[&format!("eval_{m}")].as_f64().unwrap())
                .abs()
                > 1e-6),
        "the base model scores as the adapter does: {base} vs {logged:?}"
    );
}

/// `--eval_dataset_path` logs the contrastive loss of a training-format file in eval mode: the
/// same value as the loss computed from `tevatron encode`'s vectors of its queries and groups.
#[test]
fn eval_loss_equals_the_loss_of_the_encoded_groups_and_can_pick_the_best_model() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Rows with exactly two negatives: with group size 3 every group is the whole row, whatever
    // the sampling order (the loss does not depend on the order of a batch's passages).
    let train = std::fs::read_to_string(repo().join("testdata/train/tiny.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = train
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["negative_passages"].as_array().unwrap().len() == 2)
        .collect();
    assert!(rows.len() >= 5, "{} rows with two negatives", rows.len());
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(d.join("eval.jsonl"), text).unwrap();
    let flags = [
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "3",
        "--save_steps",
        "3",
        "--eval_dataset_path",
        "eval.jsonl",
        "--load_best_model_at_end",
        "--temperature",
        "0.5",
    ];
    // No retrieval data: loss is the only measure, lower is better by default.
    let mut all = vec!["--pooling", "mean", "--per_device_eval_batch_size", "3"];
    all.extend_from_slice(&flags);
    ok(train_with(d, "run", "testdata/tiny/bert", &all));
    let st = state(&d.join("run"));
    let losses: Vec<(u64, f64)> = st["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["step"].as_u64()?, e.get("eval_loss")?.as_f64()?)))
        .collect();
    assert_eq!(losses.iter().map(|l| l.0).collect::<Vec<_>>(), [3, 6], "{st}");
    let best =
        losses.iter().cloned().fold((0, f64::INFINITY), |a, x| if x.1 < a.1 { x } else { a });
    assert_eq!(st["best_metric"].as_f64(), Some(best.1));
    // The final model's vectors: queries, and each row's positive then negatives.
    let (mut queries, mut passages) = (String::new(), String::new());
    for (i, r) in rows.iter().enumerate() {
        queries +=
            &format!("{}\n", serde_json::json!({"query_id": format!("q{i}"), "query": r["query"]}));
        let group = r["positive_passages"]
            .as_array()
            .unwrap()
            .iter()
            .chain(r["negative_passages"].as_array().unwrap());
        for (k, p) in group.enumerate() {
            passages += &format!(
                "{}\n",
                serde_json::json!({"docid": format!("q{i}-{k}"), "title": p["title"], "text": p["text"]})
            );
        }
    }
    std::fs::write(d.join("gq.jsonl"), queries).unwrap();
    std::fs::write(d.join("gp.jsonl"), passages).unwrap();
    let best_dir = d.join(format!("run/checkpoint-{}", best.0)).to_string_lossy().into_owned();
    let enc = |input: &str, out: &str, extra: &[&str]| {
        encode(d, &best_dir, input, out, &[extra, &["--pooling", "mean"]].concat());
        let v = tevatron_ir::vectors::Vectors::open(&d.join(out)).unwrap();
        let mut buf = Vec::new();
        v.rows().to_f32(v.dim(), 0, v.len(), &mut buf);
        (v.dim(), buf)
    };
    let (dim, q) = enc("gq.jsonl", "gq.safetensors", &["--encode_is_query"]);
    let (_, p) = enc("gp.jsonl", "gp.safetensors", &[]);
    // Cross-entropy of (q p^T) / 0.5 in batches of 3 queries with their 9 passages (the last
    // batch smaller, so that a mean of batch means would differ), averaged over queries.
    let (mut total, n) = (0.0f64, rows.len());
    assert_ne!(n % 3, 0, "{n} rows make equal batches of 3");
    for b0 in (0..n).step_by(3) {
        let b1 = (b0 + 3).min(n);
        for i in b0..b1 {
            let qi = &q[i * dim..(i + 1) * dim];
            let scores: Vec<f64> = (b0 * 3..b1 * 3)
                .map(|j| {
                    let pj = &p[j * dim..(j + 1) * dim];
                    qi.iter().zip(pj).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() / 0.5
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + scores.iter().map(|s| (s - max).exp()).sum::<f64>().ln();
            total += lse - scores[(i - b0) * 3];
        }
    }
    let want = total / n as f64;
    assert!(
        (want - best.1).abs() <= 1e-5,
        "eval_loss {} but the encoded groups give {want}",
        best.1
    );
    // The final model is the best checkpoint's.
    assert_eq!(
        std::fs::read(d.join("run/model.safetensors")).unwrap(),
        std::fs::read(d.join(format!("run/checkpoint-{}/model.safetensors", best.0))).unwrap()
    );
    // Told that a higher loss is better, the same run keeps the other checkpoint: the choice
    // follows the metric, not the last step.
    let worst =
        losses.iter().cloned().fold((0, f64::NEG_INFINITY), |a, x| if x.1 > a.1 { x } else { a });
    assert_ne!(worst.0, best.0, "{losses:?}");
    all.extend_from_slice(&["--greater_is_better", "true"]);
    ok(train_with(d, "rev", "testdata/tiny/bert", &all));
    assert_eq!(state(&d.join("rev"))["best_metric"].as_f64(), Some(worst.1));
    assert_eq!(
        std::fs::read(d.join("rev/model.safetensors")).unwrap(),
        std::fs::read(d.join(format!("rev/checkpoint-{}/model.safetensors", worst.0))).unwrap()
    );
}

#[test]
fn validation_flags_are_checked_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_eval_data(d);
    let model = repo().join("testdata/tiny/bert").to_string_lossy().into_owned();
    let data = repo().join("testdata/train/tiny.jsonl").to_string_lossy().into_owned();
    let bare = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--output_dir",
            "o",
            "--model_name_or_path",
            &model,
            "--dataset_path",
            &data,
            "--dataset_cache_dir",
            "cache",
            "--max_steps",
            "1",
        ];
        args.extend_from_slice(extra);
        tevatron(d, &args)
    };
    fails_with(
        bare(&["--eval_strategy", "steps"]),
        "needs --eval_query_path, --eval_corpus_path and --eval_qrels_path",
    );
    fails_with(
        bare(&["--eval_query_path", "queries.jsonl"]),
        "need --eval_strategy steps or epoch",
    );
    fails_with(bare(&["--load_best_model_at_end"]), "--load_best_model_at_end needs validation");
    // Intervals of 0 by steps: nothing would be logged, saved or evaluated, silently.
    fails_with(bare(&["--logging_steps", "0"]), "--logging_strategy steps needs --logging_steps");
    fails_with(
        bare(&["--save_steps", "0"]),
        "--save_strategy steps needs --save_steps of at least 1",
    );
    fails_with(
        train(d, "o", &["--eval_strategy", "steps", "--logging_steps", "0"]),
        "--eval_strategy steps with --logging_steps 0 needs --eval_steps",
    );
    fails_with(
        train(d, "o2", &["--eval_strategy", "steps", "--metric_for_best_model", "eval_loss"]),
        "--metric_for_best_model \"loss\": validation here measures ndcg@10, mrr@10, recall@100",
    );
    // A best evaluation off the save interval is saved all the same, and is what the run ends
    // on: evaluations at every step, checkpoints every fourth, lower nDCG@10 counted better so
    // that the best comes before the first checkpoint (this run had been refused; Hugging
    // Face's rule, which it met, lost such a best).
    let every_step = ["--eval_strategy", "steps", "--eval_steps", "1", "--save_steps", "4"];
    // A limit of 0 keeps every checkpoint, as Hugging Face's (it kept one and the best).
    let lower =
        ["--greater_is_better", "false", "--load_best_model_at_end", "--save_total_limit", "0"];
    let out = train(d, "best", &[&every_step[..], &lower, &["--quiet", "false"]].concat());
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("evaluations fall between saves (every 1 and 4 steps)"), "{log}");
    assert!(!log.contains("Some("), "{log}");
    let st = state(&d.join("best"));
    let evals: Vec<(u64, f64)> = evaluations(&st)
        .iter()
        .map(|(step, e)| (*step, e["eval_ndcg@10"].as_f64().unwrap()))
        .collect();
    assert_eq!(evals.len(), 6, "{evals:?}");
    // The first of the lowest, as `best_metric` follows every evaluation.
    let best = evals.iter().fold(evals[0], |b, &e| if e.1 < b.1 { e } else { b });
    assert!(best.0 % 4 != 0, "the best should fall off the save interval: {evals:?}");
    let checkpoint = format!("checkpoint-{}", best.0);
    assert_eq!(st["best_model_checkpoint"].as_str(), Some(format!("best/{checkpoint}").as_str()));
    assert_eq!(
        std::fs::read(d.join("best/model.safetensors")).unwrap(),
        std::fs::read(d.join("best").join(&checkpoint).join("model.safetensors")).unwrap()
    );
    let saved = common::names(&d.join("best"));
    for c in [checkpoint.as_str(), "checkpoint-4", "checkpoint-6"] {
        assert!(saved.iter().any(|n| n == c), "{c} missing: {saved:?}");
    }
    std::fs::write(d.join("other.qrels"), "x0 0 p0 1\n").unwrap();
    fails_with(
        train(d, "o4", &["--eval_strategy", "steps", "--eval_qrels_path", "other.qrels"]),
        "none of its queries is judged in --eval_qrels_path",
    );
    std::fs::write(d.join("bad.qrels"), "q0 0 p0\n").unwrap();
    fails_with(
        train(d, "o4", &["--eval_strategy", "steps", "--eval_qrels_path", "bad.qrels"]),
        "bad.qrels:1: qrels line needs 4 columns",
    );
    for out in ["o", "o2", "o4"] {
        assert!(!d.join(out).exists(), "{out}: refused flags must not leave an output");
    }
}

/// A first-stage run over the validation data: each query's own passages and the next query's,
/// its positive placed third, so that reranking has the positive and look-alikes to reorder.
fn write_first_stage_run(d: &Path) {
    let train = std::fs::read_to_string(repo().join("testdata/train/tiny.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> =
        train.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let docids = |row: &serde_json::Value, key: &str| -> Vec<String> {
        let docs = row[key].as_array().unwrap().iter();
        docs.map(|p| p["docid"].as_str().unwrap().to_string()).collect()
    };
    let mut run = String::new();
    for (i, row) in rows.iter().enumerate() {
        let next = &rows[(i + 1) % rows.len()];
        let mut docs = docids(row, "negative_passages");
        docs.extend(docids(next, "positive_passages"));
        docs.extend(docids(next, "negative_passages"));
        docs.insert(2.min(docs.len()), docids(row, "positive_passages")[0].clone());
        let qid = row["query_id"].as_str().unwrap();
        for (rank, doc) in docs.iter().enumerate() {
            run += &format!("{qid}\t{doc}\t{}\n", 100.0 - rank as f32);
        }
    }
    std::fs::write(d.join("first.tsv"), run).unwrap();
}

/// `tevatron train-reranker` for six steps on the tiny BERT, validated by reranking the
/// first-stage run's top 6, with `extra` flags.
fn train_reranker(d: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    let length = ["--rerank_max_len", "40"];
    six_steps(d, "train-reranker", out, "testdata/tiny/bert", &[&length[..], extra].concat())
}

/// `tevatron rerank` (its default pair format) of the first-stage run's top 6 with `model`, then
/// `tevatron eval`: what a reranker's validation logs.
fn rerank_and_eval(d: &Path, model: &Path) -> serde_json::Value {
    let model = model.to_string_lossy();
    let mut rerank = vec!["rerank", "--model_name_or_path", &model, "--run_path", "first.tsv"];
    rerank.extend(["--query_path", "queries.jsonl", "--corpus_path", "corpus.jsonl"]);
    rerank.extend(["--rerank_depth", "6", "--rerank_max_len", "40"]);
    rerank.extend(["--per_device_eval_batch_size", "5", "--rerank_output_path", "reranked.tsv"]);
    rerank.push("--quiet");
    ok(tevatron(d, &rerank));
    let mut eval = vec!["eval", "--qrels", "qrels.txt", "--run", "reranked.tsv", "--json"];
    eval.extend(["-m", "ndcg@10", "-m", "mrr@10"]);
    serde_json::from_str(&ok(tevatron(d, &eval))).unwrap()
}

/// Each logged evaluation of the reranker trained into `out` equals `tevatron rerank` + `eval`
/// on the checkpoint of its step (1e-6).
fn assert_logged_as_reranked(
    d: &Path,
    out: &Path,
    evals: &[(u64, serde_json::Map<String, serde_json::Value>)],
) {
    for (step, logged) in evals {
        let got = rerank_and_eval(d, &out.join(format!("checkpoint-{step}")));
        for m in ["ndcg@10", "mrr@10"] {
            let (a, b) = (got[m].as_f64().unwrap(), logged[&format!("eval_{m}")].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-6, "step {step} {m}: rerank + eval {a}, logged {b}");
        }
    }
}

/// A reranker trained on text pairs (`--pair_format pair`, the tiny reranker whose tokenizer
/// returns token types) is validated on text pairs: its logged measures equal `tevatron
/// rerank` (which reads the format from the checkpoint) + `eval`.
#[test]
fn a_reranker_trained_on_text_pairs_is_validated_on_them() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_eval_data(d);
    write_first_stage_run(d);
    let mut flags = vec!["--rerank_max_len", "40", "--pair_format", "pair", "--eval_strategy"];
    flags.extend(["steps", "--eval_steps", "3", "--save_steps", "3", "--eval_query_path"]);
    flags.extend(["queries.jsonl", "--eval_corpus_path", "corpus.jsonl", "--eval_qrels_path"]);
    flags.extend(["qrels.txt", "--eval_run_path", "first.tsv", "--eval_rerank_depth", "6"]);
    flags.extend(["--per_device_eval_batch_size", "5"]);
    ok(six_steps(d, "train-reranker", "rr", "testdata/tiny-reranker/bert", &flags));
    let evals = evaluations(&state(&d.join("rr")));
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [3, 6]);
    assert_logged_as_reranked(d, &d.join("rr"), &evals);
}

#[test]
fn a_reranker_is_validated_by_reranking_a_run_as_tevatron_rerank_and_eval_score_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_eval_data(d);
    write_first_stage_run(d);
    let validation = [
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--save_steps",
        "2",
        "--eval_query_path",
        "queries.jsonl",
        "--eval_corpus_path",
        "corpus.jsonl",
        "--eval_qrels_path",
        "qrels.txt",
        "--eval_run_path",
        "first.tsv",
        "--eval_rerank_depth",
        "6",
        "--per_device_eval_batch_size",
        "5",
    ];
    // "Best" is the lowest nDCG@10, so that the final model must be an early checkpoint's.
    let best_flags = ["--load_best_model_at_end", "--greater_is_better", "false"];
    ok(train_reranker(d, "rr", &[&validation[..], &best_flags].concat()));
    let out = d.join("rr");
    let st = state(&out);
    let evals = evaluations(&st);
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4, 6]);
    for (_, e) in &evals {
        assert!(e.contains_key("eval_mrr@10") && !e.contains_key("eval_recall@100"), "{e:?}");
    }
    // Each checkpoint's logged measures equal tevatron rerank + tevatron eval on it (1e-6).
    assert_logged_as_reranked(d, &out, &evals);
    // The best checkpoint is recorded and its weights are the final model's.
    let best = st["best_model_checkpoint"].as_str().unwrap().to_string();
    let (best_step, best_ndcg) = evals
        .iter()
        .map(|(s, e)| (*s, e["eval_ndcg@10"].as_f64().unwrap()))
        .fold((0, f64::INFINITY), |acc, x| if x.1 < acc.1 { x } else { acc });
    assert!(best_step < 6, "training should raise nDCG@10 on its own queries: {evals:?}");
    assert_eq!(st["best_metric"].as_f64(), Some(best_ndcg));
    assert!(best.ends_with(&format!("checkpoint-{best_step}")), "{best}");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(d.join(best).join("model.safetensors")).unwrap()
    );

    // Bad flags: validation without a run; a run without validation; a run for a retriever;
    // eval_loss for a reranker; a depth without a run; a run naming a document missing from
    // the corpus.
    fails_with(
        train_reranker(d, "b1", &validation[..12]),
        "a reranker's validation reranks a first-stage run: give --eval_run_path",
    );
    fails_with(
        train_reranker(d, "b2", &["--eval_run_path", "first.tsv"]),
        "--eval_run_path needs --eval_strategy",
    );
    fails_with(
        train(d, "b3", &["--eval_strategy", "steps", "--eval_run_path", "first.tsv"]),
        "--eval_run_path is not supported",
    );
    fails_with(
        train_reranker(d, "b4", &[&validation[..], &["--eval_dataset_path", "first.tsv"]].concat()),
        "--eval_dataset_path is not supported",
    );
    fails_with(
        train_reranker(d, "b6", &["--eval_rerank_depth", "3"]),
        "--eval_rerank_depth needs --eval_run_path",
    );
    // A run none of whose queries is judged, and an empty run, would log zeros: refused.
    std::fs::write(d.join("other.qrels"), "nobody 0 d0 1\n").unwrap();
    let mut unjudged = validation.to_vec();
    unjudged[11] = "other.qrels";
    fails_with(train_reranker(d, "b7", &unjudged), "none of its queries is judged");
    std::fs::write(d.join("empty.tsv"), "").unwrap();
    let mut empty = validation.to_vec();
    empty[13] = "empty.tsv";
    fails_with(train_reranker(d, "b8", &empty), "empty.tsv: the run has no pairs to rerank");
    std::fs::write(d.join("ghost.tsv"), "q0\tno-such-doc\t1.0\n").unwrap();
    let mut ghost = validation.to_vec();
    ghost[13] = "ghost.tsv";
    fails_with(train_reranker(d, "b5", &ghost), "no-such-doc");
}
