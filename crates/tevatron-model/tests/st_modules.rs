//! sentence-transformers folders with Dense modules after pooling, saved by sentence-transformers
//! 6 (`testdata/tiny/bert-st-dense`, made by `scripts/fixtures/make_tiny_st_dense.py`): the
//! embeddings equal `SentenceTransformer.encode`, training reaches the Dense weights, and a saved
//! model keeps them in sentence-transformers' layout.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use candle_core::{Device, Tensor};
use tevatron_model::testing::tiny_dir;
use tevatron_model::{Encoder, EncoderOptions, TextOptions};

const FIXTURE: &str = "bert-st-dense";

fn texts_and_expected() -> (Vec<String>, std::collections::HashMap<String, Tensor>) {
    let dir = tiny_dir(FIXTURE);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let texts =
        json["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().into()).collect();
    let exp = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu);
    (texts, exp.unwrap())
}

fn embed(enc: &Encoder, texts: &[String]) -> Vec<f32> {
    enc.embed(texts, &TextOptions { max_len: 64, ..TextOptions::default() }, 2).unwrap()
}

/// The message of loading `dir` with default options, which must fail.
fn load_error(dir: &std::path::Path) -> String {
    Encoder::load(dir, None, &EncoderOptions::default()).err().unwrap().to_string()
}

/// Writes `dir/modules.json`: the Transformer at the root, then each `(folder, class)` of
/// `sentence_transformers.models`.
fn write_modules(dir: &std::path::Path, after: &[(&str, &str)]) {
    let mut modules = vec![("", "Transformer")];
    modules.extend_from_slice(after);
    let json: Vec<serde_json::Value> = modules
        .iter()
        .enumerate()
        .map(|(idx, (path, class))| {
            serde_json::json!({"idx": idx, "path": path, "type": format!("sentence_transformers.models.{class}")})
        })
        .collect();
    std::fs::write(dir.join("modules.json"), serde_json::Value::from(json).to_string()).unwrap();
}

/// `texts` tokenized (64 tokens at most) and padded into one batch.
fn batch_of(enc: &Encoder, texts: &[String]) -> tevatron_model::Batch {
    let opts = TextOptions { max_len: 64, ..TextOptions::default() };
    let seqs = enc.tokenizer().prepare(&opts).unwrap().tokenize(texts).unwrap();
    let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let pad = enc.tokenizer().pad_id();
    tevatron_model::collate::collate(
        &rows,
        pad,
        16,
        tevatron_model::PaddingSide::Right,
        &Device::Cpu,
    )
    .unwrap()
}

/// The files (not the folders) of `from`, copied into `to` (created).
fn copy_files(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn max_diff(got: &[f32], want: &Tensor) -> f32 {
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    tevatron_model::testing::max_abs_diff_of(got, &want)
}

#[test]
fn dense_modules_embed_as_sentence_transformers() {
    let (texts, exp) = texts_and_expected();
    let enc = Encoder::load(&tiny_dir(FIXTURE), None, &EncoderOptions::default()).unwrap();
    assert_eq!(enc.output_width(), 12, "the last Dense module's width");
    assert!(enc.normalize());
    let d = max_diff(&embed(&enc, &texts), &exp["normalized"]);
    assert!(d < 1e-5, "normalized: {d}");
    // Both flags given (one alone takes Tevatron's default for the other).
    let opts = EncoderOptions {
        pooling: Some(tevatron_model::Pooling::Mean),
        normalize: Some(false),
        ..EncoderOptions::default()
    };
    let enc = Encoder::load(&tiny_dir(FIXTURE), None, &opts).unwrap();
    let d = max_diff(&embed(&enc, &texts), &exp["unnormalized"]);
    assert!(d < 1e-5, "unnormalized: {d}");
}

/// With first-token pooling (a strided view of the hidden states, as LaBSE pools), the Dense
/// modules apply to the pooled row as a product by hand does.
#[test]
fn dense_modules_take_a_first_token_pool() {
    let (texts, _) = texts_and_expected();
    let opts = EncoderOptions {
        pooling: Some(tevatron_model::Pooling::Cls),
        normalize: Some(true),
        ..EncoderOptions::default()
    };
    let enc = Encoder::load(&tiny_dir(FIXTURE), None, &opts).unwrap();
    let batch = batch_of(&enc, &texts);
    let got = enc.encode(&batch, tevatron_model::Mode::Eval).unwrap();
    let cls =
        enc.hidden_states(&batch, tevatron_model::Mode::Eval).unwrap().get_on_dim(1, 0).unwrap();
    let load =
        |f: &str| candle_core::safetensors::load(tiny_dir(FIXTURE).join(f), &Device::Cpu).unwrap();
    let (d2, d3) = (load("2_Dense/model.safetensors"), load("3_Dense/model.safetensors"));
    let x = cls.matmul(&d2["linear.weight"].t().unwrap()).unwrap();
    let x = x.broadcast_add(&d2["linear.bias"]).unwrap().tanh().unwrap();
    let x = x.matmul(&d3["linear.weight"].t().unwrap()).unwrap();
    let want = x.broadcast_div(&x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap()).unwrap();
    let d = tevatron_model::testing::max_abs_diff(&got, &want).unwrap();
    assert!(d < 1e-6, "{d}");
}

#[test]
fn dense_modules_train_and_are_saved_in_their_folders() {
    let (texts, _) = texts_and_expected();
    let opts = EncoderOptions { trainable: true, ..EncoderOptions::default() };
    let enc = Encoder::load(&tiny_dir(FIXTURE), None, &opts).unwrap();
    let vars = enc.varmap().unwrap().data().lock().unwrap().clone();
    for name in ["2_Dense/linear.weight", "2_Dense/linear.bias", "3_Dense/linear.weight"] {
        assert!(vars.contains_key(name), "{name} is trained");
    }
    assert!(!vars.contains_key("3_Dense/linear.bias"), "the second Dense has no bias");

    // A gradient reaches the Dense weights through the pooled, normalised vectors.
    let batch = batch_of(&enc, &texts[..2]);
    let reps = enc.encode(&batch, tevatron_model::Mode::Eval).unwrap();
    let loss = reps.narrow(1, 0, 1).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for name in ["2_Dense/linear.weight", "3_Dense/linear.weight"] {
        let g = grads.get(vars[name].as_tensor()).expect("a gradient");
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "{name}");
    }

    // Moved weights are saved into the Dense folders, not into model.safetensors, and a
    // reloaded model embeds as the trained one.
    let w = &vars["2_Dense/linear.weight"];
    w.set(&(w.as_tensor() * 2.0).unwrap()).unwrap();
    let trained = embed(&enc, &texts);
    let out = tempfile::tempdir().unwrap();
    enc.save_pretrained(out.path()).unwrap();
    let modules: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("modules.json")).unwrap())
            .unwrap();
    let types: Vec<(&str, &str)> = modules
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["path"].as_str().unwrap(), m["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        types,
        [
            ("", "sentence_transformers.models.Transformer"),
            ("1_Pooling", "sentence_transformers.models.Pooling"),
            ("2_Dense", "sentence_transformers.models.Dense"),
            ("3_Dense", "sentence_transformers.models.Dense"),
            ("4_Normalize", "sentence_transformers.models.Normalize"),
        ]
    );
    let main = candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu);
    assert!(main.unwrap().keys().all(|k| !k.contains("Dense") && !k.contains("linear.")));
    let saved = Encoder::load(out.path(), None, &EncoderOptions::default()).unwrap();
    let again = embed(&saved, &texts);
    let d = tevatron_model::testing::max_abs_diff_of(&trained, &again);
    assert!(d < 1e-6, "{d}");
    let before =
        embed(&Encoder::load(&tiny_dir(FIXTURE), None, &Default::default()).unwrap(), &texts);
    assert!(before.iter().zip(&again).any(|(a, b)| (a - b).abs() > 1e-3), "the change was saved");
}

