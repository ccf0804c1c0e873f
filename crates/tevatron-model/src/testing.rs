//! Tolerances and comparison helpers shared by the parity tests, written once (design.md,
//! Testing). Public so that the train and CLI crates' tests use the same numbers and the same
//! comparison.
//!
//! Every numeric comparison of the workspace's tests goes through [`max_abs_diff`] and its
//! siblings, because the obvious ways to take a largest difference skip NaN: `fold(0.0,
//! f32::max)` drops a NaN operand, and candle's CPU `max` skips every NaN past the first
//! element, so an all-NaN output would score 0. Here a NaN on either side makes the result NaN
//! and an infinity the other side does not share makes it infinite: either fails every
//! `d < tol` (and `d > tol`) assertion. Lengths or shapes that differ are an error, never a
//! comparison of a prefix.

use candle_core::{DType, Result, Tensor};

/// f32 CPU vs torch CPU, hidden states and pools.
pub const HIDDEN_ATOL: f32 = 1e-5;
/// Real-model embeddings vs sentence-transformers/transformers.
pub const EMBEDDING_ATOL: f32 = 1e-4;

/// The largest of `values`, NaN if any of them is NaN (where `f64::max` would drop it), 0 for
/// none.
pub fn nan_max(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut most = 0.0f64;
    for v in values {
        if v.is_nan() {
            return f64::NAN;
        }
        most = most.max(v);
    }
    most
}

/// How far apart two values are: 0 when they are equal (the same infinity included), `|a - b|`
/// otherwise, which is NaN when either is NaN and infinite when only one is infinite.
fn distance(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs()
    }
}

fn same_length(a: usize, b: usize) {
    assert_eq!(a, b, "the compared values differ in length: {a} vs {b}");
}

/// Whether two slices hold the same values bit for bit (kernels against their reference).
pub fn same_bits(got: &[f32], want: &[f32]) -> bool {
    got.len() == want.len() && got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits())
}

/// Largest absolute difference between two slices, computed in f64; NaN when either side
/// holds a NaN, infinite where one side is infinite and the other is not. Panics when the
/// lengths differ.
pub fn max_abs_diff_of(a: &[f32], b: &[f32]) -> f32 {
    same_length(a.len(), b.len());
    nan_max(a.iter().zip(b).map(|(&x, &y)| distance(f64::from(x), f64::from(y)))) as f32
}

/// Largest difference of `got` from `want` relative to `max(1, |want|)`, element by element,
/// with [`max_abs_diff_of`]'s NaN, infinity and length rules.
pub fn max_rel_diff_of(got: &[f32], want: &[f32]) -> f32 {
    same_length(got.len(), want.len());
    let rel = |g: f32, w: f32| {
        let (g, w) = (f64::from(g), f64::from(w));
        // `w.abs().max(1.0)` would be 1 for a NaN `w`; the distance is NaN then anyway.
        distance(g, w) / if w.abs() > 1.0 { w.abs() } else { 1.0 }
    };
    nan_max(got.iter().zip(want).map(|(&g, &w)| rel(g, w))) as f32
}

/// The largest magnitude in `values`, NaN if any is NaN.
pub fn max_abs_of(values: &[f32]) -> f32 {
    nan_max(values.iter().map(|&v| f64::from(v).abs())) as f32
}

/// A tensor's values as f64 (every dtype widens exactly), on the host.
fn values_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// [`max_abs_diff_f64`] as f32, for tolerances written as f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(max_abs_diff_f64(a, b)? as f32)
}

/// Largest absolute difference between two tensors of the same shape (an error otherwise), any
/// dtype, computed in f64; NaN when either holds a NaN, infinite where only one is infinite.
pub fn max_abs_diff_f64(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        candle_core::bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims());
    }
    let (a, b) = (values_f64(a)?, values_f64(b)?);
    Ok(nan_max(a.iter().zip(&b).map(|(&x, &y)| distance(x, y))))
}

/// The largest magnitude in a tensor (a scale for relative differences), NaN if any is NaN.
pub fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(nan_max(values_f64(t)?.into_iter().map(f64::abs)))
}

