//! `tevatron train-reranker`, `tevatron annotate` and `tevatron train --distillation` end to end
//! on the tiny BERT and `testdata/train/tiny.jsonl`: a base model becomes a reranker saved in
//! transformers' layout that resumes from its checkpoints and that `tevatron rerank` loads; the
//! reranker annotates the training file; a retriever trains from those scores; flags that mean
//! nothing for the command are refused, and unscored data is refused with its file and line.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;

mod common;
use common::{copy_dir, fails_with, logged_losses, ok, repo, tevatron};

fn path(rel: &str) -> String {
    repo().join(rel).to_string_lossy().into_owned()
}

fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    let cache = dir.join("cache").to_string_lossy().into_owned();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--dataset_cache_dir", &cache]);
    tevatron(dir, &all)
}

fn reranker_args<'a>(out: &'a str, tiny_bert: &'a str, data: &'a str) -> Vec<&'a str> {
    vec![
        "train-reranker",
        "--output_dir",
        out,
        "--model_name_or_path",
        tiny_bert,
        "--dataset_path",
        data,
        "--per_device_train_batch_size",
        "4",
        "--train_group_size",
        "3",
        "--rerank_max_len",
        "48",
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
    ]
}

#[test]
fn a_base_model_trains_into_a_reranker_that_resumes_and_reranks() {
    let dir = tempfile::tempdir().unwrap();
    let (bert, data) = (path("testdata/tiny/bert"), path("testdata/train/tiny.jsonl"));
    let out = run(dir.path(), &reranker_args("a", &bert, &data));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("classifier.weight") && log.contains("initialised"), "{log}");
    // Tevatron's reranker driver takes Hugging Face's TrainingArguments: no warmup by default.
    assert!(log.contains("4 optimizer steps (warmup 0)"), "{log}");
    let a = dir.path().join("a");
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("training_args.json")).unwrap())
            .unwrap();
    assert_eq!(args["warmup_ratio"], 0.0, "{args}");
    // The prefixes in force are recorded (null had said nothing of Tevatron's defaults).
    assert_eq!(
        (&args["query_prefix"], &args["passage_prefix"]),
        (&"query:".into(), &"passage:".into())
    );
    assert!(log.contains("CrossEncoder.predict feeds text pairs, not this one string"), "{log}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    let losses = logged_losses(&a);
    assert_eq!(losses.len(), 4);
    // Groups of 3: a fresh head starts near ln 3.
    assert!((losses[0] - 3f64.ln()).abs() < 0.05, "{losses:?}");

    // Resuming from checkpoint-2 (its base weights saved under `bert.`) ends on the same weights.
    let b = dir.path().join("b");
    copy_dir(&a.join("checkpoint-2"), &b.join("checkpoint-2"));
    let out = run(dir.path(), &reranker_args("b", &bert, &data));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("resuming from") && log.contains("(step 2)"), "{log}");
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(weights(&a) == weights(&b), "resumed weights differ");

    // tevatron rerank takes the folder, in Tevatron's format (the folder says so).
    std::fs::write(
        dir.path().join("in.jsonl"),
        "{\"query_id\": \"1\", \"query\": \"naive cafe\", \"docid\": \"a\", \"title\": \"\", \"text\": \"cafe\"}\n",
    )
    .unwrap();
    let out = run(
        dir.path(),
        &[
            "rerank",
            "--model_name_or_path",
            "a",
            "--dataset_path",
            "in.jsonl",
            "--rerank_output_path",
            "r.txt",
        ],
    );
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("pairs in Tevatron's format"), "{log}");
    assert!(!log.contains("was trained with"), "the same settings: {log}");
    assert!(std::fs::read_to_string(dir.path().join("r.txt")).unwrap().starts_with("1\ta\t"));
    // Another query prefix than the training's: scored as asked, and said.
    let mut other = vec!["rerank", "--model_name_or_path", "a", "--dataset_path", "in.jsonl"];
    other.extend(["--rerank_output_path", "r2.txt", "--query_prefix", "q:"]);
    let out = run(dir.path(), &other);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("was trained with --query_prefix \"query:\" (here \"q:\")"), "{log}");
}

