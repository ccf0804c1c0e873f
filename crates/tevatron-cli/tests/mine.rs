//! `tevatron mine` end to end: hand-made embeddings whose scores are known, so each filter's
//! effect is exact; both training-file forms and queries + qrels; seeded sampling; the output
//! trains with `tevatron train`; bad inputs name their file, line and id.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{fails_with, ok, repo, tevatron};
use tevatron_ir::vectors::{VecDType, VectorWriter};

fn write_vectors(path: &Path, dim: usize, rows: &[f32], ids: &[&str]) {
    let mut w = VectorWriter::create(path, dim, VecDType::F32, BTreeMap::new()).unwrap();
    w.push(rows, ids).unwrap();
    w.finish().unwrap();
}

/// Two queries and twelve passages in 2-d: q1 = (1, 0) scores passage `dK` at 1.05 - K/20
/// (d1 1.0, d2 0.95, ..., d12 0.45); q2 = (0, 1) scores every passage 0 but `e1` (1.0).
/// d3's text is d1's with other case and spacing.
fn setup(d: &Path) {
    let mut rows = Vec::new();
    let mut ids = Vec::new();
    let mut corpus = String::new();
    for k in 1..=12 {
        rows.extend([1.05 - k as f32 / 20.0, 0.0]);
        ids.push(format!("d{k}"));
        let text =
            if k == 3 { "  The ANSWER\tis one ".to_string() } else { format!("the answer is {k}") };
        let text = if k == 1 { "the answer is one".to_string() } else { text };
        corpus += &format!("{}\n", serde_json::json!({"docid": format!("d{k}"), "text": text}));
    }
    rows.extend([0.0, 1.0]);
    ids.push("e1".into());
    corpus += &format!("{}\n", serde_json::json!({"docid": "e1", "text": "other"}));
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    write_vectors(&d.join("p.safetensors"), 2, &rows, &ids);
    write_vectors(&d.join("q.safetensors"), 2, &[1.0, 0.0, 0.0, 1.0], &["q1", "q2"]);
    std::fs::write(d.join("corpus.jsonl"), corpus).unwrap();
    let train = [
        serde_json::json!({"query_id": "q1", "query_text": "one", "positive_document_ids": ["d1"],
                           "negative_document_ids": ["d12"]}),
        serde_json::json!({"query_id": "q2", "query_text": "two", "positive_document_ids": ["e1"],
                           "negative_document_ids": []}),
    ];
    std::fs::write(
        d.join("train.jsonl"),
        train.iter().map(|r| format!("{r}\n")).collect::<String>(),
    )
    .unwrap();
    let text_form = [
        serde_json::json!({"query_id": "q1", "query": "one", "positive_passages": [{"docid": "d1", "text": "x"}],
                           "negative_passages": [{"docid": "d12", "text": "y"}]}),
        serde_json::json!({"query_id": "q2", "query": "two", "positive_passages": [{"docid": "e1", "text": "z"}]}),
    ];
    std::fs::write(
        d.join("train.text.jsonl"),
        text_form.iter().map(|r| format!("{r}\n")).collect::<String>(),
    )
    .unwrap();
    std::fs::write(
        d.join("queries.jsonl"),
        "{\"query_id\":\"q1\",\"query\":\"one\"}\n{\"query_id\":\"q2\",\"query\":\"two\"}\n",
    )
    .unwrap();
    std::fs::write(d.join("qrels.txt"), "q1 0 d1 1\nq1 0 d2 1\nq1 0 d5 0\nq2 0 e1 2\n").unwrap();
}

