//! No input may panic a parser (issue 19): every reader of user files in this crate gets
//! arbitrary bytes, byte-level mutations of a valid file and JSON-aware mutations, and must
//! return within a time bound, with an error that names the file when it fails.
//!
//! Parsers covered here: JSONL records, gzip JSONL records, Parquet records
//! ([`records::RecordStream`], [`records::count_rows`]); random-access rows of JSONL, gzip and
//! Parquet ([`rows::RowStore`], [`rows::DocIndex`]); qrels ([`trec::Qrels::read`]); runs
//! ([`trec::Run::read`], [`trec::read_ranking_columns`]); embeddings files
//! ([`vectors::Vectors::open`]); compact codes (`compact::CompactShard::open`); the InsuranceQA source files ([`insuranceqa::convert`]).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tevatron_ir::compact;
use tevatron_ir::quantize::{Kernels, Precision};
use tevatron_ir::records::{self, RecordKind, RecordStream};
use tevatron_ir::rows::{DocIndex, RowStore};
use tevatron_ir::trec::{read_ranking_columns, Qrels, Run};
use tevatron_ir::vectors::{VecDType, VectorWriter, Vectors};
use tevatron_ir::{insuranceqa, Error};

#[path = "fuzz/mod.rs"]
mod fuzz;
use fuzz::{assert_names, bounded, chain, config, inputs, safetensors_inputs, testdata, write};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Fails unless `e`'s message and causes name `path`.
fn names(e: &Error, path: &Path) {
    assert_names(&chain(e), path);
}

/// Streams every record of `path` as `kind` (stopping at the first error, as `encode` does)
/// and counts its rows; errors must name the file.
fn read_records(path: PathBuf) {
    bounded("RecordStream", move || {
        for kind in [RecordKind::Query, RecordKind::Doc] {
            for r in RecordStream::open(vec![path.clone()], kind).take(100_000) {
                if let Err(e) = r {
                    names(&e, &path);
                    break;
                }
            }
            let ranged = RecordStream::open(vec![path.clone()], kind).with_range(1..3);
            for r in ranged {
                if let Err(e) = r {
                    names(&e, &path);
                    break;
                }
            }
        }
        if let Err(e) = records::count_rows(std::slice::from_ref(&path)) {
            names(&e, &path);
        }
    })
}

/// Indexes `path` for random access, reads every row and resolves a few ids.
fn read_rows(path: PathBuf, cache: PathBuf) {
    bounded("RowStore", move || {
        let files = [path.clone()];
        let store = match RowStore::open(&files, &cache) {
            Ok(s) => s,
            Err(e) => return names(&e, &path),
        };
        for row in 0..store.len() {
            if let Err(e) = store.get(row) {
                names(&e, &path);
            }
        }
        match DocIndex::open(&store, &files, "docid", &cache) {
            Ok(ids) => {
                for id in ["d1", "4", "p0", "", "nope"] {
                    if let Err(e) = ids.find(&store, id) {
                        names(&e, &path);
                    }
                }
            }
            Err(e) => names(&e, &path),
        }
    })
}

fn corpus() -> Vec<u8> {
    testdata("toy/corpus.jsonl")
}

fn queries() -> Vec<u8> {
    testdata("toy/queries.jsonl")
}

