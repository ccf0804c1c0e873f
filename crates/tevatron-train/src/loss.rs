//! The training losses, each a function of the model's outputs alone (so that GradCache needs
//! no other loss code; nothing here knows of models):
//! - the contrastive (InfoNCE) loss of Tevatron's `EncoderModel`: scores `q p^T`, divided by the
//!   temperature, cross-entropy against each query's own positive at index `i * G`, with every
//!   other passage of the batch as a negative;
//! - the listwise loss of Tevatron's `RerankerModel`: each group's `G` logits, cross-entropy
//!   against the first (the positive);
//! - the distillation loss of Tevatron's `DistilTevatronTrainer`: the KL divergence from the
//!   teacher's score distribution over each query's group to the student's.

use candle_core::{bail, Result, Tensor, D};

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

/// Mean cross-entropy of each group's logits against its first: `scores` holds `n = b * group`
/// logits (shape `(n)` or `(n, 1)`), group by group, each positive first.
pub fn listwise(scores: &Tensor, group: usize) -> Result<Tensor> {
    let n = scores.elem_count();
    if group == 0 || n == 0 || !n.is_multiple_of(group) {
        bail!("{n} scores are not whole groups of {group}");
    }
    let logits = scores.reshape((n / group, group))?;
    let targets = Tensor::zeros(n / group, candle_core::DType::U32, scores.device())?;
    candle_nn::loss::cross_entropy(&logits, &targets)
}

/// KL divergence (batch mean) from `softmax(teacher / teacher_temperature)` to
/// `log_softmax(student / student_temperature)`, where the student's scores are `q · p` over
/// each query's own group of `G = p.rows / q.rows` passages and `teacher` holds the teacher's
/// `(b, G)` scores of the same passages. Tevatron uses one `--distil_temperature` for both and
/// no `T²` factor.
pub fn distillation(
    q: &Tensor,
    p: &Tensor,
    teacher: &Tensor,
    student_temperature: f64,
    teacher_temperature: f64,
) -> Result<Tensor> {
    let (b, d) = q.dims2()?;
    let (n, dp) = p.dims2()?;
    let (tb, g) = teacher.dims2()?;
    if d != dp || tb != b || n != b * g {
        bail!("distillation needs q (b, d), p (b*G, d) and teacher scores (b, G); got q ({b}, {d}), p ({n}, {dp}), teacher ({tb}, {g})");
    }
    if student_temperature <= 0.0 || teacher_temperature <= 0.0 {
        bail!("distillation temperatures must be positive");
    }
    // (b, 1, d) x (b, d, G) -> (b, G): each query against its own group only.
    let student = q.unsqueeze(1)?.matmul(&p.reshape((b, g, d))?.transpose(1, 2)?)?.squeeze(1)?;
    let teacher = teacher.to_dtype(q.dtype())?;
    kl_divergence(&student, &teacher, student_temperature, teacher_temperature)
}

/// KL divergence, averaged over rows (PyTorch's `kl_div(..., reduction="batchmean")`), from
/// each row's `softmax(teacher / teacher_temperature)` to its
/// `softmax(student / student_temperature)`; `student` and `teacher` are `(rows, candidates)`
/// scores. The teacher's scores carry no gradient here only if the caller detached them.
pub fn kl_divergence(
    student: &Tensor,
    teacher: &Tensor,
    student_temperature: f64,
    teacher_temperature: f64,
) -> Result<Tensor> {
    let rows = student.dim(0)?;
    let log_student = candle_nn::ops::log_softmax(&(student / student_temperature)?, D::Minus1)?;
    let log_teacher = candle_nn::ops::log_softmax(&(teacher / teacher_temperature)?, D::Minus1)?;
    let kl = (log_teacher.exp()? * (log_teacher - log_student)?)?;
    kl.sum_all()? / rows.max(1) as f64
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

    /// The listwise loss equals PyTorch's cross-entropy with target 0 (hand-checked values:
    /// a group of equal logits costs ln G; a positive far ahead costs nothing).
    #[test]
    fn listwise_loss_targets_each_groups_first() {
        let dev = Device::Cpu;
        let s = Tensor::new(&[0.0f64, 0.0, 0.0, 50.0, 0.0, 0.0], &dev).unwrap();
        let loss = listwise(&s, 3).unwrap().to_scalar::<f64>().unwrap();
        assert!((loss - 3f64.ln() / 2.0).abs() < 1e-12, "{loss}");
        let s = Tensor::new(&[[1.0f64], [2.0], [3.0], [4.0]], &dev).unwrap();
        let want =
            ((1f64.exp() + 2f64.exp()).ln() - 1.0 + (3f64.exp() + 4f64.exp()).ln() - 3.0) / 2.0;
        assert!((listwise(&s, 2).unwrap().to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
        assert!(listwise(&s, 3).unwrap_err().to_string().contains("not whole groups"));
    }

    /// Distillation's loss and gradients equal PyTorch's (scripts/fixtures/make_rerank_step.py)
    /// with one temperature for both (Tevatron's) and with two.
    #[test]
    fn distillation_loss_and_gradients_match_pytorch() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/loss/distil.safetensors");
        let f = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        for (name, ts, tt) in [("same", 0.02, 0.02), ("apart", 0.05, 1.0)] {
            let q = Var::from_tensor(&f["q"]).unwrap();
            let p = Var::from_tensor(&f["p"]).unwrap();
            let loss = distillation(q.as_tensor(), p.as_tensor(), &f["teacher"], ts, tt).unwrap();
            let want = f[&format!("loss_{name}")].to_vec1::<f64>().unwrap()[0];
            let got = loss.to_scalar::<f64>().unwrap();
            assert!((got - want).abs() <= 1e-10 * want.abs().max(1.0), "{name}: {got} vs {want}");
            let grads = loss.backward().unwrap();
            for (var, key) in [(&q, "dq"), (&p, "dp")] {
                let g = grads.get(var.as_tensor()).unwrap();
                let d = max_abs_diff_f64(g, &f[&format!("{key}_{name}")]).unwrap();
                assert!(d <= 1e-9, "{key} {name} differs by {d}");
            }
        }
        let q = &f["q"];
        let bad = distillation(q, &f["p"].narrow(0, 0, 6).unwrap(), &f["teacher"], 1.0, 1.0);
        assert!(bad.unwrap_err().to_string().contains("teacher scores (b, G)"));
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