/// Runs `mine` over the hand-made embeddings and returns each query's negatives.
fn mine(d: &Path, input: &[&str], flags: &[&str]) -> BTreeMap<String, Vec<String>> {
    let mut args = vec![
        "mine",
        "--query_reps",
        "q.safetensors",
        "--passage_reps",
        "p.safetensors",
        "--output_path",
        "out/mined.jsonl",
        "--num_negatives",
        "3",
        "--dataset_cache_dir",
        "cache",
        "--quiet",
    ];
    args.extend_from_slice(input);
    args.extend_from_slice(flags);
    ok(tevatron(d, &args));
    let text = std::fs::read_to_string(d.join("out/mined.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["query_text"].is_string() && v["positive_document_ids"].is_array(), "{v}");
            let negs = v["negative_document_ids"].as_array().unwrap().iter();
            (
                v["query_id"].as_str().unwrap().to_string(),
                negs.map(|n| n.as_str().unwrap().to_string()).collect(),
            )
        })
        .collect()
}

const TRAIN: &[&str] = &["--dataset_path", "train.jsonl"];

fn q1(m: &BTreeMap<String, Vec<String>>) -> Vec<&str> {
    m["q1"].iter().map(String::as_str).collect()
}

#[test]
fn each_filter_removes_what_it_says() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    // Top 3 after the positive: d2, d3, d4; q2's only other passages score 0.
    let m = mine(d, TRAIN, &[]);
    assert_eq!(q1(&m), ["d2", "d3", "d4"]);
    assert_eq!(m["q2"].len(), 3);
    assert!(!m["q2"].contains(&"e1".to_string()));
    // The text form gives the same output.
    assert_eq!(mine(d, &["--dataset_path", "train.text.jsonl"], &[]), m);
    // Rank window, as sentence-transformers counts it: over the candidates left once the
    // positive d1 is out (d2, d3, ...), the first 2 skipped, up to the 5th.
    assert_eq!(q1(&mine(d, TRAIN, &["--range_min", "2", "--range_max", "5"])), ["d4", "d5", "d6"]);
    // Score ceiling 0.82 keeps d5 (0.8) and below.
    assert_eq!(q1(&mine(d, TRAIN, &["--max_score", "0.82"])), ["d5", "d6", "d7"]);
    // Absolute margin 0.12 below the positive's 1.0: d4 (0.85) is the first kept.
    assert_eq!(q1(&mine(d, TRAIN, &["--absolute_margin", "0.12"])), ["d4", "d5", "d6"]);
    // Relative margin 0.22: scores <= 0.78, d6 (0.75) first.
    assert_eq!(q1(&mine(d, TRAIN, &["--relative_margin", "0.22"])), ["d6", "d7", "d8"]);
    // Same text as the positive after folding white space and case: d3 dropped.
    let flags = ["--drop_same_text", "--corpus_path", "corpus.jsonl"];
    assert_eq!(q1(&mine(d, TRAIN, &flags)), ["d2", "d4", "d5"]);
    // Without --drop_same_text a corpus beside given embeddings is read by nothing: said so.
    let mut args = vec!["mine", "--query_reps", "q.safetensors", "--passage_reps", "p.safetensors"];
    args.extend_from_slice(&["--output_path", "out/noted.jsonl", "--corpus_path", "corpus.jsonl"]);
    args.extend_from_slice(&["--dataset_cache_dir", "cache", "--dataset_path", "train.jsonl"]);
    let out = tevatron(d, &args);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("--corpus_name) changes nothing here"), "{log}");
    // A query in two rows (one positive each, as pair files have it): neither row's positive
    // is mined as the other's negative, as sentence-transformers groups positives by anchor.
    let pairs = [
        serde_json::json!({"query_id": "q1", "query_text": "one", "positive_document_ids": ["d1"]}),
        serde_json::json!({"query_id": "q1", "query_text": "one", "positive_document_ids": ["d2"]}),
    ];
    let text: String = pairs.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(d.join("pairs.jsonl"), text).unwrap();
    mine(d, &["--dataset_path", "pairs.jsonl"], &[]);
    let rows = std::fs::read_to_string(d.join("out/mined.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 2, "one row per input row");
    for l in rows.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["negative_document_ids"], serde_json::json!(["d3", "d4", "d5"]), "{v}");
    }
    // The corpus may not be written over by the mined rows.
    let mut over = vec!["mine", "--query_reps", "q.safetensors", "--passage_reps", "p.safetensors"];
    over.extend(["--output_path", "corpus.jsonl", "--corpus_path", "corpus.jsonl"]);
    over.extend([
        "--drop_same_text",
        "--dataset_path",
        "train.jsonl",
        "--dataset_cache_dir",
        "cache",
    ]);
    fails_with(tevatron(d, &over), "is one of the inputs");
    // The existing negatives are kept after the mined ones when asked.
    assert_eq!(q1(&mine(d, TRAIN, &["--keep_existing_negatives"])), ["d2", "d3", "d4", "d12"]);
    // The summary counts what each filter removed and where the positives ranked.
    mine(d, TRAIN, &["--range_min", "2", "--depth", "10"]);
    let s: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out/mined.jsonl.summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(s["queries"], 2);
    assert_eq!(s["removed"]["judged"], 2, "{s}");
    assert_eq!(s["removed"]["rank_window"], 4, "the two best left of each query: {s}");
    assert_eq!(s["positive_ranks"][0], serde_json::json!(["1", 2]), "{s}");
    assert_eq!(s["queries_left_out_without_negatives"], 0, "{s}");
    // Queries whose candidates are all removed (every score is at least 0) are left out of the
    // output and counted.
    let m = mine(d, TRAIN, &["--max_score", "-1"]);
    assert!(m.is_empty(), "{m:?}");
    let s: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out/mined.jsonl.summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(s["queries_left_out_without_negatives"], 2, "{s}");
    assert_eq!(s["queries_short_of_negatives"], 0, "only written rows count as short: {s}");
    let png = std::fs::read(d.join("out/mined.jsonl.positive_ranks.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(!d.join("out/mined.jsonl.tmp").exists());
}

#[test]
fn qrels_exclude_every_judged_document_and_sampling_is_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let qrels = ["--queries", "queries.jsonl", "--qrels", "qrels.txt"];
    // d1 and d2 are judged relevant: neither is a negative; d5 (judged 0) may be.
    assert_eq!(q1(&mine(d, &qrels, &[])), ["d3", "d4", "d5"]);
    let random = |seed: &str| mine(d, TRAIN, &["--sampling_strategy", "random", "--seed", seed]);
    let a = random("1");
    assert_eq!(a, random("1"), "the same seed draws the same negatives");
    assert!((2..12).any(|s| random(&s.to_string()) != a), "another seed draws others");
    let ranks: Vec<usize> = a["q1"].iter().map(|n| n[1..].parse().unwrap()).collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]) && !ranks.contains(&1), "{ranks:?}");
    // The largest --seed and --depth are valid values (they overflowed in debug builds): a
    // depth past the corpus mines the whole corpus, as its size does.
    let max = u64::MAX.to_string();
    let huge = mine(d, TRAIN, &["--sampling_strategy", "random", "--seed", &max, "--depth", &max]);
    let whole = mine(d, TRAIN, &["--sampling_strategy", "random", "--seed", &max, "--depth", "13"]);
    assert_eq!(huge, whole);
}

