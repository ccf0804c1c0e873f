//! `tevatron rerank` end to end with the tiny BERT cross-encoder of `testdata/tiny-reranker`:
//! a run's top documents and Tevatron's rerank input give the same output, each score equals
//! the pair scored alone through the library, the output is grouped and sorted as Tevatron
//! writes it, and bad input fails with the file, line and id.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;

mod common;
use common::{fails_with, ok, repo, tevatron};
use tevatron_model::encoder::BatchOptions;
use tevatron_model::{Encoder, EncoderOptions, PaddingSide, ScoreHeadOptions, TextOptions};

fn path(rel: &str) -> String {
    repo().join(rel).to_string_lossy().into_owned()
}

fn rerank(dir: &Path, input: &[&str], extra: &[&str]) -> std::process::Output {
    let model = path("testdata/tiny-reranker/bert");
    let mut args = vec![
        "rerank",
        "--model_name_or_path",
        &model,
        "--rerank_output_path",
        "out.txt",
        "--rerank_max_len",
        "24",
        "--per_device_eval_batch_size",
        "2",
        "--quiet",
    ];
    args.extend_from_slice(input);
    args.extend_from_slice(extra);
    tevatron(dir, &args)
}

fn lines(dir: &Path) -> Vec<(String, String, f32)> {
    std::fs::read_to_string(dir.join("out.txt"))
        .unwrap()
        .lines()
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            assert_eq!(c.len(), 3, "{l}");
            (c[0].to_string(), c[1].to_string(), c[2].parse().unwrap())
        })
        .collect()
}

/// The toy queries `(id, text)` and passages `(id, title, text)`.
type Toy = (Vec<(String, String)>, Vec<(String, String, String)>);

/// The toy queries and passages.
fn toy() -> Toy {
    let rows = |f: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(repo().join("testdata/toy").join(f))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let queries = rows("queries.jsonl")
        .iter()
        .map(|q| (s(&q["query_id"]), s(q.get("query").unwrap_or(&q["query_text"]))))
        .collect();
    let docs = rows("corpus.jsonl")
        .iter()
        .map(|d| (s(&d["docid"]), d["title"].as_str().unwrap_or("").to_string(), s(&d["text"])))
        .collect();
    (queries, docs)
}

/// Scores one pair alone (a batch of one) through the library.
fn alone(enc: &Encoder, text: String, pair: Option<(String, String)>) -> f32 {
    let opts = TextOptions { max_len: 24, ..TextOptions::default() };
    let tok = enc.tokenizer().prepare(&opts).unwrap();
    let batch = BatchOptions {
        batch_size: 1,
        token_budget: 1 << 20,
        pad_to_multiple_of: 16,
        padding_side: PaddingSide::Right,
    };
    match pair {
        None => enc.embed_sequences(&tok.tokenize(&[text]).unwrap(), &batch).unwrap()[0],
        Some(p) => {
            let (ids, types): (Vec<_>, Vec<_>) =
                tok.tokenize_pairs(&[p]).unwrap().into_iter().unzip();
            enc.embed_typed(&ids, Some(&types), &batch).unwrap()[0]
        }
    }
}