fn embeddings() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.safetensors");
    let meta = BTreeMap::from([("pooling".to_string(), "mean".to_string())]);
    let mut w = VectorWriter::create(&path, 3, VecDType::F16, meta).unwrap();
    w.push(&[1.0, 2.0, 3.0, -1.0, 0.5, 0.0], &["a", "é b"]).unwrap();
    w.finish().unwrap();
    std::fs::read(&path).unwrap()
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn jsonl_records_never_panic(bytes in inputs(corpus())) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz-corpus.jsonl");
        write(&path, &bytes);
        read_records(path);
    }

    #[test]
    fn jsonl_query_records_never_panic(bytes in inputs(queries())) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz-queries.jsonl");
        write(&path, &bytes);
        read_records(path);
    }

    #[test]
    fn gzip_jsonl_records_never_panic(bytes in inputs(gzip(&corpus())), plain in inputs(corpus()), compress in any::<bool>()) {
        // Either the compressed bytes are mutated, or a mutated JSONL is compressed.
        let bytes = if compress { gzip(&plain) } else { bytes };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz-corpus.jsonl.gz");
        write(&path, &bytes);
        read_records(path);
    }

    #[test]
    fn parquet_records_never_panic(bytes in inputs(testdata("train/tiny.parquet"))) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz-rows.parquet");
        write(&path, &bytes);
        read_records(path);
    }

    #[test]
    fn jsonl_row_store_never_panics(bytes in inputs(corpus())) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz-corpus.jsonl");
        write(&path, &bytes);
        read_rows(path, dir.path().join("cache"));
    }

    #[test]
    fn gzip_row_store_never_panics(bytes in inputs(gzip(&corpus()))) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz-corpus.jsonl.gz");
        write(&path, &bytes);
        read_rows(path, dir.path().join("cache"));
    }

    #[test]
    fn parquet_row_store_never_panics(bytes in inputs(testdata("train/tiny.parquet"))) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz-rows.parquet");
        write(&path, &bytes);
        read_rows(path, dir.path().join("cache"));
    }

    #[test]
    fn qrels_never_panic(bytes in inputs(testdata("eval/qrels.txt"))) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz-qrels.txt");
        write(&path, &bytes);
        let p = path.clone();
        if let Err(e) = bounded("Qrels::read", move || Qrels::read(&p).map(|_| ())) {
            names(&e, &path);
        }
    }

    #[test]
    fn runs_never_panic(trec in inputs(testdata("eval/run.trec")), tsv in inputs(testdata("eval/run.tsv"))) {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [("fuzz-run.trec", trec), ("fuzz-run.tsv", tsv)] {
            let path = dir.path().join(name);
            write(&path, &bytes);
            let p = path.clone();
            let (run, columns) = bounded("Run::read", move || {
                let run = Run::read(&p).map(|run| {
                    // Every doc id must be readable back from the text.
                    for i in 0..run.queries.len() {
                        run.docs(i).for_each(drop);
                    }
                });
                (run, read_ranking_columns(&p).map(|_| ()))
            });
            for e in [run.err(), columns.err()].into_iter().flatten() {
                names(&e, &path);
            }
        }
    }

    #[test]
    fn embeddings_files_never_panic(bytes in safetensors_inputs(embeddings())) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz-emb.safetensors");
        write(&path, &bytes);
        let p = path.clone();
        let opened = bounded("Vectors::open", move || {
            Vectors::open(&p).map(|v| {
                // A file that opens must be usable: rows, ids and metadata.
                let _ = v.to_f32();
                assert_eq!(v.ids().iter().count(), v.len());
                let _ = v.metadata().len();
            })
        });
        if let Err(e) = opened {
            names(&e, &path);
        }
    }
}

/// The int8 codes (`tevatron index`) of [`embeddings`], whose file is written in `dir`.
fn compact_codes(dir: &Path) -> (Vec<u8>, PathBuf) {
    let source = dir.join("e.safetensors");
    std::fs::write(&source, embeddings()).unwrap();
    let v = Vectors::open(&source).unwrap();
    let codes = dir.join("e.int8.safetensors");
    let scales = compact::calibrate(std::slice::from_ref(&v)).unwrap();
    compact::write(&codes, &v, Precision::Int8, &scales).unwrap();
    (std::fs::read(&codes).unwrap(), source)
}

