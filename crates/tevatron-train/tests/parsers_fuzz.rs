//! No input may panic a parser (issue 19): training rows (inline JSONL, Parquet, and id rows
//! with their corpus) and the files a resumed run reads from its checkpoint
//! (`trainer_state.json`, `scheduler.json`, the model's and the optimizer's safetensors) get
//! arbitrary bytes, byte-level mutations of a valid file and JSON-aware mutations, and must
//! load or fail within a time bound, with an error that names the file.
//!
//! Parsers covered here: training rows ([`TrainData::open`], then sampling every group) in
//! inline JSONL, Parquet, and id form with a corpus ([`Corpus::open`]); a checkpoint's
//! `trainer_state.json`, `scheduler.json`, `model.safetensors` and `optimizer.safetensors`
//! ([`checkpoint::load`], what auto-resume calls).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use tevatron_train::checkpoint::{self, TrainerState};
use tevatron_train::data::{Corpus, TrainData};
use tevatron_train::optim::{AdamW, AdamWConfig};

#[path = "../../tevatron-ir/tests/fuzz/mod.rs"]
mod fuzz;
use fuzz::{bounded, chain, config, inputs, safetensors_inputs, testdata, write};

/// Fails unless `text` names one of `files`.
fn names_one_of(text: &str, files: &[PathBuf]) {
    assert!(
        files.iter().any(|f| text.contains(&f.display().to_string())),
        "the error names none of {files:?}: {text}"
    );
}

/// Opens the training data (with `corpus` for id rows) and samples every group of two epochs;
/// errors must name one of the input files.
fn read_training(train: PathBuf, corpus: Option<PathBuf>, cache: PathBuf, group_size: usize) {
    let mut files = vec![train.clone()];
    files.extend(corpus.clone());
    let result = bounded("TrainData", move || {
        let corpus =
            corpus.map(|c| Corpus::open(&[c], &cache)).transpose()?.map(std::sync::Arc::new);
        let data = TrainData::open(&[train], corpus, &cache, group_size, 42)?;
        for epoch in 0..2 {
            for item in 0..data.len() {
                let g = data.group(item, epoch)?;
                assert_eq!(g.passages.len(), group_size);
            }
        }
        Ok::<_, tevatron_ir::Error>(())
    });
    if let Err(e) = result {
        names_one_of(&chain(&e), &files);
    }
}

const ID_ROWS: &str = concat!(
    r#"{"query_id": "q1", "query_text": "what", "positive_document_ids": ["d1"], "negative_document_ids": ["d2", "d3"]}"#,
    "\n",
    r#"{"query_id": "q2", "query_text": "inner", "positive_document_ids": ["d7", 4], "negative_document_ids": ["d5"]}"#,
    "\n",
);

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn inline_training_rows_never_panic(bytes in inputs(testdata("train/tiny.jsonl")), group_size in 1..4usize) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz-train.jsonl");
        write(&path, &bytes);
        read_training(path, None, dir.path().join("cache"), group_size);
    }

    #[test]
    fn parquet_training_rows_never_panic(bytes in inputs(testdata("train/tiny.parquet")), group_size in 1..4usize) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz-train.parquet");
        write(&path, &bytes);
        read_training(path, None, dir.path().join("cache"), group_size);
    }

    #[test]
    fn id_training_rows_and_corpus_never_panic(rows in inputs(ID_ROWS.as_bytes().to_vec()), corpus in inputs(testdata("toy/corpus.jsonl")), which in any::<bool>(), group_size in 1..3usize) {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("fuzz-train-ids.jsonl");
        let corpus_path = dir.path().join("fuzz-corpus.jsonl");
        write(&train, if which { &rows } else { ID_ROWS.as_bytes() });
        let valid_corpus = testdata("toy/corpus.jsonl");
        write(&corpus_path, if which { &valid_corpus } else { &corpus });
        read_training(train, Some(corpus_path), dir.path().join("cache"), group_size);
    }
}