#[test]
fn mined_negatives_train_with_tevatron_train() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // The tiny training data's passages as a corpus, its rows as the training file.
    let train = std::fs::read_to_string(repo().join("testdata/train/tiny.jsonl")).unwrap();
    let mut corpus = String::new();
    for line in train.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        for p in ["positive_passages", "negative_passages"] {
            for x in row[p].as_array().unwrap() {
                corpus +=
                    &format!("{}\n", serde_json::json!({"docid": x["docid"], "text": x["text"]}));
            }
        }
    }
    std::fs::write(d.join("corpus.jsonl"), corpus).unwrap();
    let model = repo().join("testdata/tiny/bert").to_string_lossy().into_owned();
    let data = repo().join("testdata/train/tiny.jsonl").to_string_lossy().into_owned();
    let cache = d.join("cache").to_string_lossy().into_owned();
    // `mine` encoding with the tiny model and `pooling` into `output`, `extra` flags after.
    let mine_with_model = |pooling: &str, output: &str, extra: &[&str]| {
        let mut args = vec!["mine", "--model_name_or_path", &model, "--pooling", pooling];
        args.extend(["--dataset_path", &data, "--corpus_path", "corpus.jsonl"]);
        args.extend(["--dataset_cache_dir", &cache, "--num_negatives", "4", "--quiet"]);
        args.extend(["--output_path", output]);
        args.extend_from_slice(extra);
        ok(tevatron(d, &args));
    };
    let kept = ["--depth", "20", "--embeddings_dir", "emb"];
    mine_with_model("mean", "mined.jsonl", &kept);
    let rows = std::fs::read_to_string(d.join("mined.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 24);
    assert!(d.join("emb/corpus.safetensors").is_file(), "the embeddings are kept when asked");
    // Kept embeddings are reused only for the same inputs: another pooling encodes again.
    let pooling_of = || {
        let v = tevatron_ir::vectors::Vectors::open(&d.join("emb/corpus.safetensors")).unwrap();
        v.metadata()["pooling"].clone()
    };
    assert_eq!(pooling_of(), "mean");
    mine_with_model("cls", "mined.cls.jsonl", &kept);
    assert_eq!(pooling_of(), "cls", "stale embeddings were reused");
    // Without --embeddings_dir they go to a folder beside the output, removed at the end; one
    // a killed run left (its pid no longer runs) is removed by the next run.
    let stale = d.join("out/.m.jsonl.embeddings.4294967290.abc123");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("corpus.safetensors"), "partial").unwrap();
    mine_with_model("mean", "out/m.jsonl", &[]);
    let mut left = common::names(&d.join("out"));
    left.retain(|n| !n.starts_with("m.jsonl"));
    if std::path::Path::new("/proc/self").exists() {
        assert!(left.is_empty(), "{left:?}");
    }
    ok(tevatron(
        d,
        &[
            "train",
            "--output_dir",
            "model",
            "--model_name_or_path",
            &model,
            "--dataset_path",
            "mined.jsonl",
            "--corpus_path",
            "corpus.jsonl",
            "--dataset_cache_dir",
            &cache,
            "--train_group_size",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--max_steps",
            "2",
            "--quiet",
        ],
    ));
    assert!(d.join("model/model.safetensors").is_file());
}