/// A ModernBERT base becomes a `ModernBertForSequenceClassification`: its whole head
/// (`head.dense`, `head.norm`, `classifier`) initialised and trained, the backbone saved under
/// `model.` beside it, and the folder loads again as a reranker.
#[test]
fn a_modernbert_base_trains_into_its_sequence_classification_layout() {
    let dir = tempfile::tempdir().unwrap();
    let (modern, data) = (path("testdata/tiny/modernbert"), path("testdata/train/tiny.jsonl"));
    let out = run(dir.path(), &reranker_args("m", &modern, &data));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("head.dense.weight") && log.contains("initialised"), "{log}");
    let m = dir.path().join("m");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "ModernBertForSequenceClassification");
    let losses = logged_losses(&m);
    assert!(losses.len() == 4 && losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let names: Vec<String> =
        candle_core::safetensors::load(m.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    for head in ["head.dense.weight", "head.norm.weight", "classifier.weight", "classifier.bias"] {
        assert!(names.iter().any(|n| n == head), "{head} in {names:?}");
    }
    assert!(
        names
            .iter()
            .filter(|n| !n.starts_with("head.") && !n.starts_with("classifier."))
            .all(|n| n.starts_with("model.")),
        "{names:?}"
    );
    // Loaded again, every head weight is the folder's: nothing is initialised twice.
    let trained = m.to_string_lossy().into_owned();
    let mut args = reranker_args("m2", &trained, &data);
    let steps = args.iter().position(|&a| a == "--max_steps").unwrap() + 1;
    args[steps] = "1";
    let again = run(dir.path(), &args);
    let log = String::from_utf8_lossy(&again.stderr).into_owned();
    ok(again);
    assert!(!log.contains("initialised"), "{log}");
}

#[test]
fn annotated_scores_train_a_retriever_by_distillation() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = path("testdata/tiny-reranker/bert");
    let data = path("testdata/train/tiny.jsonl");
    ok(run(
        dir.path(),
        &[
            "annotate",
            "--model_name_or_path",
            &teacher,
            "--dataset_path",
            &data,
            "--output_path",
            "scored.jsonl",
            "--rerank_max_len",
            "24",
            "--max_negatives",
            "2",
        ],
    ));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("scored.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 24);
    // No negatives kept: said, and the rows keep their positives' scores only.
    let none = ["--output_path", "none.jsonl", "--rerank_max_len", "24", "--max_negatives", "0"];
    let out = run(
        dir.path(),
        &[&["annotate", "--model_name_or_path", &teacher, "--dataset_path", &data], &none[..]]
            .concat(),
    );
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && log.contains("--max_negatives 0 keeps no negative"), "{log}");
    let first = std::fs::read_to_string(dir.path().join("none.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert_eq!(first["negative_passages"], serde_json::json!([]), "{first}");
    // Passages with and without a title in one file: every passage written has the key (an
    // empty title where it had none), so that Hugging Face datasets reads one schema; a file
    // without titles gets none.
    let row = |title: Option<&str>| {
        let mut pos = serde_json::json!({"docid": "p", "text": "a cafe"});
        if let Some(t) = title {
            pos["title"] = t.into();
        }
        serde_json::json!({"query": "cafe", "positive_passages": [pos],
            "negative_passages": [{"docid": "n", "text": "a field"}]})
        .to_string()
    };
    for (name, rows, titled) in [
        ("mixed.jsonl", [row(Some("T")), row(None)], true),
        ("plain.jsonl", [row(None), row(None)], false),
    ] {
        std::fs::write(dir.path().join(name), rows.join("\n") + "\n").unwrap();
        let out = format!("scored-{name}");
        let args = ["annotate", "--model_name_or_path", &teacher, "--dataset_path", name];
        ok(run(
            dir.path(),
            &[&args[..], &["--output_path", &out, "--rerank_max_len", "24"]].concat(),
        ));
        for line in std::fs::read_to_string(dir.path().join(&out)).unwrap().lines() {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            for key in ["positive_passages", "negative_passages"] {
                for p in r[key].as_array().unwrap() {
                    assert_eq!(p.get("title").is_some(), titled, "{name}: {p}");
                }
            }
        }
    }
    let originals: Vec<serde_json::Value> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (r, o) in rows.iter().zip(&originals) {
        let negs = r["negative_passages"].as_array().unwrap();
        let had = o["negative_passages"].as_array().map_or(0, Vec::len);
        assert_eq!(negs.len(), had.min(2), "{r}");
        for p in r["positive_passages"].as_array().unwrap().iter().chain(negs) {
            assert!(p["score"].as_f64().unwrap().is_finite() && p["docid"].is_string(), "{p}");
        }
    }
    // The teacher's scores are its rerank scores of the same pairs: the first row's positive
    // and both its negatives, each its own query.
    let scored = [
        &rows[0]["positive_passages"][0],
        &rows[0]["negative_passages"][0],
        &rows[0]["negative_passages"][1],
    ];
    let mut inputs = String::new();
    for (i, p) in scored.iter().enumerate() {
        let input = serde_json::json!({"query_id": format!("q{i}"), "query": rows[0]["query"],
            "docid": "d", "title": p["title"], "text": p["text"]});
        inputs.push_str(&format!("{input}\n"));
    }
    std::fs::write(dir.path().join("one.jsonl"), inputs).unwrap();
    ok(run(
        dir.path(),
        &[
            "rerank",
            "--model_name_or_path",
            &teacher,
            "--dataset_path",
            "one.jsonl",
            "--rerank_max_len",
            "24",
            "--rerank_output_path",
            "one.txt",
        ],
    ));
    let lines = std::fs::read_to_string(dir.path().join("one.txt")).unwrap();
    assert_eq!(lines.lines().count(), 3, "{lines}");
    for line in lines.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        let i: usize = cols[0][1..].parse().unwrap();
        let score: f64 = cols[2].parse().unwrap();
        let p = scored[i];
        assert!((score - p["score"].as_f64().unwrap()).abs() < 1e-6, "{line} vs {p}");
    }

    let bert = path("testdata/tiny/bert");
    let train = |data: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--output_dir",
            "student",
            "--overwrite_output_dir",
            "--model_name_or_path",
            &bert,
            "--dataset_path",
            data,
            "--per_device_train_batch_size",
            "4",
            "--train_group_size",
            "3",
            "--max_steps",
            "2",
            "--logging_steps",
            "1",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let call = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(dir.path(), &refs)
    };
    let out = call(train("scored.jsonl", &["--distillation", "--distil_temperature", "0.5"]));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("KL at temperatures 0.5 (student) and 0.5 (teacher)"), "{log}");
    // Scored rows without --distillation train contrastively, and the log says the scores
    // change nothing (a train_distil recipe pasted without its flag).
    let out = call(train("scored.jsonl", &["--output_dir", "plain"]));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("carry teacher scores") && log.contains("change nothing"), "{log}");
    // Unscored data, and distillation flags without --distillation, are refused.
    fails_with(
        call(train(&data, &["--distillation"])),
        "tiny.jsonl:1: `positive_passages[0]` has no `score`",
    );
    fails_with(
        call(train("scored.jsonl", &["--distil_temperature", "0.5"])),
        "need --distillation",
    );
    // A score that is not a number, and one beyond f64 (JSON has no inf), name the file and line.
    let scored = std::fs::read_to_string(dir.path().join("scored.jsonl")).unwrap();
    let text = scored.replacen("\"score\":", "\"score\":\"x\",\"s\":", 1);
    std::fs::write(dir.path().join("bad.jsonl"), text).unwrap();
    let err = fails_with(call(train("bad.jsonl", &["--distillation"])), "bad.jsonl:1");
    assert!(err.contains("score"), "{err}");
    let text = scored.replacen("\"score\":", "\"score\":1e999,\"s\":", 1);
    std::fs::write(dir.path().join("inf.jsonl"), text).unwrap();
    fails_with(
        call(train("inf.jsonl", &["--distillation"])),
        "inf.jsonl:1: malformed JSON: number out of range",
    );
}