/// The optimizer a checkpoint is loaded into: two parameters.
fn optimizer() -> AdamW {
    let w = Var::from_tensor(&Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::ones(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
    AdamW::new(vec![("w".into(), w), ("b".into(), b)], AdamWConfig::default()).unwrap()
}

/// The files of a valid checkpoint of [`optimizer`]'s parameters, by name.
fn checkpoint_files() -> Vec<(&'static str, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let opt = optimizer();
    let params: Vec<(String, Tensor)> =
        opt.named_vars().map(|(n, v)| (n.to_string(), v.as_tensor().clone())).collect();
    tevatron_model::weights::save(&dir.path().join("model.safetensors"), params).unwrap();
    let (moments, _) = opt.state();
    tevatron_model::weights::save(&dir.path().join("optimizer.safetensors"), moments).unwrap();
    let state = TrainerState {
        global_step: 3,
        log_history: vec![serde_json::json!({"step": 1, "loss": 0.5, "learning_rate": 1e-5})],
        ..TrainerState::default()
    };
    checkpoint::write_json(&dir.path().join("trainer_state.json"), &state).unwrap();
    checkpoint::write_json(&dir.path().join("scheduler.json"), &serde_json::json!({"step": 3}))
        .unwrap();
    ["trainer_state.json", "scheduler.json", "model.safetensors", "optimizer.safetensors"]
        .into_iter()
        .map(|f| (f, std::fs::read(dir.path().join(f)).unwrap()))
        .collect()
}

fn resume(dir: PathBuf, bad: &Path) {
    let result = bounded("checkpoint::load", move || {
        let mut opt = optimizer();
        checkpoint::load(&dir, "model.safetensors", &[], &mut opt).map(|_| ())
    });
    if let Err(e) = result {
        names_one_of(&chain(&e), &[bad.to_path_buf()]);
    }
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn checkpoint_files_never_panic_a_resume(
        which in 0..4usize,
        state in inputs(checkpoint_files()[0].1.clone()),
        scheduler in inputs(checkpoint_files()[1].1.clone()),
        model in safetensors_inputs(checkpoint_files()[2].1.clone()),
        moments in safetensors_inputs(checkpoint_files()[3].1.clone()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("checkpoint-3");
        let mutated = [state, scheduler, model, moments];
        let mut bad = PathBuf::new();
        for (i, (name, valid)) in checkpoint_files().into_iter().enumerate() {
            let path = ckpt.join(name);
            write(&path, if i == which { &mutated[i] } else { &valid });
            if i == which {
                bad = path;
            }
        }
        resume(ckpt, &bad);
    }
}

/// The valid checkpoint loads (so that the cases above start from a good one).
#[test]
fn the_valid_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in checkpoint_files() {
        write(&dir.path().join(name), &bytes);
    }
    let mut opt = optimizer();
    let state = checkpoint::load(dir.path(), "model.safetensors", &[], &mut opt).unwrap();
    assert_eq!((state.global_step, opt.steps()), (3, 3));
}

/// Offsets that add up to just under 2^64 in either safetensors file of a checkpoint: refused
/// with the file's name (candle's reader overflowed in `safetensors`).
#[test]
fn checkpoint_safetensors_with_offsets_near_u64_max_are_refused() {
    for bad in ["model.safetensors", "optimizer.safetensors"] {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in checkpoint_files() {
            write(&dir.path().join(name), &bytes);
        }
        let path = dir.path().join(bad);
        write(&path, &fuzz::safetensors_with_offsets_near_u64_max());
        let mut opt = optimizer();
        let err = checkpoint::load(dir.path(), "model.safetensors", &[], &mut opt).unwrap_err();
        names_one_of(&chain(&err), &[path]);
    }
}

/// Optimizer moments of another shape than their parameter: refused on resume, naming the
/// file (they were taken as they came, for the first step to trip on).
#[test]
fn moments_of_another_shape_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in checkpoint_files() {
        write(&dir.path().join(name), &bytes);
    }
    let path = dir.path().join("optimizer.safetensors");
    let wrong =
        |name: &str| (name.to_string(), Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap());
    let moments = ["exp_avg.b", "exp_avg_sq.b", "exp_avg.w", "exp_avg_sq.w"].map(wrong).to_vec();
    tevatron_model::weights::save(&path, moments).unwrap();
    let err = checkpoint::load(dir.path(), "model.safetensors", &[], &mut optimizer()).unwrap_err();
    let text = chain(&err);
    names_one_of(&text, &[path]);
    assert!(text.contains("shape"), "{text}");
}