#[test]
fn bad_inputs_name_their_file_line_and_id() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let run = |input: &[&str], extra: &[&str]| {
        let mut args = vec![
            "mine",
            "--query_reps",
            "q.safetensors",
            "--passage_reps",
            "p.safetensors",
            "--output_path",
            "o.jsonl",
            "--dataset_cache_dir",
            "cache",
        ];
        args.extend_from_slice(input);
        args.extend_from_slice(extra);
        tevatron(d, &args)
    };
    std::fs::write(d.join("missing.jsonl"), "{\"query_id\":\"q1\",\"query_text\":\"one\",\"positive_document_ids\":[\"d1\"]}\n{\"query_id\":\"q2\",\"query_text\":\"two\",\"positive_document_ids\":[\"zz\"]}\n").unwrap();
    fails_with(
        run(&["--dataset_path", "missing.jsonl"], &[]),
        "missing.jsonl:2: query \"q2\": document id \"zz\" is not in the corpus",
    );
    // Settings that would mine nothing, or turn a filter off, without a word.
    let train = ["--dataset_path", "train.jsonl"];
    fails_with(run(&train, &["--num_negatives", "0"]), "--num_negatives must be at least 1");
    fails_with(run(&train, &["--max_score", "NaN"]), "--max_score must be a finite number");
    fails_with(run(&train, &["--absolute_margin", "inf"]), "--absolute_margin must be a finite");
    std::fs::write(d.join("bad.qrels"), "q1 0 d1 1\nq2 0 nowhere 1\n").unwrap();
    fails_with(
        run(&["--queries", "queries.jsonl", "--qrels", "bad.qrels"], &[]),
        "bad.qrels:2: query \"q2\": document id \"nowhere\"",
    );
    write_vectors(&d.join("q3.safetensors"), 3, &[1.0, 0.0, 0.0], &["q1"]);
    let wide = tevatron(
        d,
        &[
            "mine",
            "--query_reps",
            "q3.safetensors",
            "--passage_reps",
            "p.safetensors",
            "--dataset_path",
            "train.jsonl",
            "--output_path",
            "o.jsonl",
            "--dataset_cache_dir",
            "cache",
        ],
    );
    fails_with(
        wide,
        "query dimension 3 of q3.safetensors does not match passage dimension 2 of p.safetensors",
    );
    write_vectors(&d.join("empty.safetensors"), 2, &[], &[]);
    let empty = tevatron(
        d,
        &[
            "mine",
            "--query_reps",
            "q.safetensors",
            "--passage_reps",
            "empty.safetensors",
            "--dataset_path",
            "train.jsonl",
            "--output_path",
            "o.jsonl",
            "--dataset_cache_dir",
            "cache",
        ],
    );
    fails_with(empty, "hold no passage");
    std::fs::write(d.join("file"), "").unwrap();
    let unwritable = tevatron(
        d,
        &[
            "mine",
            "--query_reps",
            "q.safetensors",
            "--passage_reps",
            "p.safetensors",
            "--dataset_path",
            "train.jsonl",
            "--output_path",
            "file/o.jsonl",
            "--dataset_cache_dir",
            "cache",
        ],
    );
    fails_with(unwritable, "could not write");
    std::fs::write(
        d.join("nodocid.jsonl"),
        "{\"query_id\":\"q1\",\"query\":\"one\",\"positive_passages\":[{\"text\":\"x\"}]}\n",
    )
    .unwrap();
    fails_with(
        run(&["--dataset_path", "nodocid.jsonl"], &[]),
        "nodocid.jsonl:1: field `positive_passages`: a passage has no `docid`",
    );
    fails_with(run(TRAIN, &["--drop_same_text"]), "--drop_same_text needs the corpus texts");
    fails_with(run(TRAIN, &["--depth", "5", "--range_min", "5"]), "must lie within --depth (5)");
    fails_with(run(TRAIN, &["--depth", "5", "--range_max", "9"]), "must lie within --depth (5)");
    fails_with(
        run(
            &["--queries", "queries.jsonl", "--qrels", "qrels.txt"],
            &["--keep_existing_negatives"],
        ),
        "there is no training file",
    );
    std::fs::write(d.join("empty.jsonl"), "").unwrap();
    fails_with(run(&["--dataset_path", "empty.jsonl"], &[]), "no training rows in empty.jsonl");
    // The same passage id in two shards.
    write_vectors(&d.join("p2.safetensors"), 2, &[0.5, 0.5], &["d4"]);
    let twice = tevatron(
        d,
        &[
            "mine",
            "--query_reps",
            "q.safetensors",
            "--passage_reps",
            "p*.safetensors",
            "--dataset_path",
            "train.jsonl",
            "--output_path",
            "o.jsonl",
            "--dataset_cache_dir",
            "cache",
        ],
    );
    fails_with(
        twice,
        "passage id \"d4\" is in the passage embeddings twice (p.safetensors and p2.safetensors)",
    );
    // An existing negative missing from the corpus, when existing negatives are kept.
    std::fs::write(d.join("staleneg.jsonl"), "{\"query_id\":\"q1\",\"query_text\":\"one\",\"positive_document_ids\":[\"d1\"],\"negative_document_ids\":[\"gone\"]}\n").unwrap();
    fails_with(
        run(&["--dataset_path", "staleneg.jsonl"], &["--keep_existing_negatives"]),
        "staleneg.jsonl:1: query \"q1\": document id \"gone\"",
    );
    assert!(!d.join("o.jsonl").exists());
}
