//! End-to-end tests of the real binary in temporary folders (ripgrep's style): encode → search
//! → eval on `testdata/toy` with the tiny BERT, sharding, and every bad input the issues list
//! (exit code 2, a one-line cause chain, no partial output file).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::Output;

mod common;
use common::{copy_dir, fails_with, names, ok, repo, tevatron};

fn toy(f: &str) -> String {
    repo().join("testdata/toy").join(f).to_string_lossy().into_owned()
}
fn tiny(name: &str) -> String {
    repo().join("testdata/tiny").join(name).to_string_lossy().into_owned()
}

fn encode(dir: &Path, input: &str, out: &str, extra: &[&str]) -> Output {
    let args = encode_args(input, out, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    tevatron(dir, &refs)
}

/// The arguments of [`encode`]: the tiny BERT, short lengths, mean pooling, quiet.
fn encode_args(input: &str, out: &str, extra: &[&str]) -> Vec<String> {
    let model = tiny_bert();
    let mut args = vec![
        "encode",
        "--model_name_or_path",
        &model,
        "--dataset_path",
        input,
        "--encode_output_path",
        out,
        "--passage_max_len",
        "12",
        "--query_max_len",
        "8",
        "--pooling",
        "mean",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    args.iter().map(|s| s.to_string()).collect()
}

fn tiny_bert() -> String {
    tiny("bert")
}

#[test]
fn encode_search_eval_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(encode(d, &toy("corpus.jsonl"), "emb/corpus.safetensors", &[]));
    ok(encode(d, &toy("queries.jsonl"), "emb/queries.safetensors", &["--encode_is_query"]));
    let search_to = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "search",
            "--query_reps",
            "emb/queries.safetensors",
            "--passage_reps",
            "emb/corpus*.safetensors",
            "--depth",
            "5",
            "--save_ranking_to",
            out,
        ];
        args.extend(extra);
        ok(tevatron(d, &args))
    };
    search_to("run.tsv", &["--save_text"]);
    let run = std::fs::read_to_string(d.join("run.tsv")).unwrap();
    assert_eq!(run.lines().count(), 15, "3 queries x depth 5");
    let qids: Vec<&str> = run.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(qids[0], "q1");
    assert_eq!(qids[14], "3", "integer ids are written in decimal");
    let out = ok(tevatron(
        d,
        &[
            "eval",
            "--qrels",
            &toy("qrels.txt"),
            "--run",
            "run.tsv",
            "-m",
            "ndcg@10",
            "-m",
            "recall.5",
            "--json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The metrics from the written run by their definitions (trec_eval's: the gain is the
    // relevance grade, log2 discounts; no ties: the scores differ), over the 3 judged queries.
    let qrels: Vec<(String, String, f64)> = std::fs::read_to_string(toy("qrels.txt"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[2].to_string(), f[3].parse().unwrap())
        })
        .collect();
    let (mut ndcg_sum, mut recall_sum) = (0.0, 0.0);
    for q in ["q1", "q2", "3"] {
        let rel =
            |doc: &str| qrels.iter().find(|(qq, dd, _)| qq == q && dd == doc).map_or(0.0, |r| r.2);
        let ranked: Vec<&str> = run
            .lines()
            .filter(|l| l.starts_with(&format!("{q}\t")))
            .map(|l| l.split('\t').nth(1).unwrap())
            .collect();
        let dcg: f64 =
            ranked.iter().enumerate().map(|(i, d)| rel(d) / (i as f64 + 2.0).log2()).sum();
        let mut ideal: Vec<f64> = qrels.iter().filter(|r| r.0 == q).map(|r| r.2).collect();
        ideal.sort_by(|a, b| b.total_cmp(a));
        let idcg: f64 = ideal.iter().enumerate().map(|(i, r)| r / (i as f64 + 2.0).log2()).sum();
        ndcg_sum += dcg / idcg;
        let judged = ideal.len() as f64;
        recall_sum += ranked.iter().take(5).filter(|d| rel(d) > 0.0).count() as f64 / judged;
    }
    let ndcg = v["ndcg@10"].as_f64().unwrap();
    assert!((ndcg - ndcg_sum / 3.0).abs() < 1e-4, "{out}: by definition {}", ndcg_sum / 3.0);
    let recall = v["recall.5"].as_f64().unwrap();
    assert!((recall - recall_sum / 3.0).abs() < 1e-4, "{out}: by definition {}", recall_sum / 3.0);
    // Conversion to TREC then eval gives the same numbers.
    ok(tevatron(d, &["convert", "--to", "trec", "--input", "run.tsv", "--output", "run.trec"]));
    let out2 = ok(tevatron(
        d,
        &[
            "eval",
            "--qrels",
            &toy("qrels.txt"),
            "--run",
            "run.trec",
            "-m",
            "ndcg@10",
            "-m",
            "recall.5",
            "--json",
        ],
    ));
    assert_eq!(out, out2);
    // The safetensors ranking holds the same top hit, and the same search gives the same
    // bytes: its header's keys in a fixed order.
    search_to("run.safetensors", &[]);
    let bytes = std::fs::read(d.join("run.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("scores").unwrap().shape(), [3, 5]);
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["format"], "tevatron-ranking-v1");
    assert_eq!(meta["depth"], "5");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert!(
        std::str::from_utf8(&bytes[8..8 + header_len])
            .unwrap()
            .starts_with(r#"{"__metadata__":{"depth":"5","format":"tevatron-ranking-v1"},"#),
        "the header's keys in a fixed order"
    );
    for again in ["run2.safetensors", "run3.safetensors"] {
        search_to(again, &[]);
        assert!(std::fs::read(d.join(again)).unwrap() == bytes, "{again} differs");
    }
    let docids = String::from_utf8(st.tensor("docids").unwrap().data().to_vec()).unwrap();
    assert_eq!(
        docids.split('\n').next().unwrap(),
        run.lines().next().unwrap().split('\t').nth(1).unwrap()
    );
}

#[test]
fn shards_cover_the_corpus_and_search_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(encode(d, &toy("corpus.jsonl"), "full.safetensors", &[]));
    for i in 0..3 {
        let idx = i.to_string();
        ok(encode(
            d,
            &toy("corpus.jsonl"),
            &format!("shard.{i}.safetensors"),
            &["--dataset_number_of_shards", "3", "--dataset_shard_index", &idx],
        ));
    }
    ok(encode(d, &toy("queries.jsonl"), "q.safetensors", &["--encode_is_query"]));
    let search = |glob: &str, out: &str, extra: &[&str]| {
        let mut a = vec![
            "search",
            "--query_reps",
            "q.safetensors",
            "--passage_reps",
            glob,
            "--depth",
            "7",
            "--save_ranking_to",
            out,
            "--save_text",
            "--batch_size",
            "2",
        ];
        a.extend_from_slice(extra);
        ok(tevatron(d, &a));
        std::fs::read_to_string(d.join(out)).unwrap()
    };
    let full = search("full.safetensors", "a.tsv", &[]);
    assert_eq!(search("shard.*.safetensors", "b.tsv", &[]), full);
    assert_eq!(search("shard.*.safetensors", "c.tsv", &["--shard_search"]), full);
    // A batch far beyond the query count (i64::MAX queries of the vectors' width would
    // overflow the batch's length) is every query at once.
    let mut huge: Vec<&str> = vec!["search", "--query_reps", "q.safetensors"];
    huge.extend(["--passage_reps", "full.safetensors", "--depth", "7", "--save_text"]);
    huge.extend(["--save_ranking_to", "d.tsv", "--batch_size", "9223372036854775807"]);
    ok(tevatron(d, &huge));
    assert_eq!(std::fs::read_to_string(d.join("d.tsv")).unwrap(), full);
}

/// `encode --nproc_per_node 3` (three processes on the CPU) writes what one process writes:
/// the same ids in the same order and the same vectors (other batches, so within float noise),
/// says so, and leaves no parts behind. A rerun after a failure encodes only the missing parts:
/// a part left by the same flags is kept as it is (here rewritten with negated values, so it
/// shows); parts made with other flags are cleared first; a merge refuses parts of different
/// models.
#[test]
fn several_processes_encode_what_one_does_and_resume_from_their_parts() {
    use tevatron_ir::vectors::{VecDType, VectorWriter, Vectors};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let corpus = toy("corpus.jsonl");
    ok(encode(d, &corpus, "one.safetensors", &[]));
    let procs = ["--nproc_per_node", "3", "--device", "cpu"];
    // Not quiet: the log says what happened.
    let args = |out: &str| -> Vec<String> {
        encode_args(&corpus, out, &procs).into_iter().filter(|a| a != "--quiet").collect()
    };
    let run = |out: &'static str| {
        let a = args(out);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        tevatron(d, &refs)
    };
    let out = run("three.safetensors");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("wrote 7 embeddings from 3 processes"), "{log}");
    let read = |name: &str| {
        let v = Vectors::open(&d.join(name)).unwrap();
        (v.ids().iter().map(str::to_string).collect::<Vec<_>>(), v.to_f32())
    };
    let (ids, one) = read("one.safetensors");
    let (ids3, three) = read("three.safetensors");
    assert_eq!(ids3, ids);
    assert_eq!(ids.len(), 7);
    let diff = tevatron_model::testing::max_abs_diff_of(&one, &three);
    assert!(diff < 1e-5, "three processes differ from one by {diff}");
    assert!(!d.join("three.safetensors.parts").exists(), "the parts were not removed");

    // The merge fails (the output's name is taken by a folder): the three parts stay.
    std::fs::create_dir(d.join("resumed.safetensors")).unwrap();
    assert_eq!(run("resumed.safetensors").status.code(), Some(2));
    std::fs::remove_dir(d.join("resumed.safetensors")).unwrap();
    let parts = d.join("resumed.safetensors.parts");
    let part = |k: usize| parts.join(format!("part-{k:05}-of-00003.safetensors"));
    assert!((0..3).all(|k| part(k).exists()));
    // Parts 0 and 2 were lost; part 1 (rows 3 and 4) is replaced by its negation.
    std::fs::remove_file(part(0)).unwrap();
    std::fs::remove_file(part(2)).unwrap();
    let kept = Vectors::open(&part(1)).unwrap();
    let mut meta = kept.metadata().clone();
    meta.remove("format");
    meta.remove("dtype");
    let negated: Vec<f32> = kept.to_f32().iter().map(|v| -v).collect();
    let kept_ids: Vec<String> = kept.ids().iter().map(str::to_string).collect();
    let mut w = VectorWriter::create(&part(1), kept.dim(), kept.dtype(), meta).unwrap();
    w.push(&negated, &kept_ids).unwrap();
    drop(kept);
    w.finish().unwrap();
    std::fs::write(parts.join("part-00000-of-00003.safetensors.tmp.1.0"), "half").unwrap();
    let out = run("resumed.safetensors");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("resuming: 1 of 3 parts already written"), "{log}");
    let (ids_r, resumed) = read("resumed.safetensors");
    assert_eq!(ids_r, ids);
    let width = one.len() / 7;
    let rows = |v: &[f32], r: std::ops::Range<usize>| v[r.start * width..r.end * width].to_vec();
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
    assert!(close(&rows(&resumed, 0..3), &rows(&one, 0..3)));
    assert!(close(&rows(&resumed, 5..7), &rows(&one, 5..7)));
    let minus: Vec<f32> = rows(&one, 3..5).iter().map(|v| -v).collect();
    assert!(close(&rows(&resumed, 3..5), &minus), "the kept part was encoded again");

    // A part of another model (its metadata) is refused at the merge.
    std::fs::create_dir(d.join("mixed.safetensors")).unwrap();
    assert_eq!(run("mixed.safetensors").status.code(), Some(2));
    std::fs::remove_dir(d.join("mixed.safetensors")).unwrap();
    let mixed = d.join("mixed.safetensors.parts/part-00002-of-00003.safetensors");
    let other = Vectors::open(&mixed).unwrap();
    let mut meta = other.metadata().clone();
    meta.remove("format");
    meta.remove("dtype");
    meta.insert("model".into(), "another-model".into());
    let (values, other_ids) =
        (other.to_f32(), other.ids().iter().map(str::to_string).collect::<Vec<_>>());
    drop(other);
    let mut w = VectorWriter::create(&mixed, width, VecDType::F32, meta).unwrap();
    w.push(&values, &other_ids).unwrap();
    w.finish().unwrap();
    fails_with(run("mixed.safetensors"), "delete the parts folder and encode again");

    // Parts made with other flags are cleared, not merged.
    let stale = d.join("stale.safetensors.parts");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::copy(d.join("resumed.safetensors"), stale.join("part-00001-of-00003.safetensors"))
        .unwrap();
    std::fs::write(stale.join("flags.txt"), "other flags").unwrap();
    let out = run("stale.safetensors");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("holds parts made with other flags: cleared"), "{log}");
    // A folder of that name this tool did not make is refused, and kept.
    let foreign = d.join("foreign.safetensors.parts");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    fails_with(run("foreign.safetensors"), "is not a parts folder of this tool");
    assert!(foreign.join("notes.txt").exists());
    let (ids_s, fresh) = read("stale.safetensors");
    assert_eq!(ids_s, ids);
    let diff = tevatron_model::testing::max_abs_diff_of(&one, &fresh);
    assert!(diff < 1e-5, "stale parts were merged ({diff})");
    fails_with(
        encode(d, &corpus, "x.safetensors", &["--nproc_per_node", "0"]),
        "--nproc_per_node must be at least 1",
    );
    // Bad flags are refused once, before any process starts.
    fails_with(
        encode(
            d,
            &corpus,
            "y.safetensors",
            &["--nproc_per_node", "2", "--dataset_shard_index", "5"],
        ),
        "--dataset_shard_index 5 must be below --dataset_number_of_shards 1",
    );
    assert!(!d.join("y.safetensors.parts").exists());
    // Parts of an input file that changed since (same flags) are cleared, not merged with
    // parts of the new one (they were: old rows kept, new rows missing).
    std::fs::copy(&corpus, d.join("c.jsonl")).unwrap();
    let run_on = |out: &str| {
        let a = encode_args("c.jsonl", out, &procs);
        let refs: Vec<&str> = a.iter().map(String::as_str).filter(|a| *a != "--quiet").collect();
        tevatron(d, &refs)
    };
    std::fs::create_dir(d.join("changed.safetensors")).unwrap();
    assert_eq!(run_on("changed.safetensors").status.code(), Some(2));
    std::fs::remove_dir(d.join("changed.safetensors")).unwrap();
    let mut text = std::fs::read_to_string(d.join("c.jsonl")).unwrap();
    text.insert_str(0, "{\"docid\": \"new\", \"text\": \"a new first row\"}\n");
    std::fs::write(d.join("c.jsonl"), text).unwrap();
    let out = run_on("changed.safetensors");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("holds parts made with other flags: cleared"), "{log}");
    let (ids_c, _) = read("changed.safetensors");
    assert_eq!(ids_c.len(), 8, "{ids_c:?}");
    assert_eq!(ids_c[0], "new");
    // A model that does not exist is named once, before any process starts.
    let mut a = encode_args("c.jsonl", "m.safetensors", &procs);
    let at = a.iter().position(|x| x == "--model_name_or_path").unwrap();
    a[at + 1] = "./no-such-model".into();
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let line = fails_with(tevatron(d, &refs), "no-such-model");
    assert!(!line.contains("rank"), "{line}");
    assert!(!d.join("m.safetensors.parts").exists());
}

