//! Cross-encoders (rerankers) against transformers on the committed tiny random
//! `BertForSequenceClassification`, `RobertaForSequenceClassification`,
//! `DistilBertForSequenceClassification`, `LlamaForSequenceClassification` and
//! `ModernBertForSequenceClassification` (first-token and mean-pooled heads)
//! (`testdata/tiny-reranker`, made by `scripts/fixtures/make_tiny_rerankers.py`): Tevatron's
//! `format_pair` and reranker tokenization, the logits of each head layout, sentence-transformers'
//! text-pair form with token types, the saved folder's layout, and the errors of a folder
//! without a head.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use tevatron_model::encoder::BatchOptions;
use tevatron_model::testing::{max_abs_diff_of, tiny_dir};
use tevatron_model::{Encoder, EncoderOptions, PaddingSide, ScoreHeadOptions, TextOptions};

/// Scores equal transformers' logits within this (fp32; the fixtures' logits are O(1)).
const SCORE_ATOL: f32 = 1e-5;

const MODELS: [&str; 6] =
    ["bert", "roberta", "distilbert", "llama", "modernbert", "modernbert-mean"];

fn dir(name: &str) -> PathBuf {
    // Through a folder that exists: `modernbert-mean` has no `tiny/` folder of its own.
    tiny_dir("bert").join("../../tiny-reranker").join(name)
}

