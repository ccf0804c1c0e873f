//! The contrastive (InfoNCE) loss of Tevatron's `EncoderModel`: scores `q p^T`, divided by the
//! temperature, cross-entropy against each query's own positive at index `i * G`, with every
//! other passage of the batch as a negative. A function of the representations alone, so that
//! GradCache needs no other loss code. Knows nothing of models.

use candle_core::{bail, Result, Tensor};

/// Mean cross-entropy of `(q @ p^T) / temperature` with targets `i * G`, where
/// `G = p.rows / q.rows` (passages are query-major: `[q0 pos, q0 negs.., q1 pos, ...]`).
pub fn contrastive(q: &Tensor, p: &Tensor, temperature: f64) -> Result<Tensor> {
    let (b, d) = q.dims2()?;
    let (n, dp) = p.dims2()?;
    if d != dp {
        bail!("query width {d} differs from passage width {dp}");
    }
    if b == 0 || n % b != 0 {
        bail!("{n} passages are not a whole group per each of {b} queries");
    }
    if temperature <= 0.0 {
        bail!("temperature must be positive, got {temperature}");
    }
    let group = n / b;
    let scores = (q.matmul(&p.t()?)? / temperature)?; // (b, b·g)
    let targets = Tensor::arange_step(0u32, (b * group) as u32, group as u32, q.device())?;
    candle_nn::loss::cross_entropy(&scores, &targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use tevatron_model::testing::max_abs_diff_f64;

    fn fixture() -> std::collections::HashMap<String, Tensor> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/loss/expected.safetensors");
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    /// Loss and gradients equal PyTorch's (scripts/fixtures/make_loss.py) at T = 1 and 0.01.
    #[test]
    fn loss_and_gradients_match_pytorch() {
        let f = fixture();
        for (t, name) in [(1.0, "t1"), (0.01, "t001")] {
            let q = Var::from_tensor(&f["q"]).unwrap();
            let p = Var::from_tensor(&f["p"]).unwrap();
            let loss = contrastive(q.as_tensor(), p.as_tensor(), t).unwrap();
            let want = f[&format!("loss_{name}")].to_vec1::<f64>().unwrap()[0];
            let got = loss.to_scalar::<f64>().unwrap();
            assert!((got - want).abs() <= 1e-10 * want.abs().max(1.0), "{name}: {got} vs {want}");
            let grads = loss.backward().unwrap();
            for (var, key) in [(&q, "dq"), (&p, "dp")] {
                let g = grads.get(var.as_tensor()).unwrap();
                let d = max_abs_diff_f64(g, &f[&format!("{key}_{name}")]).unwrap();
                assert!(d <= 1e-10, "{key} {name} differs by {d}");
            }
        }
    }

    /// Central differences in f64 agree with autograd on every coordinate.
    #[test]
    fn gradients_match_finite_differences() {
        let f = fixture();
        let (q0, p0) = (f["q"].clone(), f["p"].clone());
        let q = Var::from_tensor(&q0).unwrap();
        let grads = contrastive(q.as_tensor(), &p0, 0.5).unwrap().backward().unwrap();
        let auto =
            grads.get(q.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = q0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-6;
        for (i, &a) in auto.iter().enumerate() {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, q0.shape(), &Device::Cpu).unwrap();
                contrastive(&t, &p0, 0.5).unwrap().to_scalar::<f64>().unwrap()
            };
            let num = (eval(eps) - eval(-eps)) / (2.0 * eps);
            assert!(
                (a - num).abs() <= 1e-6 * a.abs().max(num.abs()).max(1.0),
                "coordinate {i}: {a} vs {num}"
            );
        }
        assert_eq!(q0.dtype(), DType::F64);
    }

    #[test]
    fn bad_shapes_are_refused() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let p = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        assert!(contrastive(&q, &p, 1.0).unwrap_err().to_string().contains("not a whole group"));
        let p = Tensor::zeros((4, 5), DType::F32, &dev).unwrap();
        assert!(contrastive(&q, &p, 1.0).unwrap_err().to_string().contains("differs"));
    }
}