#[test]
fn each_training_command_refuses_the_others_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (bert, data) = (path("testdata/tiny/bert"), path("testdata/train/tiny.jsonl"));
    let mut args = reranker_args("x", &bert, &data);
    args.extend(["--pooling", "mean"]);
    fails_with(run(dir.path(), &args), "--pooling is not supported: a cross-encoder scores");
    let mut args = reranker_args("x", &bert, &data);
    args.extend(["--eval_dataset_path", "x.jsonl"]);
    fails_with(run(dir.path(), &args), "--eval_dataset_path is not supported");
    let mut args = reranker_args("x", &bert, &data);
    args[0] = "train";
    fails_with(run(dir.path(), &args), "--rerank_max_len is not supported");
    let mut args = vec!["train", "--output_dir", "x", "--model_name_or_path", &bert];
    args.extend(["--dataset_path", &data, "--max_steps", "1", "--pair_format", "pair"]);
    fails_with(run(dir.path(), &args), "--pair_format is not supported");
    let mut args = reranker_args("x", &bert, &data);
    args.extend(["--add_special_tokens", "false"]);
    fails_with(run(dir.path(), &args), "--add_special_tokens false: a reranker's pairs");
    // A group of one passage: a listwise loss of 0 at every step, nothing trained.
    let mut args = reranker_args("x", &bert, &data);
    let at = args.iter().position(|a| *a == "--train_group_size").unwrap();
    args[at + 1] = "1";
    fails_with(run(dir.path(), &args), "--train_group_size must be at least 2");
    args[0] = "train";
    args.retain(|a| !["--rerank_max_len", "48"].contains(a));
    args.push("--distillation");
    fails_with(run(dir.path(), &args), "--distillation's KL ranks each query's group");
    assert!(!dir.path().join("x").exists());
}