/// Values for a projection kernel's tests: uniform in (-1, 1) with exact zeros (every 11th),
/// outliers 40 times larger (every 11th, offset 5, as outlier channels are) and values exactly
/// halfway between two bf16 numbers (every 13th, offset 7: rounding ties).
pub fn kernel_values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = crate::rng::SplitMix64::new(seed);
    (0..n)
        .map(|i| {
            let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            match (i % 11, i % 13) {
                (0, _) => 0.0,
                (5, _) => u * 40.0,
                (_, 7) => f32::from_bits((u.to_bits() & 0xffff_0000) | 0x8000),
                _ => u,
            }
        })
        .collect()
}

/// One case of a projection kernel's property tests: a weight `(out, inputs)`, `rows` input
/// rows (the third all zeros when there are more than three) and a bias, from
/// [`kernel_values`].
pub fn projection_case(
    rows: usize,
    inputs: usize,
    out: usize,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let w = kernel_values(out * inputs, seed);
    let mut x = kernel_values(rows * inputs, seed ^ 1);
    if rows > 3 {
        x[2 * inputs..3 * inputs].fill(0.0);
    }
    (w, x, kernel_values(out, seed ^ 2))
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

/// The real model for the tests that need it: all-MiniLM-L6-v2 as `scripts/fetch-minilm.sh`
/// fetches it (or `TEVATRON_MINILM`). `None`, with a line on stderr, when it is missing; under
/// `CI=true` a missing model fails instead, so CI never skips these tests.
pub fn minilm_dir() -> Option<std::path::PathBuf> {
    let dir =
        std::env::var_os("TEVATRON_MINILM").map(std::path::PathBuf::from).unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../.cache/models/all-MiniLM-L6-v2")
        });
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var("CI").is_err(),
        "MiniLM not found at {} (run scripts/fetch-minilm.sh); CI must not skip this test",
        dir.display()
    );
    eprintln!("skipping: MiniLM not found at {} (run scripts/fetch-minilm.sh)", dir.display());
    None
}

/// MiniLM's reference texts and expected tensors (`testdata/minilm`, made by
/// `scripts/fixtures/make_minilm.py`: `mean_norm`, `cls`, `cls32`); panics if they cannot be
/// read (tests only).
pub fn minilm_fixture() -> (Vec<String>, std::collections::HashMap<String, Tensor>) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/minilm");
    let texts = std::fs::read_to_string(dir.join("texts.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| panic!("reading {}/texts.json", dir.display()));
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("reading {}/expected.safetensors: {e}", dir.display()));
    (texts, expected)
}

/// The first GPU, or `None` (with a line on stderr) when there is none: GPU tests pass without
/// checking anything where no GPU is visible (`scripts/gpu-check.sh` fails on such a skip).
pub fn first_gpu() -> Option<candle_core::Device> {
    match candle_core::Device::new_cuda(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            eprintln!("SKIPPED: no GPU ({e})");
            None
        }
    }
}

/// `n` deterministic values in `[-scale, scale]`, a different sequence for each `k`.
pub fn wave(n: usize, k: f32, scale: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + 1.0) * k).sin() * scale).collect()
}

