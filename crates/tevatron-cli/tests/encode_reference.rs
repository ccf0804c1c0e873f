//! What `tevatron encode` writes, compared with references: all-MiniLM-L6-v2 (a
//! sentence-transformers folder, fetched by `scripts/fetch-minilm.sh`) against the committed
//! transformers and sentence-transformers outputs of `scripts/fixtures/make_minilm.py`, for each
//! combination of `--pooling` and `--normalize`; and the text flags (`--query_max_len`, the
//! prefixes, `--encode_is_query`) checked to change what is encoded as they say. A command that
//! dropped any of these flags would write other vectors and fail here.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor};
use common::{ok, tevatron};
use tevatron_model::testing::{max_abs_diff, minilm_dir, minilm_fixture, EMBEDDING_ATOL};

/// Writes `texts` as a corpus (`docid`, `text`) and as queries (`query_id`, `query`), each text
/// with `prefix` put before it.
fn write_inputs(dir: &Path, texts: &[String], prefix: &str) -> (String, String) {
    let mut corpus = String::new();
    let mut queries = String::new();
    for (i, t) in texts.iter().enumerate() {
        let t = format!("{prefix}{t}");
        corpus += &serde_json::json!({"docid": format!("d{i}"), "text": t}).to_string();
        corpus.push('\n');
        queries += &serde_json::json!({"query_id": format!("q{i}"), "query": t}).to_string();
        queries.push('\n');
    }
    let tag = if prefix.is_empty() { "plain" } else { "prefixed" };
    let (c, q) =
        (dir.join(format!("corpus.{tag}.jsonl")), dir.join(format!("queries.{tag}.jsonl")));
    std::fs::write(&c, corpus).unwrap();
    std::fs::write(&q, queries).unwrap();
    (c.to_string_lossy().into_owned(), q.to_string_lossy().into_owned())
}

/// Runs `tevatron encode` on `input` with `flags` and returns the embeddings in input order
/// (rows looked up by id, so a reordering would not hide) and their ids.
fn encode(dir: &Path, model: &Path, input: &str, flags: &[&str]) -> (Tensor, Vec<String>) {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let out = dir.join(format!("emb{}.safetensors", RUN.fetch_add(1, Ordering::Relaxed)));
    let model = model.to_string_lossy();
    let out_s = out.to_string_lossy();
    let mut args = vec![
        "encode",
        "--model_name_or_path",
        &model,
        "--dataset_path",
        input,
        "--encode_output_path",
        &out_s,
        "--per_device_eval_batch_size",
        "4",
        "--quiet",
    ];
    args.extend_from_slice(flags);
    ok(tevatron(dir, &args));
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let ids_bytes = t["ids"].to_vec1::<u8>().unwrap();
    let ids: Vec<String> =
        String::from_utf8(ids_bytes).unwrap().split('\n').map(str::to_string).collect();
    std::fs::remove_file(&out).unwrap();
    (t["embeddings"].clone(), ids)
}

fn check(got: &Tensor, want: &Tensor, what: &str) {
    let d = max_abs_diff(got, want).unwrap();
    assert!(d <= EMBEDDING_ATOL, "{what}: max abs difference {d} (tolerance {EMBEDDING_ATOL})");
}