fn expected(name: &str) -> (serde_json::Value, HashMap<String, Tensor>) {
    let json = std::fs::read_to_string(dir(name).join("expected.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(dir(name).join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    (serde_json::from_str(&json).unwrap(), tensors)
}

fn reranker_options(init_missing: bool) -> EncoderOptions {
    EncoderOptions {
        score_head: Some(ScoreHeadOptions { init_missing, seed: 3 }),
        ..EncoderOptions::default()
    }
}

fn load(path: &std::path::Path) -> Encoder {
    Encoder::load(path, None, &reranker_options(false)).unwrap()
}

fn batches() -> BatchOptions {
    BatchOptions {
        batch_size: 3,
        token_budget: 1 << 20,
        pad_to_multiple_of: 16,
        padding_side: PaddingSide::Right,
    }
}

fn logits(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Tevatron's ids of each fixture's pairs, scored in batches of 3 (so padding differs).
fn scores(enc: &Encoder, exp: &serde_json::Value) -> (Vec<Vec<u32>>, Vec<f32>) {
    let texts: Vec<String> = serde_json::from_value(exp["texts"].clone()).unwrap();
    let opts = TextOptions {
        max_len: exp["max_len"].as_u64().unwrap() as usize,
        append_eos: exp["append_eos"].as_bool().unwrap(),
        ..TextOptions::default()
    };
    let ids = enc.tokenizer().prepare(&opts).unwrap().tokenize(&texts).unwrap();
    let scores = enc.embed_sequences(&ids, &batches()).unwrap();
    (ids, scores)
}

#[test]
fn tevatron_pairs_score_as_transformers_for_every_head_layout() {
    for name in MODELS {
        let (exp, tensors) = expected(name);
        let enc = load(&dir(name));
        assert!(enc.is_cross_encoder() && enc.initialised_head().is_empty(), "{name}");
        let (ids, got) = scores(&enc, &exp);
        let want_ids: Vec<Vec<u32>> = serde_json::from_value(exp["ids"].clone()).unwrap();
        assert_eq!(ids, want_ids, "{name}: tokenization");
        let want = logits(&tensors["logits"]);
        let d = max_abs_diff_of(&got, &want);
        assert!(d <= SCORE_ATOL, "{name}: scores differ by {d}: {got:?} vs {want:?}");
    }
}

#[test]
fn format_pair_builds_the_fixtures_strings() {
    // The script formats with Tevatron's own function; ours must give the same strings.
    let (exp, _) = expected("bert");
    let texts: Vec<String> = serde_json::from_value(exp["texts"].clone()).unwrap();
    let pairs = [
        (
            "what is a dense retriever",
            "Dense-retrieval",
            "Dense retrieval encodes queries and passages into vectors",
        ),
        ("number 42", "", "number 42 and 3.14"),
        ("", "-", "searches them by inner product"),
    ];
    for ((q, t, p), want) in pairs.iter().zip(&texts) {
        assert_eq!(&tevatron_ir::rerank::format_pair(q, p, t, "query:", "passage:"), want);
    }
}

#[test]
fn text_pairs_take_token_types_as_sentence_transformers_cross_encoder() {
    let (exp, tensors) = expected("bert");
    let enc = load(&dir("bert"));
    let queries: Vec<String> = serde_json::from_value(exp["pair_queries"].clone()).unwrap();
    let passages: Vec<String> = serde_json::from_value(exp["pair_passages"].clone()).unwrap();
    let pairs: Vec<(String, String)> = queries.into_iter().zip(passages).collect();
    let opts = TextOptions {
        max_len: exp["max_len"].as_u64().unwrap() as usize,
        ..TextOptions::default()
    };
    let tokenized = enc.tokenizer().prepare(&opts).unwrap().tokenize_pairs(&pairs).unwrap();
    let (ids, types): (Vec<Vec<u32>>, Vec<Vec<u32>>) = tokenized.into_iter().unzip();
    let want_ids: Vec<Vec<u32>> = serde_json::from_value(exp["pair_ids"].clone()).unwrap();
    let want_types: Vec<Vec<u32>> = serde_json::from_value(exp["pair_types"].clone()).unwrap();
    assert_eq!(ids, want_ids);
    assert_eq!(types, want_types);
    assert!(types.iter().any(|t| t.contains(&1)), "the second text has type 1");
    let got = enc.embed_typed(&ids, Some(&types), &batches()).unwrap();
    let want = logits(&tensors["pair_logits"]);
    let d = max_abs_diff_of(&got, &want);
    assert!(d <= SCORE_ATOL, "scores differ by {d}: {got:?} vs {want:?}");
    // A tokenizer whose transformers class returns no token types (the tiny model's own
    // `TokenizersBackend`, like RoBERTa's and DistilBERT's classes) gives the pairs none.
    let plain = tevatron_model::TextTokenizer::load(&tiny_dir("bert")).unwrap();
    let untyped = plain.prepare(&opts).unwrap().tokenize_pairs(&pairs).unwrap();
    assert!(untyped.iter().all(|(i, t)| t.len() == i.len() && t.iter().all(|&x| x == 0)));
    assert_eq!(untyped.into_iter().map(|(i, _)| i).collect::<Vec<_>>(), want_ids);
    // Token types matter: without them the scores change.
    let untyped = enc.embed_sequences(&ids, &batches()).unwrap();
    assert!(max_abs_diff_of(&untyped, &want) > 100.0 * SCORE_ATOL);
}

/// A max length that BERT's special tokens fill ([CLS] and [SEP] a text, one [SEP] more a
/// pair) is refused with the count, where the tokenizers crate would overflow.
#[test]
fn a_max_length_the_special_tokens_fill_is_refused() {
    let tok = tevatron_model::TextTokenizer::load(&tiny_dir("bert")).unwrap();
    let opts = |max_len, append_eos| TextOptions { max_len, append_eos, ..TextOptions::default() };
    let pair = [("a question".to_string(), "an answer".to_string())];
    for max_len in [0, 1, 2] {
        let err = tok.prepare(&opts(max_len, false)).err().expect("refused").to_string();
        assert!(err.contains("adds 2 special token(s) to a text"), "{err}");
    }
    let three = tok.prepare(&opts(3, false)).unwrap();
    assert_eq!(three.tokenize(&["a question".to_string()]).unwrap()[0].len(), 3);
    let err = three.tokenize_pairs(&pair).expect_err("refused").to_string();
    assert!(
        err.contains("max length 3") && err.contains("3 special token(s) to a text pair"),
        "{err}"
    );
    let four = tok.prepare(&opts(4, false)).unwrap().tokenize_pairs(&pair).unwrap();
    assert_eq!(four[0].0.len(), 4);
}

#[test]
fn a_saved_reranker_keeps_transformers_names_and_its_scores() {
    for name in MODELS {
        let (exp, tensors) = expected(name);
        let opts = EncoderOptions { trainable: true, ..reranker_options(false) };
        let enc = Encoder::load(&dir(name), None, &opts).unwrap();
        let out = tempfile::tempdir().unwrap();
        enc.save_pretrained(out.path()).unwrap();
        let names = |p: PathBuf| {
            let mut n: Vec<String> =
                candle_core::safetensors::load(p, &Device::Cpu).unwrap().into_keys().collect();
            n.sort();
            n
        };
        let theirs = names(dir(name).join("model.safetensors"));
        assert_eq!(names(out.path().join("model.safetensors")), theirs, "{name}: weight names");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        let class = config["architectures"][0].as_str().unwrap();
        assert!(class.ends_with("ForSequenceClassification"), "{name}: {class}");
        assert_eq!(config["id2label"].as_object().unwrap().len(), 1, "{name}: one label");
        assert_eq!(
            config["sentence_transformers"]["activation_fn"],
            "torch.nn.modules.linear.Identity"
        );
        let (_, got) = scores(&load(out.path()), &exp);
        let d = max_abs_diff_of(&got, &logits(&tensors["logits"]));
        assert!(d <= SCORE_ATOL, "{name}: the saved folder scores differently by {d}");
    }
}

#[test]
fn a_base_model_has_no_head_unless_one_is_initialised() {
    let err = Encoder::load(&tiny_dir("bert"), None, &reranker_options(false)).err().unwrap();
    let msg = err.to_string();
    assert!(msg.contains("no score head") && msg.contains("classifier.weight"), "{msg}");
    assert!(msg.contains("tevatron train-reranker"), "{msg}");
    // Allowed: the missing weights are drawn and named; the ones the base has are kept.
    let enc = Encoder::load(&tiny_dir("llama"), None, &reranker_options(true)).unwrap();
    assert_eq!(enc.initialised_head(), ["score.weight"]);
    let again = Encoder::load(&tiny_dir("llama"), None, &reranker_options(true)).unwrap();
    let texts = ["a b c".to_string(), "dense".to_string()];
    let t = TextOptions::default();
    assert_eq!(enc.embed(&texts, &t, 2).unwrap(), again.embed(&texts, &t, 2).unwrap());
    let seeded = |seed| EncoderOptions {
        score_head: Some(ScoreHeadOptions { init_missing: true, seed }),
        ..EncoderOptions::default()
    };
    let other = Encoder::load(&tiny_dir("llama"), None, &seeded(4)).unwrap();
    assert_ne!(enc.embed(&texts, &t, 2).unwrap(), other.embed(&texts, &t, 2).unwrap());
    // BERT's pooler is in the base model: only the classifier is new.
    let bert = Encoder::load(&tiny_dir("bert"), None, &seeded(3)).unwrap();
    assert_eq!(bert.initialised_head(), ["classifier.weight", "classifier.bias"]);
    // ModernBERT's head is all new, its layer norm's scale at one (as transformers starts it),
    // and a fresh head scores: finite, and not the same for every pair.
    let modern = Encoder::load(&tiny_dir("modernbert"), None, &seeded(3)).unwrap();
    assert_eq!(
        modern.initialised_head(),
        ["head.dense.weight", "head.norm.weight", "classifier.weight", "classifier.bias"]
    );
    let scores = modern.embed(&texts, &t, 2).unwrap();
    assert!(scores.iter().all(|s| s.is_finite()) && scores[0] != scores[1], "{scores:?}");
}

/// A copy of the tiny ModernBERT with `config.json`'s keys set as given and its weights
/// renamed by `rename` (plus `extra` weights), in a temporary folder.
fn modernbert_variant(
    set: &[(&str, serde_json::Value)],
    rename: impl Fn(&str) -> String,
    extra: &[(&str, Tensor)],
) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let src = tiny_dir("modernbert");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, out.path().join(f.file_name().unwrap())).unwrap();
    }
    let path = out.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (k, v) in set {
        config[*k] = v.clone();
    }
    std::fs::write(&path, config.to_string()).unwrap();
    let weights = out.path().join("model.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&weights, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (rename(&k), t))
            .collect();
    tensors.extend(extra.iter().map(|(k, t)| (k.to_string(), t.clone())));
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    out
}

/// A hub ModernBERT is saved as `ModernBertForMaskedLM`: its MLM head's `head.dense` and
/// `head.norm` become the reranker's (as transformers loads them), only `classifier` is new,
/// and its `decoder.bias` is neither used nor saved; a retriever keeps none of them.
#[test]
fn a_modernbert_mlm_checkpoint_lends_its_head_and_drops_its_decoder() {
    let h = 32;
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    let dense = Tensor::randn(0f32, 0.1, (h, h), &Device::Cpu).unwrap();
    let mlm = modernbert_variant(
        &[("architectures", serde_json::json!(["ModernBertForMaskedLM"]))],
        |k| format!("model.{k}"),
        &[("head.dense.weight", dense), ("head.norm.weight", ones(h)), ("decoder.bias", ones(104))],
    );
    let opts = EncoderOptions {
        trainable: true,
        score_head: Some(ScoreHeadOptions { init_missing: true, seed: 3 }),
        ..EncoderOptions::default()
    };
    let enc = Encoder::load(mlm.path(), None, &opts).unwrap();
    assert_eq!(enc.initialised_head(), ["classifier.weight", "classifier.bias"]);
    let out = tempfile::tempdir().unwrap();
    enc.save_pretrained(out.path()).unwrap();
    let saved =
        candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let transformers =
        candle_core::safetensors::load(dir("modernbert").join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = saved.keys().collect();
    let mut want: Vec<&String> = transformers.keys().collect();
    names.sort();
    want.sort();
    assert_eq!(names, want, "the names ModernBertForSequenceClassification loads");
    // As a retriever the MLM head is no part of the model.
    let retriever = EncoderOptions { trainable: true, ..EncoderOptions::default() };
    let enc = Encoder::load(mlm.path(), None, &retriever).unwrap();
    let out = tempfile::tempdir().unwrap();
    enc.save_pretrained(out.path()).unwrap();
    let saved =
        candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(
        saved.keys().all(|k| !k.contains("head.") && !k.contains("decoder.")),
        "{:?}",
        saved.keys()
    );
}

/// `classifier_activation` and `classifier_pooling` as ModernBERT's config sets them: an
/// activation this build lacks still loads the retriever but refuses the head, by name; a mean
/// head takes left padding, a first-token head does not.
#[test]
fn modernbert_head_settings_are_read_or_refused_by_name() {
    let same = |k: &str| k.to_string();
    let tanh = modernbert_variant(&[("classifier_activation", "tanh".into())], same, &[]);
    Encoder::load(tanh.path(), None, &EncoderOptions::default()).unwrap();
    let err = Encoder::load(tanh.path(), None, &reranker_options(true)).err().unwrap();
    assert!(err.to_string().contains("classifier_activation is not an activation"), "{err}");
    let max = modernbert_variant(&[("classifier_pooling", "max".into())], same, &[]);
    let err = Encoder::load(max.path(), None, &EncoderOptions::default()).err().unwrap();
    let cause = std::error::Error::source(&err).map(|e| e.to_string()).unwrap_or_default();
    assert!(err.to_string().contains("config.json"), "{err}");
    assert!(cause.contains("unknown variant `max`, expected `cls` or `mean`"), "{cause}");
    let mean = load(&dir("modernbert-mean"));
    mean.check_padding(PaddingSide::Left).unwrap();
    let cls = load(&dir("modernbert"));
    let err = cls.check_padding(PaddingSide::Left).err().unwrap();
    assert!(err.to_string().contains("reads the first token"), "{err}");
    // A ReLU head is another head: the same weights score otherwise.
    let relu = modernbert_variant(&[("classifier_activation", "relu".into())], same, &[]);
    let gelu = Encoder::load(&tiny_dir("modernbert"), None, &reranker_options(true)).unwrap();
    let relu = Encoder::load(relu.path(), None, &reranker_options(true)).unwrap();
    let texts = ["a b c".to_string(), "dense".to_string()];
    let t = TextOptions::default();
    assert_ne!(gelu.embed(&texts, &t, 2).unwrap(), relu.embed(&texts, &t, 2).unwrap());
}

#[test]
fn a_classifier_with_several_labels_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir("bert").join(f), tmp.path().join(f)).unwrap();
    }
    let mut weights =
        candle_core::safetensors::load(dir("bert").join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let w = &weights["classifier.weight"];
    let two = Tensor::cat(&[w, w], 0).unwrap();
    weights.insert("classifier.weight".into(), two);
    candle_core::safetensors::save(&weights, tmp.path().join("model.safetensors")).unwrap();
    let err = Encoder::load(tmp.path(), None, &reranker_options(true)).err().unwrap();
    assert!(err.to_string().contains("num_labels = 1"), "{err}");
}