/// `--pair_format pair` trains on sentence-transformers' text pairs, with token types (the tiny
/// reranker's tokenizer returns them): the saved folder and its training_args.json record it,
/// and `rerank` then gives its pairs alike by default (the scores of `--pair_format pair`, not
/// those of Tevatron's string). Without the flag a CrossEncoder folder trains on text pairs and
/// any other folder on Tevatron's string, a SentenceTransformer bi-encoder's included (its
/// `config_sentence_transformers.json` does not make it a CrossEncoder).
#[test]
fn a_reranker_trains_on_text_pairs_and_reranks_them_alike() {
    let dir = tempfile::tempdir().unwrap();
    let (bert, data) = (path("testdata/tiny/bert"), path("testdata/train/tiny.jsonl"));
    let reranker = path("testdata/tiny-reranker/bert");
    let recorded = |folder: &str| {
        let read = |f: &str| -> serde_json::Value {
            let text = std::fs::read_to_string(dir.path().join(folder).join(f)).unwrap();
            serde_json::from_str(&text).unwrap()
        };
        let (config, args) = (read("config.json"), read("training_args.json"));
        (config["tevatron_pair_format"].clone(), args["pair_format"].clone())
    };
    let mut args = reranker_args("p", &reranker, &data);
    args.extend(["--pair_format", "pair"]);
    let out = run(dir.path(), &args);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("as sentence-transformers' CrossEncoder gives them"), "{log}");
    assert_eq!(recorded("p"), ("pair".into(), "pair".into()));

    std::fs::write(
        dir.path().join("in.jsonl"),
        "{\"query_id\": \"1\", \"query\": \"naive cafe\", \"docid\": \"a\", \"title\": \"\", \"text\": \"cafe\"}\n\
         {\"query_id\": \"1\", \"query\": \"naive cafe\", \"docid\": \"b\", \"title\": \"t\", \"text\": \"a naive text\"}\n",
    )
    .unwrap();
    let rerank = |format: Option<&str>, output: &str| {
        let mut args = vec!["rerank", "--model_name_or_path", "p", "--dataset_path", "in.jsonl"];
        args.extend(["--rerank_output_path", output]);
        if let Some(f) = format {
            args.extend(["--pair_format", f]);
        }
        ok(run(dir.path(), &args));
        std::fs::read_to_string(dir.path().join(output)).unwrap()
    };
    let auto = rerank(None, "auto.txt");
    assert_eq!(auto, rerank(Some("pair"), "pair.txt"));
    assert_ne!(auto, rerank(Some("tevatron"), "tevatron.txt"));
    // A CrossEncoder saved with a max_length (its tokenizer's model_max_length) cuts its
    // pairs there, as CrossEncoder.predict does, unless --rerank_max_len is given: at 6
    // tokens both pairs lose text, and the scores move. (The folder as sentence-transformers
    // would save it: no record of ours, whose folders keep the length they were trained at.)
    std::fs::create_dir(dir.path().join("ce")).unwrap();
    for entry in std::fs::read_dir(dir.path().join("p")).unwrap() {
        let entry = entry.unwrap().path();
        if entry.is_file() {
            std::fs::copy(&entry, dir.path().join("ce").join(entry.file_name().unwrap())).unwrap();
        }
    }
    let edit = |file: &str, change: &dyn Fn(&mut serde_json::Value)| {
        let path = dir.path().join("ce").join(file);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        change(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    };
    edit("tokenizer_config.json", &|t| t["model_max_length"] = serde_json::json!(6));
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    let mut args = vec!["rerank", "--model_name_or_path", "ce", "--dataset_path", "in.jsonl"];
    args.extend(["--rerank_output_path", "ours.txt"]);
    let out = run(dir.path(), &args);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(!log.contains("pairs cut at"), "a folder of ours keeps its length: {log}");
    assert_eq!(read("ours.txt"), auto);
    edit("config.json", &|c| {
        c.as_object_mut().unwrap().remove("tevatron_pair_format");
    });
    args[6] = "short.txt";
    let out = run(dir.path(), &args);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("pairs cut at 6 tokens, the model_max_length of"), "{log}");
    assert_ne!(read("short.txt"), auto);
    args.extend(["--rerank_max_len", "6"]);
    args[6] = "six.txt";
    ok(run(dir.path(), &args));
    assert_eq!(read("short.txt"), read("six.txt"));
    args[8] = "512";
    args[6] = "long.txt";
    ok(run(dir.path(), &args));
    assert_eq!(read("long.txt"), auto, "an explicit 512 is 512");

    // Folders without a record: a CrossEncoder (sentence-transformers' key in its config, or a
    // sequence classifier with sentence-transformers' file beside it), a plain classifier, and
    // a SentenceTransformer bi-encoder (the file beside a base model).
    let folder = |name: &str, from: &str, st_key: bool, st_file: bool| {
        let d = dir.path().join(name);
        copy_dir(Path::new(from), &d);
        if st_key {
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap())
                    .unwrap();
            config["sentence_transformers"] = serde_json::json!({"activation_fn": "x"});
            std::fs::write(d.join("config.json"), config.to_string()).unwrap();
        }
        if st_file {
            std::fs::write(d.join("config_sentence_transformers.json"), "{}").unwrap();
        }
    };
    folder("ce_key", &reranker, true, false);
    folder("ce_file", &reranker, false, true);
    folder("bi_encoder", &bert, false, true);
    for (base, want) in [
        ("ce_key", "pair"),
        ("ce_file", "pair"),
        (reranker.as_str(), "tevatron"),
        ("bi_encoder", "tevatron"),
    ] {
        ok(run(dir.path(), &reranker_args("out", base, &data)));
        assert_eq!(recorded("out"), (want.into(), want.into()), "{base}");
        std::fs::remove_dir_all(dir.path().join("out")).unwrap();
    }
}