#[test]
fn a_dense_module_that_does_not_fit_is_refused_by_folder() {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny_dir(FIXTURE);
    for sub in ["", "1_Pooling", "2_Dense", "3_Dense", "4_Normalize"] {
        copy_files(&src.join(sub), &dir.path().join(sub));
    }
    // The second Dense claims to take 20 dimensions; the first gives 16.
    let cfg = dir.path().join("3_Dense/config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"in_features\": 16", "\"in_features\": 20");
    std::fs::write(&cfg, text).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("3_Dense/config.json") && err.contains("16 dimensions"), "{err}");
    // Its weights missing.
    std::fs::copy(src.join("3_Dense/config.json"), &cfg).unwrap();
    std::fs::remove_file(dir.path().join("3_Dense/model.safetensors")).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("3_Dense") && err.contains("no weights"), "{err}");
}

/// A module this crate cannot run is refused for a retriever, which would run it, and set aside
/// for a cross-encoder, whose score head replaces the pipeline after the Transformer.
#[test]
fn modules_that_cannot_run_stop_a_retriever_only() {
    let dir = tempfile::tempdir().unwrap();
    let reranker =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny-reranker/bert");
    copy_files(&reranker, dir.path());

    // A Pooling module whose folder is missing, and a module of another kind.
    write_modules(dir.path(), &[("1_Pooling", "Pooling"), ("2_WordWeights", "WordWeights")]);
    let err = load_error(dir.path());
    assert!(err.contains("modules.json") && err.contains("WordWeights"), "{err}");
    let head = tevatron_model::ScoreHeadOptions { init_missing: false, seed: 0 };
    let opts = EncoderOptions { score_head: Some(head), ..EncoderOptions::default() };
    let enc = Encoder::load(dir.path(), None, &opts).unwrap();
    assert!(enc.is_cross_encoder());
}

/// A pooling mode this crate lacks is refused when it is the one in force (no pooling flag),
/// whether or not the folder normalises, and set aside when the flags choose the pooling.
#[test]
fn a_pooling_mode_we_lack_is_refused_only_when_in_force() {
    let dir = tempfile::tempdir().unwrap();
    copy_files(&tiny_dir("bert"), dir.path());
    std::fs::create_dir_all(dir.path().join("1_Pooling")).unwrap();
    std::fs::write(dir.path().join("1_Pooling/config.json"), r#"{"pooling_mode": "max"}"#).unwrap();
    write_modules(dir.path(), &[("1_Pooling", "Pooling")]);
    let err = load_error(dir.path());
    assert!(err.contains("1_Pooling/config.json") && err.contains("max"), "{err}");
    let opts =
        EncoderOptions { pooling: Some(tevatron_model::Pooling::Mean), ..Default::default() };
    let enc = Encoder::load(dir.path(), None, &opts).unwrap();
    assert_eq!(enc.pooling(), tevatron_model::Pooling::Mean);
}