/// A decoder's head scores the last token that is not the config's pad id, as transformers'
/// does: with `pad_token_id` the EOS id, an appended EOS is skipped and the score is that of
/// the token before it (the same, by causal attention, as the pair without the EOS); the saved
/// config keeps the pad id the head used.
#[test]
fn a_decoder_head_skips_the_pad_id_as_transformers_does() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir("llama").join(f), tmp.path().join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir("llama").join("config.json")).unwrap())
            .unwrap();
    let eos = config["eos_token_id"].as_u64().unwrap() as u32;
    config["pad_token_id"] = eos.into();
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    let texts: Vec<String> = [
        "what is a dense retriever",
        "dense retrieval encodes queries and passages",
        "inner product number",
    ]
    .iter()
    .map(|t| t.to_string())
    .collect();
    let plain = TextOptions { max_len: 20, ..TextOptions::default() };
    let ids = load(&dir("llama")).tokenizer().prepare(&plain).unwrap().tokenize(&texts).unwrap();
    // Pairs with neither the EOS nor the fixture's pad id 0 (an unknown character's id) inside.
    let ids: Vec<Vec<u32>> =
        ids.into_iter().filter(|s| !s.contains(&eos) && !s.contains(&0)).collect();
    assert!(ids.len() >= 2, "{ids:?}");
    let with_eos: Vec<Vec<u32>> = ids.iter().map(|s| [s.as_slice(), &[eos]].concat()).collect();
    let want = load(&dir("llama")).embed_sequences(&ids, &batches()).unwrap();
    let skipping = load(tmp.path());
    let got = skipping.embed_sequences(&with_eos, &batches()).unwrap();
    let d = max_abs_diff_of(&got, &want);
    assert!(d <= SCORE_ATOL, "the EOS was not skipped: {got:?} vs {want:?}");
    // With pad 0 the EOS itself is scored: a different number.
    let at_eos = load(&dir("llama")).embed_sequences(&with_eos, &batches()).unwrap();
    assert!(max_abs_diff_of(&at_eos, &want) > 100.0 * SCORE_ATOL);
    let opts = EncoderOptions { trainable: true, ..reranker_options(false) };
    let out = tempfile::tempdir().unwrap();
    Encoder::load(tmp.path(), None, &opts).unwrap().save_pretrained(out.path()).unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["pad_token_id"], eos);
}