/// The largest difference of `got` from `want` (on any devices), relative to the largest
/// magnitude in `want`: NaN when either holds a NaN, infinite for an infinity only one holds,
/// so that a non-finite value fails every tolerance.
pub fn rel_diff(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let host = |t: &Tensor| -> Vec<f32> {
        t.to_device(&candle_core::Device::Cpu)
            .and_then(|t| t.flatten_all()?.to_vec1())
            .expect("an F32 tensor")
    };
    let (got, want) = (host(got), host(want));
    max_abs_diff_of(&got, &want) / max_abs_of(&want).max(1e-30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Fails `d < tol` for any tolerance (NaN or infinite), and `d > tol` too where it is NaN.
    fn fails(d: f32) -> bool {
        d.is_nan() || d == f32::INFINITY
    }

    #[test]
    fn equal_values_are_zero_apart_and_a_difference_is_its_size() {
        assert_eq!(max_abs_diff_of(&[1.0, -2.0, f32::INFINITY], &[1.0, -2.0, f32::INFINITY]), 0.0);
        assert_eq!(max_abs_diff_of(&[1.0, -2.0, 3.0], &[1.0, -2.5, 3.25]), 0.5);
        assert_eq!(max_rel_diff_of(&[0.5, 110.0], &[0.0, 100.0]), 0.5);
        assert_eq!(max_rel_diff_of(&[0.0, 120.0], &[0.0, 100.0]), 0.2);
        assert_eq!(max_abs_diff_of(&[], &[]), 0.0);
        assert_eq!(max_abs_of(&[1.0, -3.0, 2.0]), 3.0);
    }

    #[test]
    fn a_nan_on_either_side_fails() {
        for (a, b) in [([f32::NAN, 1.0], [0.0, 1.0]), ([0.0, 1.0], [0.0, f32::NAN])] {
            assert!(max_abs_diff_of(&a, &b).is_nan());
            assert!(max_rel_diff_of(&a, &b).is_nan());
        }
        // NaN where NaN is expected is no match either: no test expects a NaN.
        assert!(max_abs_diff_of(&[f32::NAN], &[f32::NAN]).is_nan());
        assert!(max_abs_of(&[1.0, f32::NAN]).is_nan());
        assert!(nan_max([1.0, f64::NAN, 2.0]).is_nan());
        assert_eq!(nan_max([]), 0.0);
    }

    #[test]
    fn one_nan_in_a_large_vector_fails_wherever_it_is() {
        let want: Vec<f32> = (0..100_003).map(|i| (i as f32 * 0.37).sin()).collect();
        for at in [0, 1, 50_000, 100_002] {
            let mut got = want.clone();
            got[at] = f32::NAN;
            assert!(fails(max_abs_diff_of(&got, &want)), "NaN at {at}");
            assert!(fails(max_rel_diff_of(&got, &want)), "NaN at {at}");
            let (g, w) = (
                Tensor::new(got.as_slice(), &Device::Cpu).unwrap(),
                Tensor::new(want.as_slice(), &Device::Cpu).unwrap(),
            );
            assert!(fails(max_abs_diff(&g, &w).unwrap()), "NaN at {at}");
            assert!(fails(max_abs_diff(&w, &g).unwrap()), "NaN at {at}");
        }
    }

    /// The case this module exists for (candle's CPU `max` skips a NaN past the first element,
    /// so the old comparison scored an all-NaN output 0), in every dtype the tests compare.
    #[test]
    fn an_all_nan_tensor_fails_in_every_dtype() {
        let dev = Device::Cpu;
        let want = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let got = Tensor::full(f32::NAN, (3, 4), &dev).unwrap();
        let d = max_abs_diff(&got, &want).unwrap();
        assert!(d.is_nan(), "{d}");
        for dtype in [DType::BF16, DType::F16, DType::F64] {
            let (g, w) = (got.to_dtype(dtype).unwrap(), want.to_dtype(dtype).unwrap());
            assert!(max_abs_diff_f64(&g, &w).unwrap().is_nan(), "{dtype:?}");
        }
        assert!(max_abs(&got).unwrap().is_nan());
    }

    #[test]
    fn an_infinity_the_other_side_lacks_fails() {
        let inf = f32::INFINITY;
        assert_eq!(max_abs_diff_of(&[1.0, inf], &[1.0, 2.0]), inf);
        assert_eq!(max_abs_diff_of(&[1.0, 2.0], &[1.0, -inf]), inf);
        assert_eq!(max_abs_diff_of(&[inf], &[-inf]), inf);
        assert!(fails(max_rel_diff_of(&[1.0, 2.0], &[1.0, inf])));
        assert!(fails(max_rel_diff_of(&[1.0, inf], &[1.0, 2.0])));
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&t(&[0.0, inf]), &t(&[0.0, 1.0])).unwrap(), inf);
    }

    #[test]
    #[should_panic(expected = "differ in length: 3 vs 2")]
    fn slices_of_different_lengths_are_refused() {
        max_abs_diff_of(&[1.0, 2.0, 3.0], &[1.0, 2.0]);
    }

    #[test]
    #[should_panic(expected = "differ in length: 1 vs 2")]
    fn relative_slices_of_different_lengths_are_refused() {
        max_rel_diff_of(&[1.0], &[1.0, 2.0]);
    }

    #[test]
    fn tensors_of_different_shapes_are_refused() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let e = max_abs_diff(&a, &a.reshape((3, 2)).unwrap()).unwrap_err().to_string();
        assert!(e.contains("shapes differ: [2, 3] vs [3, 2]"), "{e}");
        let e = max_abs_diff(&a, &a.flatten_all().unwrap().narrow(0, 0, 5).unwrap());
        assert!(e.unwrap_err().to_string().contains("shapes differ"));
    }
}
