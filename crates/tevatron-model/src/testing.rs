//! Tolerances and comparison helpers shared by the parity tests, written once (design.md,
//! Testing). Public so that the train crate's tests use the same numbers.

use candle_core::{Result, Tensor};

/// f32 CPU vs torch CPU, hidden states and pools.
pub const HIDDEN_ATOL: f32 = 1e-5;
/// Real-model embeddings vs sentence-transformers/transformers.
pub const EMBEDDING_ATOL: f32 = 1e-4;

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        candle_core::bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims());
    }
    let a = a.to_dtype(candle_core::DType::F32)?;
    let b = b.to_dtype(candle_core::DType::F32)?;
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// A committed tiny random model of `testdata/tiny` (parity fixtures).
pub fn tiny_dir(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny").join(name)
}

/// Loads a tiny fixture model with `pooling`, no normalisation and `opts` otherwise; panics
/// with the loader's message if it fails (tests only).
pub fn load_tiny(
    name: &str,
    pooling: crate::Pooling,
    opts: crate::EncoderOptions,
) -> crate::Encoder {
    let opts = crate::EncoderOptions { pooling: Some(pooling), normalize: Some(false), ..opts };
    crate::Encoder::load(&tiny_dir(name), None, &opts)
        .unwrap_or_else(|e| panic!("loading tiny model {name}: {e}"))
}