#[test]
fn gzip_input_and_json_argument_file_work() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let plain = std::fs::read(toy("corpus.jsonl")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), Default::default());
    std::io::Write::write_all(&mut gz, &plain).unwrap();
    std::fs::write(d.join("corpus.jsonl.gz"), gz.finish().unwrap()).unwrap();
    let args = serde_json::json!({
        "model_name_or_path": tiny_bert(), "dataset_path": "corpus.jsonl.gz",
        "encode_output_path": "gz.safetensors", "passage_max_len": 12, "pooling": "mean", "quiet": true,
    });
    std::fs::write(d.join("args.json"), args.to_string()).unwrap();
    ok(tevatron(d, &["encode", "args.json"]));
    ok(encode(d, &toy("corpus.jsonl"), "plain.safetensors", &[]));
    let a = safetensors_bytes(&d.join("gz.safetensors"));
    let b = safetensors_bytes(&d.join("plain.safetensors"));
    assert_eq!(a, b);
    // A flag the arguments file should not hold: the message names the file.
    std::fs::write(d.join("bad-args.json"), r#"{"qrelz": "x", "run": "r"}"#).unwrap();
    fails_with(
        tevatron(d, &["eval", "bad-args.json"]),
        "in the arguments file bad-args.json: unexpected argument '--qrelz'",
    );
}