#[test]
fn a_runs_top_documents_are_rescored_as_each_pair_alone() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run.trec");
    // q1 lists four documents (depth 3 keeps d1, d3, d2), query 3 two; q1 comes first.
    std::fs::write(
        &run,
        "q1 Q0 d1 1 9 r\nq1 Q0 d3 2 8 r\nq1 Q0 d2 3 7 r\nq1 Q0 d4 4 6 r\n3 Q0 d3 1 2 r\n3 Q0 d2 2 1 r\n",
    )
    .unwrap();
    let input = [
        "--run_path",
        run.to_str().unwrap(),
        "--query_path",
        &path("testdata/toy/queries.jsonl"),
        "--corpus_path",
        &path("testdata/toy/corpus.jsonl"),
        "--rerank_depth",
        "3",
    ];
    ok(rerank(dir.path(), &input, &[]));
    let got = lines(dir.path());
    assert_eq!(got.len(), 5);
    assert!(got[..3].iter().all(|l| l.0 == "q1") && got[3..].iter().all(|l| l.0 == "3"));
    let mut q1_docs: Vec<&str> = got[..3].iter().map(|l| l.1.as_str()).collect();
    q1_docs.sort();
    assert_eq!(q1_docs, ["d1", "d2", "d3"], "depth 3 of q1");
    for w in got.windows(2).filter(|w| w[0].0 == w[1].0) {
        assert!(w[0].2 >= w[1].2, "each query's lines by descending score: {got:?}");
    }
    let opts = EncoderOptions {
        score_head: Some(ScoreHeadOptions { init_missing: false, seed: 0 }),
        ..EncoderOptions::default()
    };
    let enc = Encoder::load(&repo().join("testdata/tiny-reranker/bert"), None, &opts).unwrap();
    let (queries, docs) = toy();
    let query = |id: &str| queries.iter().find(|q| q.0 == id).unwrap().1.clone();
    let doc = |id: &str| docs.iter().find(|d| d.0 == id).unwrap().clone();
    for (qid, docid, score) in &got {
        let (_, title, text) = doc(docid);
        let formatted =
            tevatron_ir::rerank::format_pair(&query(qid), &text, &title, "query:", "passage:");
        let want = alone(&enc, formatted, None);
        assert!((score - want).abs() <= 1e-5, "{qid} {docid}: {score} vs {want}");
    }

    // Tevatron's rerank input with the same pairs gives the same file.
    let mut rows = String::new();
    for (qid, docid, _) in &got {
        let (_, title, text) = doc(docid);
        let row = serde_json::json!({"query_id": qid, "query": query(qid), "docid": docid, "title": title, "text": text});
        rows.push_str(&format!("{row}\n"));
    }
    std::fs::write(dir.path().join("input.jsonl"), rows).unwrap();
    let first = std::fs::read_to_string(dir.path().join("out.txt")).unwrap();
    ok(rerank(dir.path(), &["--dataset_path", "input.jsonl"], &[]));
    assert_eq!(std::fs::read_to_string(dir.path().join("out.txt")).unwrap(), first);
    // Two shards (Tevatron's --dataset_number_of_shards): q1's three pairs, then query 3's two.
    let shards = |n: usize| {
        let mut all = String::new();
        for index in 0..n {
            let (n, index) = (n.to_string(), index.to_string());
            let shard = ["--dataset_number_of_shards", &n, "--dataset_shard_index", &index];
            ok(rerank(dir.path(), &["--dataset_path", "input.jsonl"], &shard));
            all += &std::fs::read_to_string(dir.path().join("out.txt")).unwrap();
        }
        all
    };
    assert_eq!(shards(2), first);
    // Three (2, 2, 1 pairs) cut q1's pairs: every line once, each shard sorted in itself; six
    // leave one shard empty.
    for n in [3, 6] {
        let mut got: Vec<String> = shards(n).lines().map(String::from).collect();
        let mut want: Vec<String> = first.lines().map(String::from).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{n} shards");
    }
    let bad = ["--dataset_number_of_shards", "2", "--dataset_shard_index", "2"];
    fails_with(rerank(dir.path(), &["--dataset_path", "input.jsonl"], &bad), "must be below");

    // The text-pair form scores (query, title text) with token types, as CrossEncoder does.
    ok(rerank(dir.path(), &["--dataset_path", "input.jsonl"], &["--pair_format", "pair"]));
    let pair = lines(dir.path());
    assert_eq!(pair.len(), got.len(), "one score per pair");
    for (qid, docid, score) in pair {
        let (_, title, text) = doc(&docid);
        let passage = if title.is_empty() { text } else { format!("{title} {text}") };
        let want = alone(&enc, String::new(), Some((query(&qid), passage)));
        assert!((score - want).abs() <= 1e-5, "pair {qid} {docid}: {score} vs {want}");
    }
}

#[test]
fn bad_input_names_the_file_line_and_id_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run.tsv");
    std::fs::write(&run, "q1\td1\t2\nq1\tnope\t1\n").unwrap();
    let texts = [
        "--query_path",
        &path("testdata/toy/queries.jsonl"),
        "--corpus_path",
        &path("testdata/toy/corpus.jsonl"),
    ];
    let mut input = vec!["--run_path", run.to_str().unwrap()];
    input.extend_from_slice(&texts);
    fails_with(rerank(dir.path(), &input, &[]), "run.tsv:2: document \"nope\" is not in");
    std::fs::write(&run, "q1\td1\t2\nq9\td1\t1\n").unwrap();
    fails_with(rerank(dir.path(), &input, &[]), "run.tsv:2: query \"q9\" is not in");
    // Flags of a rerank input, which the run's texts do not come from (they were taken silently).
    for flag in [["--dataset_split", "test"], ["--dataset_cache_dir", "cache"]] {
        fails_with(rerank(dir.path(), &input, &flag), "name a rerank input; with --run_path");
    }
    assert!(!dir.path().join("out.txt").exists());
    // A base model is not a reranker.
    std::fs::write(
        dir.path().join("in.jsonl"),
        "{\"query_id\": 1, \"query\": \"q\", \"docid\": \"a\", \"text\": \"x\"}\n",
    )
    .unwrap();
    let out = tevatron(
        dir.path(),
        &[
            "rerank",
            "--model_name_or_path",
            &path("testdata/tiny/bert"),
            "--dataset_path",
            "in.jsonl",
            "--rerank_output_path",
            "out.txt",
        ],
    );
    fails_with(out, "no score head");
    assert!(!dir.path().join("out.txt").exists());
    fails_with(
        rerank(dir.path(), &["--run_path", "x"], &[]),
        "needs --query_path and --corpus_path",
    );
}