/// A LoRA reranker on the tiny Llama (RankLLaMA's flags): PEFT's adapter folder with the score
/// head, resumed from a checkpoint to the same adapter, and scored by `tevatron rerank
/// --lora_name_or_path`.
#[test]
fn a_lora_reranker_trains_resumes_and_reranks() {
    let dir = tempfile::tempdir().unwrap();
    let (llama, data) = (path("testdata/tiny/llama"), path("testdata/train/tiny.jsonl"));
    let args = |out: &'static str| {
        let mut a = reranker_args(out, &llama, &data);
        a.extend([
            "--lora",
            "--lora_r",
            "4",
            "--lora_target_modules",
            "q_proj,v_proj",
            "--append_eos_token",
            "--rerank_max_len",
            "32",
        ]);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let call = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        run(dir.path(), &refs)
    };
    ok(call(args("a")));
    let a = dir.path().join("a");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    copy_dir(&a.join("checkpoint-2"), &dir.path().join("b/checkpoint-2"));
    let out = call(args("b"));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("resuming from") && log.contains("(step 2)"), "{log}");
    let weights = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(weights(&a) == weights(&dir.path().join("b")), "resumed adapter differs");
    std::fs::write(
        dir.path().join("in.jsonl"),
        "{\"query_id\": \"1\", \"query\": \"naive cafe\", \"docid\": \"a\", \"title\": \"\", \"text\": \"cafe\"}\n",
    )
    .unwrap();
    let a_str = a.to_string_lossy().into_owned();
    // `tevatron rerank` of in.jsonl on `base` with the adapter: its log.
    let rerank_with = |base: &str, out: &str, extra: &[&str]| {
        let mut args = vec![
            "rerank",
            "--model_name_or_path",
            base,
            "--lora_name_or_path",
            &a_str,
            "--dataset_path",
            "in.jsonl",
            "--append_eos_token",
            "--rerank_max_len",
            "32",
            "--rerank_output_path",
            out,
        ];
        args.extend_from_slice(extra);
        let out = run(dir.path(), &args);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        ok(out);
        log
    };
    rerank_with(&llama, "r.txt", &[]);
    let score_of = |file: &str| -> f64 {
        let line = std::fs::read_to_string(dir.path().join(file)).unwrap();
        line.trim().split('\t').nth(2).unwrap().parse().unwrap()
    };
    let score = score_of("r.txt");
    assert!(score.is_finite(), "{score}");
    // On a base that is a CrossEncoder folder (whose pairs `auto` would give as text pairs), the
    // adapter our training wrote still reranks in the Tevatron format it was trained on.
    let ce = dir.path().join("ce-base");
    copy_dir(Path::new(&llama), &ce);
    std::fs::write(ce.join("config_sentence_transformers.json"), "{}").unwrap();
    let ce_str = ce.to_string_lossy().into_owned();
    let log = rerank_with(&ce_str, "ce.txt", &[]);
    assert!(log.contains("trained by tevatron train-reranker"), "{log}");
    assert_eq!(score_of("ce.txt"), score);
    rerank_with(&ce_str, "pair.txt", &["--pair_format", "pair"]);
    assert_ne!(score_of("pair.txt"), score, "the pair form should score another input");
    // Training on from the adapter keeps the format it recorded, on that base too.
    let mut on = reranker_args("c", &ce_str, &data);
    on.extend(["--lora_name_or_path", &a_str, "--append_eos_token", "--rerank_max_len", "32"]);
    let out = run(dir.path(), &on);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("pairs in Tevatron's format"), "{log}");
    let c_args: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("c/training_args.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(c_args["pair_format"], "tevatron");
    // A record without the format (adapters trained before it was recorded) is Tevatron's too.
    let record = a.join("training_args.json");
    let mut a_args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    a_args.as_object_mut().unwrap().remove("pair_format");
    std::fs::write(&record, a_args.to_string()).unwrap();
    rerank_with(&ce_str, "unrecorded.txt", &[]);
    assert_eq!(score_of("unrecorded.txt"), score);
    // An adapter trained on text pairs reranks on them by default, on any base.
    let mut paired = args("p");
    paired.extend(["--pair_format".to_string(), "pair".to_string()]);
    ok(call(paired));
    let p_str = dir.path().join("p").to_string_lossy().into_owned();
    let rerank_p = |out: &str, extra: &[&str]| {
        let mut a = vec!["rerank", "--model_name_or_path", &llama, "--lora_name_or_path", &p_str];
        a.extend(["--dataset_path", "in.jsonl", "--append_eos_token", "--rerank_max_len", "32"]);
        a.extend(["--rerank_output_path", out]);
        a.extend_from_slice(extra);
        ok(run(dir.path(), &a));
        score_of(out)
    };
    assert_eq!(rerank_p("p_auto.txt", &[]), rerank_p("p_pair.txt", &["--pair_format", "pair"]));
    assert_ne!(rerank_p("p_auto.txt", &[]), rerank_p("p_tev.txt", &["--pair_format", "tevatron"]));
}