proptest! {
    #![proptest_config(config(96))]

    /// A compact file mutated anywhere: refused with its name, or, when it still opens (codes
    /// or scales changed, the header intact), searched without a panic.
    #[test]
    fn compact_files_never_panic(
        bytes in safetensors_inputs(compact_codes(tempfile::tempdir().unwrap().path()).0),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (_, source) = compact_codes(dir.path());
        let path = dir.path().join("fuzz.int8.safetensors");
        write(&path, &bytes);
        let p = path.clone();
        let opened = bounded("CompactShard::open", move || {
            let v = Vectors::open(&source).unwrap();
            compact::CompactShard::open(&p, &v).map(|c| {
                let q = [0.5f32, -1.0, 2.0];
                let (hits, _) =
                    compact::search_compact(&q, 3, &c, &v, 2, 0, 2.0, Kernels::detect()).unwrap();
                assert_eq!(hits[0].len(), 2);
            })
        });
        if let Err(e) = opened {
            names(&e, &path);
        }
    }
}

/// A small InsuranceQA source: answers 1..=4, one question per split.
fn insuranceqa_source() -> Vec<(&'static str, Vec<u8>)> {
    let answers = br#"{"1": {"en": "a  one", "zh": "x"}, "2": {"en": "two", "zh": ""}, "3": {"en": " three ", "zh": ""}, "4": {"en": "four", "zh": ""}}"#;
    let q = |text: &str, gold: &str| {
        format!(
            r#"{{"0": {{"en": "{text}", "zh": "", "domain": "d", "answers": ["{gold}"], "negatives": ["3", "4", "{gold}"]}}}}"#
        )
        .into_bytes()
    };
    vec![
        ("answers.json.gz", answers.to_vec()),
        ("train.json.gz", q("what is one", "1")),
        ("valid.json.gz", q("what is two", "2")),
        ("test.json.gz", q("what is three", "3")),
    ]
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn insuranceqa_sources_never_panic(
        which in 0..4usize,
        answers in inputs(insuranceqa_source()[0].1.clone()),
        train in inputs(insuranceqa_source()[1].1.clone()),
        raw in inputs(gzip(&insuranceqa_source()[0].1)),
        compressed_bytes in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src");
        let mut files = Vec::new();
        for (i, (name, valid)) in insuranceqa_source().into_iter().enumerate() {
            let path = source.join(name);
            let bytes = if i != which {
                gzip(&valid)
            } else if compressed_bytes {
                raw.clone()
            } else {
                gzip(if i == 0 { &answers } else { &train })
            };
            write(&path, &bytes);
            files.push(path);
        }
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let converted = bounded("insuranceqa::convert", move || {
            insuranceqa::convert(&source, &out).map(|_| ())
        });
        if let Err(e) = converted {
            // A bad answers file can surface as a question's unknown answer: the error names
            // the question file then, and the answers file in words.
            let text = chain(&e);
            assert!(files.iter().any(|f| text.contains(&f.display().to_string())), "the error names no input file: {text}");
        }
    }
}

/// A safetensors file with the header `header` (JSON) and `data`.
fn safetensors_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(data);
    file
}

/// Opens `bytes` as an embeddings file; it must be refused with an error naming the file.
fn refused(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crafted-emb.safetensors");
    write(&path, bytes);
    let p = path.clone();
    let err = bounded("Vectors::open", move || Vectors::open(&p).map(|_| ()))
        .expect_err("a crafted file must be refused");
    let text = chain(&err);
    assert_names(&text, &path);
    text
}

/// Headers that random edits are unlikely to reach. A zero-width embeddings tensor holds no
/// bytes whatever its row count, so `[2^64 - 1, 0]` passes safetensors' size check: the row
/// count must not size an allocation (it did: `rows + 1` overflowed), and a width of 0 would
/// only fail later, in search.
#[test]
fn embeddings_with_a_huge_row_count_of_zero_width_are_refused() {
    let header = format!(
        r#"{{"embeddings":{{"dtype":"F32","shape":[{},0],"data_offsets":[0,0]}},"ids":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}}}"#,
        u64::MAX
    );
    let text = refused(&safetensors_file(&header, b"a"));
    assert!(text.contains("width 0"), "{text}");
}

/// Tensors whose offsets add up to just under 2^64: the header's end plus the data's must not
/// overflow (safetensors adds them unchecked).
#[test]
fn embeddings_with_offsets_near_u64_max_are_refused() {
    refused(&fuzz::safetensors_with_offsets_near_u64_max());
}