fn safetensors_bytes(p: &Path) -> Vec<u8> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v = st.tensor("embeddings").unwrap().data().to_vec();
    v.extend_from_slice(st.tensor("ids").unwrap().data());
    v
}

#[test]
fn bad_model_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let corpus = toy("corpus.jsonl");
    let run = |model: &str| common::encode_toy(d, model, "o.safetensors", &["--quiet"]);
    fails_with(run("./no/such/model"), "model folder ./no/such/model does not exist");
    // Unknown model type.
    let m = d.join("gpt");
    std::fs::create_dir(&m).unwrap();
    std::fs::write(m.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    fails_with(
        run(m.to_str().unwrap()),
        "model_type \"gpt2\" is not supported (supported: bert, roberta, xlm-roberta, distilbert, modernbert, llama, mistral, qwen2, qwen3)",
    );
    // Missing weights, then truncated weights.
    let m = d.join("broken");
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(Path::new(&tiny_bert()).join(f), m.join(f)).unwrap();
    }
    fails_with(run(m.to_str().unwrap()), "no weights (looked for model.safetensors");
    let w = std::fs::read(Path::new(&tiny_bert()).join("model.safetensors")).unwrap();
    std::fs::write(m.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    fails_with(run(m.to_str().unwrap()), "model.safetensors: cannot read weights");
    // Lengths the flags cannot hold: BERT's [CLS] and [SEP] fill a max length of 2, and a
    // padding multiple past any model's positions.
    let flags = |extra: &[&str]| {
        let mut a: Vec<&str> = vec!["--quiet"];
        a.extend_from_slice(extra);
        common::encode_toy(d, &tiny_bert(), "o.safetensors", &a)
    };
    fails_with(
        flags(&["--passage_max_len", "2"]),
        "max length 2 leaves no room for text: the tokenizer adds 2",
    );
    let out = flags(&["--pad_to_multiple_of", "4611686018427387904"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("at most 1048576") && !err.contains("panicked"), "{err}");
    assert!(!d.join("o.safetensors").exists());
    // LoRA encoding is refused, not ignored.
    let out = tevatron(
        d,
        &[
            "encode",
            "--model_name_or_path",
            &tiny_bert(),
            "--dataset_path",
            &corpus,
            "--encode_output_path",
            "o.safetensors",
            "--lora_name_or_path",
            "./no-adapter",
        ],
    );
    fails_with(out, "adapter folder ./no-adapter does not exist");
    let out = tevatron(
        d,
        &[
            "encode",
            "--model_name_or_path",
            &tiny_bert(),
            "--dataset_path",
            &corpus,
            "--encode_output_path",
            "o.safetensors",
            "--device",
            "cuda",
        ],
    );
    fails_with(out, "this binary was built without CUDA");
    // Another model's tokenizer: ids past the tiny BERT's 104 embedding rows, named as a
    // mismatch (a GPU lookup would read past the table).
    let line = fails_with(flags(&["--tokenizer_name", &tiny("roberta")]), "token id ");
    assert!(line.contains("past the 104 rows") && line.contains("roberta"), "{line}");
    // A tokenizer whose `Precompiled` normalizer loads but panics inside the tokenizers crate
    // when it encodes (an index out of bounds): one error naming the file, and no panic
    // report above it (fails_with checks).
    let m = d.join("bad-normalizer");
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "tokenizer_config.json", "model.safetensors"] {
        std::fs::copy(Path::new(&tiny_bert()).join(f), m.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(Path::new(&tiny_bert()).join("tokenizer.json")).unwrap();
    let mut tokenizer: serde_json::Value = serde_json::from_str(&text).unwrap();
    tokenizer["normalizer"] =
        serde_json::json!({"type": "Precompiled", "precompiled_charsmap": "AQAAAA=="});
    std::fs::write(m.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let line = fails_with(run(m.to_str().unwrap()), "the tokenizer failed");
    assert!(line.contains("bad-normalizer/tokenizer.json"), "{line}");
    assert!(!d.join("o.safetensors").exists());
    // A config whose layer norm divides by the root of a negative number: the embeddings
    // would be NaN, and were written (search refused them later, by row only).
    let m = d.join("negative-eps");
    std::fs::create_dir(&m).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        std::fs::copy(Path::new(&tiny_bert()).join(f), m.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(Path::new(&tiny_bert()).join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["layer_norm_eps"] = serde_json::json!(-1e9);
    std::fs::write(m.join("config.json"), config.to_string()).unwrap();
    // A shape candle refuses, with RUST_BACKTRACE set (as some machines set it for every
    // process): one line, without candle's backtrace spliced into it.
    let heads = d.join("heads");
    copy_dir(Path::new(&tiny_bert()), &heads);
    let mut c = config.clone();
    c["layer_norm_eps"] = serde_json::json!(1e-12);
    c["num_attention_heads"] = serde_json::json!(5);
    std::fs::write(heads.join("config.json"), c.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tevatron"))
        .current_dir(d)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE")
        .args(["encode", "--model_name_or_path", "heads", "--dataset_path", &corpus])
        .args(["--encode_output_path", "o.safetensors", "--quiet"])
        .output()
        .unwrap();
    let line = fails_with(out, "hidden_size is not a multiple of num_attention_heads)");
    assert!(!line.contains("candle_core"), "{line}");
    let line = fails_with(run(m.to_str().unwrap()), "holds NaN: the forward pass of");
    assert!(line.contains("the embedding of \"") && line.contains("negative-eps"), "{line}");
    assert!(!d.join("o.safetensors").exists());
}

#[test]
fn bad_data_inputs_name_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "malformed.jsonl",
            b"{\"docid\":\"1\",\"text\":\"a\"}\n{\"docid\": \n",
            "malformed.jsonl:2: malformed JSON",
        ),
        (
            "noid.jsonl",
            b"{\"docid\":\"1\",\"text\":\"a\"}\n\n{\"text\":\"b\"}\n",
            "noid.jsonl:3: missing field `docid`",
        ),
        ("notext.jsonl", b"{\"docid\":\"1\"}\n", "notext.jsonl:1: missing field `text`"),
        (
            "latin1.jsonl",
            b"{\"docid\":\"1\",\"text\":\"caf\xe9\"}\n",
            "latin1.jsonl:1: text is not valid UTF-8",
        ),
    ];
    for (name, body, needle) in cases {
        std::fs::write(d.join(name), body).unwrap();
        fails_with(encode(d, name, "out/e.safetensors", &[]), needle);
        assert!(
            !d.join("out").exists() || names(&d.join("out")).is_empty(),
            "partial output left: {:?}",
            names(&d.join("out"))
        );
    }
    // A newline inside an id cannot be stored: the message names the input file, line and field.
    let nl = b"{\"docid\":\"a\",\"text\":\"x\"}\n{\"docid\":\"a\\nb\",\"text\":\"x\"}\n";
    std::fs::write(d.join("nl.jsonl"), nl).unwrap();
    fails_with(
        encode(d, "nl.jsonl", "out/e.safetensors", &[]),
        "nl.jsonl:2: field `docid`: id \"a\\nb\" contains a newline",
    );
    let nlq = b"{\"query_id\":\"q\\n1\",\"query\":\"x\"}\n";
    std::fs::write(d.join("nlq.jsonl"), nlq).unwrap();
    fails_with(
        encode(d, "nlq.jsonl", "out/e.safetensors", &["--encode_is_query"]),
        "nlq.jsonl:1: field `query_id`",
    );
    // An output path that cannot be written (its parent is a file).
    std::fs::write(d.join("file"), b"").unwrap();
    fails_with(encode(d, &toy("corpus.jsonl"), "file/e.safetensors", &[]), "could not write");
    fails_with(encode(d, "nothing*.jsonl", "e.safetensors", &[]), "no file matches");
}

#[test]
fn bad_search_and_eval_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(encode(d, &toy("corpus.jsonl"), "c.safetensors", &[]));
    ok(encode(d, &toy("queries.jsonl"), "q.safetensors", &["--encode_is_query"]));
    let search = |q: &str, p: &str, depth: &str| {
        tevatron(
            d,
            &[
                "search",
                "--query_reps",
                q,
                "--passage_reps",
                p,
                "--depth",
                depth,
                "--save_ranking_to",
                "r.tsv",
                "--save_text",
            ],
        )
    };
    fails_with(search("q.safetensors", "none*.safetensors", "5"), "no file matches");
    std::fs::write(d.join("junk.safetensors"), b"not a header").unwrap();
    fails_with(search("q.safetensors", "junk.safetensors", "5"), "not a readable safetensors file");
    // Tevatron's encode output, pickle.dumps((reps, ids), protocol=4) in its first bytes.
    std::fs::write(d.join("corpus.pkl"), b"\x80\x04\x95\x8b\x00\x00\x00\x00\x00\x00\x00\x8c")
        .unwrap();
    fails_with(search("q.safetensors", "corpus.pkl", "5"), "scripts/pickle-to-safetensors.py");
    // An output naming an input of another kind is refused, and the input kept.
    let before = std::fs::read(d.join("q.safetensors")).unwrap();
    let out = tevatron(
        d,
        &[
            "search",
            "--query_reps",
            "q.safetensors",
            "--passage_reps",
            "c.safetensors",
            "--depth",
            "5",
            "--save_ranking_to",
            "q.safetensors",
            "--save_text",
        ],
    );
    fails_with(out, "is one of the inputs");
    assert_eq!(std::fs::read(d.join("q.safetensors")).unwrap(), before);
    // Depth beyond the corpus returns what exists.
    ok(search("q.safetensors", "c.safetensors", "100"));
    assert_eq!(std::fs::read_to_string(d.join("r.tsv")).unwrap().lines().count(), 3 * 7);
    // Different dimensions, NaN vectors, empty query file.
    write_vectors(&d.join("wide.safetensors"), 3, &[1.0, 2.0, 3.0], &["x"]);
    // The message names both files: the queries and the first shard of another dimension,
    // whether shards are opened up front or one at a time.
    let both = "query dimension 32 of q.safetensors does not match passage dimension 3 of \
                wide.safetensors";
    fails_with(search("q.safetensors", "wide.safetensors", "5"), both);
    fails_with(search("q.safetensors", "[cw]*.safetensors", "5"), both);
    let sharded = tevatron(
        d,
        &[
            "search",
            "--query_reps",
            "q.safetensors",
            "--passage_reps",
            "[cw]*.safetensors",
            "--save_ranking_to",
            "r.tsv",
            "--shard_search",
        ],
    );
    fails_with(sharded, both);
    let mut nan = vec![0.5f32; 32];
    nan[3] = f32::NAN;
    write_vectors(&d.join("nan.safetensors"), 32, &nan, &["n"]);
    fails_with(
        search("q.safetensors", "nan.safetensors", "5"),
        "row 0 holds a NaN or infinite value",
    );
    write_vectors(&d.join("empty.safetensors"), 32, &[], &[]);
    fails_with(search("empty.safetensors", "c.safetensors", "5"), "holds no query");
    // Device flags: contradictory, or a GPU this binary cannot use.
    let with = |extra: &[&str]| {
        let mut args = vec![
            "search",
            "--query_reps",
            "q.safetensors",
            "--passage_reps",
            "c.safetensors",
            "--save_ranking_to",
            "r2.tsv",
        ];
        args.extend(extra);
        tevatron(d, &args)
    };
    fails_with(with(&["--cpu_search", "--device", "cuda"]), "contradict");
    if !cfg!(feature = "cuda") {
        fails_with(with(&["--device", "cuda:0"]), "built without CUDA");
    }
    ok(with(&["--cpu_search", "--gpu_float32"]));
    assert!(!d.join("r.tsv.tmp").exists());
    // Malformed run and qrels lines.
    std::fs::write(d.join("bad.run"), "q1 d1 1.0\nq1 d2\n").unwrap();
    std::fs::write(d.join("bad.qrels"), "q1 0 d1\n").unwrap();
    fails_with(
        tevatron(d, &["eval", "--qrels", &toy("qrels.txt"), "--run", "bad.run"]),
        "bad.run:2: run line needs 6 columns",
    );
    fails_with(
        tevatron(d, &["eval", "--qrels", "bad.qrels", "--run", "r.tsv"]),
        "bad.qrels:1: qrels line needs 4 columns, found 3",
    );
    fails_with(
        tevatron(d, &["eval", "--qrels", &toy("qrels.txt"), "--run", "r.tsv", "-m", "bpref"]),
        "unknown measure \"bpref\"",
    );
    // search's default ranking (safetensors) where a text run is read: said so, with the flag
    // that writes text (it was "stream did not contain valid UTF-8").
    write_vectors(&d.join("one.safetensors"), 2, &[1.0, 0.0], &["q1"]);
    let rank = ["--passage_reps", "one.safetensors", "--save_ranking_to", "rank.safetensors"];
    ok(tevatron(d, &[&["search", "--query_reps", "one.safetensors"][..], &rank].concat()));
    fails_with(
        tevatron(d, &["eval", "--qrels", &toy("qrels.txt"), "--run", "rank.safetensors"]),
        "rank.safetensors: a safetensors file, not text (tevatron search writes its ranking so unless given --save_text)",
    );
    // A score that is not a number: named with its line (eval's sort panicked on it).
    std::fs::write(d.join("nan.run"), "q1 d1 1.0\nq1 d2 NaN\n").unwrap();
    fails_with(
        tevatron(d, &["eval", "--qrels", &toy("qrels.txt"), "--run", "nan.run"]),
        "nan.run:2: score \"NaN\" is not a finite number",
    );
    // A run none of whose queries is judged: a warning, and with -c zeros without a sign.
    std::fs::write(d.join("other.run"), "x1 d1 1.0\n").unwrap();
    let out = tevatron(d, &["eval", "--qrels", &toy("qrels.txt"), "--run", "other.run", "-c"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("none of the 1 queries of other.run is judged"), "{stderr}");
    let stdout = ok(out);
    assert!(stdout.contains("all\t0.0000") && !stdout.contains("-0.0000"), "{stdout}");
}

/// A docid given to two passages, and scores that overflow F32, are refused by search rather
/// than written into a ranking.
#[test]
fn duplicate_docids_and_overflowing_scores_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir(d.join("dup")).unwrap();
    write_vectors(&d.join("q.safetensors"), 2, &[1.0, 0.0], &["q1"]);
    write_vectors(&d.join("dup/a.safetensors"), 2, &[1.0, 0.0, 0.5, 0.5], &["d1", "d2"]);
    write_vectors(&d.join("dup/b.safetensors"), 2, &[0.9, 0.1], &["d1"]);
    let search = |passages: &str, queries: &str| {
        let args = ["search", "--query_reps", queries, "--passage_reps", passages, "--depth", "3"];
        let to = ["--save_text", "--save_ranking_to", "r.tsv"];
        tevatron(d, &[&args[..], &to].concat())
    };
    ok(search("dup/a.safetensors", "q.safetensors"));
    std::fs::remove_file(d.join("r.tsv")).unwrap();
    let err = fails_with(
        search("dup/*.safetensors", "q.safetensors"),
        "docid \"d1\" is given to two passages",
    );
    assert!(err.contains("a.safetensors row 0") && err.contains("b.safetensors row 0"), "{err}");
    write_vectors(&d.join("big.safetensors"), 2, &[1e30, 1e30], &["q1"]);
    write_vectors(&d.join("huge.safetensors"), 2, &[1e30, 1e30, 1.0, 0.0], &["h1", "h2"]);
    fails_with(
        search("huge.safetensors", "big.safetensors"),
        "its score with \"h1\" (huge.safetensors row 0) is inf",
    );
    assert!(!d.join("r.tsv").exists());
    // A corpus of no rows: an empty ranking, and a warning (it was silent).
    write_vectors(&d.join("none.safetensors"), 2, &[], &[]);
    let out = search("none.safetensors", "q.safetensors");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("none.safetensors hold no passage"), "{err}");
    assert_eq!(ok(out), "");
    assert_eq!(std::fs::read_to_string(d.join("r.tsv")).unwrap(), "");
}

/// A length beyond the model's position table cuts texts at the table's end, with one warning,
/// instead of failing at the first text that long (a training hours in): the same embeddings
/// as asking for that length. RoBERTa's positions start after the padding id (64 of 66 here).
#[test]
fn lengths_beyond_the_positions_cut_at_the_model_end() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let long: String = (0..300).map(|i| format!("w{i} ")).collect();
    std::fs::write(d.join("long.jsonl"), format!("{{\"docid\":\"d\",\"text\":\"{long}\"}}\n"))
        .unwrap();
    for (model, max) in [("bert", "64"), ("roberta", "64"), ("distilbert", "64")] {
        let run = |out: &str, len: &str| {
            let args = [
                "encode",
                "--model_name_or_path",
                &tiny(model),
                "--dataset_path",
                "long.jsonl",
                "--encode_output_path",
                out,
                "--passage_max_len",
                len,
                "--pooling",
                "mean",
            ];
            tevatron(d, &args)
        };
        let out = run("long.safetensors", "500");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        ok(out);
        let warning = format!("a length of 500 tokens is more than the model's {max} positions");
        assert_eq!(err.matches(&warning).count(), 1, "{model}: {err}");
        ok(run("max.safetensors", max));
        let read = |f: &str| std::fs::read(d.join(f)).unwrap();
        let embeddings = |b: Vec<u8>| {
            let st = safetensors::SafeTensors::deserialize(&b).unwrap();
            st.tensor("embeddings").unwrap().data().to_vec()
        };
        assert_eq!(embeddings(read("long.safetensors")), embeddings(read("max.safetensors")));
    }
    // Padded past the positions: the message names the padding, not the lengths it had named.
    let args = ["encode", "--model_name_or_path", &tiny("bert"), "--dataset_path", "long.jsonl"];
    let more = ["--encode_output_path", "x.safetensors", "--pad_to_multiple_of", "128"];
    // (candle's errors carry a backtrace under RUST_BACKTRACE, after the message line)
    let out = tevatron(d, &[&args[..], &more].concat());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("positions: texts are cut there, so a batch padded past it comes of --pad_to_multiple_of"), "{err}");
}

/// Flags Tevatron's encode takes that change nothing here are said to in the log.
#[test]
fn flags_that_change_nothing_are_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let extra = ["--quiet", "false", "--output_dir", "unused", "--dataset_split", "test"];
    let out = encode(d, &toy("corpus.jsonl"), "c.safetensors", &extra);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("--output_dir unused changes nothing here"), "{log}");
    assert!(log.contains("--dataset_split test changes nothing here: --dataset_path"), "{log}");
    assert!(!d.join("unused").exists());
}

fn write_vectors(path: &Path, dim: usize, rows: &[f32], ids: &[&str]) {
    let mut w = tevatron_ir::vectors::VectorWriter::create(
        path,
        dim,
        tevatron_ir::vectors::VecDType::F32,
        Default::default(),
    )
    .unwrap();
    w.push(rows, ids).unwrap();
    w.finish().unwrap();
}

#[test]
fn prepare_insuranceqa_names_the_missing_source_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = tevatron(
        dir.path(),
        &["prepare", "insuranceqa", "--source", "no-such-folder", "--output_dir", "out"],
    );
    fails_with(out, "no-such-folder/answers.json.gz");
    assert!(!dir.path().join("out").exists());
}