fn lora(
    source: tevatron_model::lora::AdapterSource,
    merge: bool,
) -> tevatron_model::lora::LoraOptions {
    tevatron_model::lora::LoraOptions { source, merge, seed: 9, base_dtype: None }
}

/// A PEFT `SEQ_CLS` adapter (LoRA on q/v plus the score head saved whole, made by
/// `scripts/fixtures/make_reranker_lora.py`) on the tiny Llama scores as PEFT does; an adapter
/// trained here is written with PEFT's names, task and `modules_to_save`, and reads back.
#[test]
fn lora_reranker_adapters_score_as_peft_and_are_written_as_peft_writes_them() {
    use tevatron_model::lora::{AdapterSource, LoraConfig};
    let adapter = dir("llama-lora");
    let (exp, _) = expected("llama");
    let ids: Vec<Vec<u32>> = serde_json::from_value(exp["ids"].clone()).unwrap();
    let merged = EncoderOptions {
        lora: Some(lora(AdapterSource::Saved(adapter.clone()), true)),
        ..reranker_options(false)
    };
    // The base has no head: the adapter's is used.
    let enc = Encoder::load(&tiny_dir("llama"), None, &merged).unwrap();
    let got = enc.embed_sequences(&ids, &batches()).unwrap();
    let want =
        candle_core::safetensors::load(adapter.join("expected.safetensors"), &Device::Cpu).unwrap();
    let d = max_abs_diff_of(&got, &logits(&want["logits"]));
    assert!(d <= SCORE_ATOL, "PEFT's scores differ by {d}");

    // Training a fresh adapter: the head is trained whole and saved with the adapters.
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        use_rslora: false,
    };
    let fresh = EncoderOptions {
        trainable: true,
        lora: Some(lora(AdapterSource::Fresh(config), false)),
        ..reranker_options(true)
    };
    let trained = Encoder::load(&tiny_dir("llama"), None, &fresh).unwrap();
    let vars: Vec<String> =
        trained.varmap().unwrap().data().lock().unwrap().keys().cloned().collect();
    assert!(vars.contains(&"base_model.model.score.weight".to_string()), "{vars:?}");
    let out = tempfile::tempdir().unwrap();
    trained.save_pretrained(out.path()).unwrap();
    let names = |p: PathBuf| {
        let mut n: Vec<String> =
            candle_core::safetensors::load(p, &Device::Cpu).unwrap().into_keys().collect();
        n.sort();
        n
    };
    assert_eq!(
        names(out.path().join("adapter_model.safetensors")),
        names(adapter.join("adapter_model.safetensors")),
        "the tensors PEFT writes"
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier", "score"]));
    // Read back and merged, it scores as the model that wrote it (B is still zero).
    let texts = ["what is a dense retriever".to_string(), "inner product".to_string()];
    let t = TextOptions::default();
    let back = EncoderOptions {
        lora: Some(lora(AdapterSource::Saved(out.path().to_path_buf()), true)),
        ..reranker_options(false)
    };
    let reread = Encoder::load(&tiny_dir("llama"), None, &back).unwrap();
    let (a, b) = (trained.embed(&texts, &t, 2).unwrap(), reread.embed(&texts, &t, 2).unwrap());
    assert!(max_abs_diff_of(&a, &b) <= SCORE_ATOL, "{a:?} vs {b:?}");
    // BERT's pooler is frozen under LoRA: a base without one is refused.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny_dir("bert").join(f), tmp.path().join(f)).unwrap();
    }
    let mut w =
        candle_core::safetensors::load(tiny_dir("bert").join("model.safetensors"), &Device::Cpu)
            .unwrap();
    w.retain(|k, _| !k.starts_with("pooler."));
    candle_core::safetensors::save(&w, tmp.path().join("model.safetensors")).unwrap();
    let bert_lora = LoraConfig {
        target_modules: vec!["query".into()],
        r: 2,
        lora_alpha: 4.0,
        lora_dropout: 0.0,
        use_rslora: false,
    };
    let opts = EncoderOptions {
        trainable: true,
        lora: Some(lora(AdapterSource::Fresh(bert_lora), false)),
        ..reranker_options(true)
    };
    let err = Encoder::load(tmp.path(), None, &opts).err().unwrap().to_string();
    assert!(err.contains("pooler.dense.weight") && err.contains("train the full model"), "{err}");
}