fn norms(t: &Tensor) -> Vec<f32> {
    t.sqr().unwrap().sum(1).unwrap().sqrt().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn pooling_and_normalize_flags_on_a_sentence_transformers_folder_match_the_references() {
    let Some(model) = minilm_dir() else { return };
    let (texts, exp) = minilm_fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, queries) = write_inputs(tmp.path(), &texts, "");
    let want_ids: Vec<String> = (0..texts.len()).map(|i| format!("d{i}")).collect();

    // No flag: the folder's own modules (mean + normalize), sentence-transformers' vectors.
    let (got, ids) = encode(tmp.path(), &model, &corpus, &["--passage_max_len", "256"]);
    assert_eq!(ids, want_ids);
    check(&got, &exp["mean_norm"], "no flags");

    // Both given, the folder's own settings spelled out: the same vectors.
    let flags = ["--passage_max_len", "256", "--pooling", "mean", "--normalize"];
    check(&encode(tmp.path(), &model, &corpus, &flags).0, &exp["mean_norm"], "mean + normalize");

    // --pooling cls alone: transformers' raw CLS vectors; the folder's Normalize does not apply.
    let flags = ["--passage_max_len", "512", "--pooling", "cls"];
    let (got, _) = encode(tmp.path(), &model, &corpus, &flags);
    check(&got, &exp["cls"], "--pooling cls");
    assert!(norms(&got).iter().all(|n| *n > 2.0), "raw CLS vectors are not unit length");

    // --normalize false alone (argparse's bool form): Tevatron's default pooling, cls, raw.
    let flags = ["--passage_max_len", "512", "--normalize", "false"];
    check(&encode(tmp.path(), &model, &corpus, &flags).0, &exp["cls"], "--normalize false");

    // --normalize alone: cls pooling, normalised.
    let flags = ["--passage_max_len", "512", "--normalize"];
    let want = exp["cls"]
        .broadcast_div(&exp["cls"].sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap())
        .unwrap();
    check(&encode(tmp.path(), &model, &corpus, &flags).0, &want, "--normalize");

    // Queries: --encode_is_query reads the query file and --query_max_len cuts at 32 tokens
    // (the passage length would be the default 128 and give other vectors for the long text).
    let flags = ["--encode_is_query", "--query_max_len", "32", "--pooling", "cls"];
    let (got, ids) = encode(tmp.path(), &model, &queries, &flags);
    assert_eq!(ids, (0..texts.len()).map(|i| format!("q{i}")).collect::<Vec<_>>());
    check(&got, &exp["cls32"], "--encode_is_query --query_max_len 32 --pooling cls");
}

#[test]
fn prefixes_and_lengths_change_what_is_encoded_as_they_say() {
    let Some(model) = minilm_dir() else { return };
    let (texts, _) = minilm_fixture();
    let tmp = tempfile::tempdir().unwrap();
    let prefix = "query: ";
    let (corpus, queries) = write_inputs(tmp.path(), &texts, "");
    let (corpus_p, queries_p) = write_inputs(tmp.path(), &texts, prefix);
    let q = ["--encode_is_query", "--query_max_len", "64"];

    // --query_prefix equals the prefix written into the texts, and differs from no prefix.
    let with_flag =
        encode(tmp.path(), &model, &queries, &[&q[..], &["--query_prefix", prefix]].concat()).0;
    let written = encode(tmp.path(), &model, &queries_p, &q).0;
    let plain = encode(tmp.path(), &model, &queries, &q).0;
    check(&with_flag, &written, "--query_prefix");
    assert!(max_abs_diff(&with_flag, &plain).unwrap() > 0.01, "--query_prefix changed nothing");
    // The passage prefix is not used for queries.
    let ignored =
        encode(tmp.path(), &model, &queries, &[&q[..], &["--passage_prefix", prefix]].concat()).0;
    check(&ignored, &plain, "--passage_prefix on queries");

    // --passage_prefix likewise for passages.
    let p = ["--passage_max_len", "64"];
    let with_flag =
        encode(tmp.path(), &model, &corpus, &[&p[..], &["--passage_prefix", prefix]].concat()).0;
    let written = encode(tmp.path(), &model, &corpus_p, &p).0;
    check(&with_flag, &written, "--passage_prefix");

    // --passage_max_len cuts passages: the long text (index 2, over 512 tokens) changes between
    // 16 and 64 tokens; --query_max_len does not apply to passages.
    let short = encode(tmp.path(), &model, &corpus, &["--passage_max_len", "16"]).0;
    let long = encode(tmp.path(), &model, &corpus, &["--passage_max_len", "64"]).0;
    let row = |t: &Tensor| t.get(2).unwrap().unsqueeze(0).unwrap();
    assert!(max_abs_diff(&row(&short), &row(&long)).unwrap() > 0.01, "--passage_max_len ignored");
    let q_len =
        encode(tmp.path(), &model, &corpus, &["--passage_max_len", "64", "--query_max_len", "16"])
            .0;
    check(&q_len, &long, "--query_max_len on passages");
}
