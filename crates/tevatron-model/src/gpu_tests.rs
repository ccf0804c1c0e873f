//! Our GPU kernels on a real GPU against the same computation on the CPU, which the other unit
//! tests check against composed candle ops and PyTorch: every fused training op forward and
//! backward and the embedding lookup's backward (the optimizer's kernels are tested in
//! `tevatron-train`). The shapes are a MiniLM's (width
//! 384, 1,536 in the feed-forward, 12 heads, 128 tokens) plus odd ones that leave partial warps
//! and blocks.
//!
//! Compiled with the `cuda` feature only. Without a visible GPU each test says so and passes
//! without checking anything: `scripts/gpu-check.sh` runs them on the GPU machine (the binary
//! from `scripts/build-cuda.sh tests`), where a skip fails the check.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use crate::backbone::activation::gelu_train as gelu;
use crate::backbone::activation::swiglu_train as swiglu;
use crate::backbone::attention::masked_softmax_train as masked_softmax;
use crate::backbone::linear::bias_add;
use crate::backbone::lookup::embedding;
use crate::backbone::norm::{layer_norm_train as layer_norm, rms_norm_train as rms_norm};
use crate::backbone::rotary::rotary_train as rotary;
use crate::testing::{first_gpu as gpu, rel_diff, wave};
use candle_core::{DType, Device, Result, Tensor, Var};

/// Runs `op` on the CPU and on `gpu` over the same trainable inputs (one per shape), then the
/// backward of `sum(op(inputs) * upstream)`: the values and every input's gradient must agree
/// within `tol`, relative to the CPU's largest magnitude.
fn same_on_both(
    what: &str,
    gpu: &Device,
    shapes: &[&[usize]],
    op: impl Fn(&Device, &[Tensor]) -> Result<Tensor>,
    tol: f32,
) {
    let run = |dev: &Device| {
        let vars: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(i, shape)| {
                let n = shape.iter().product();
                let t = Tensor::from_vec(wave(n, 0.37 + i as f32 * 0.61, 2.0), *shape, dev);
                Var::from_tensor(&t.unwrap()).unwrap()
            })
            .collect();
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = op(dev, &inputs).unwrap();
        let upstream = Tensor::from_vec(wave(y.elem_count(), 1.13, 1.0), y.shape(), dev).unwrap();
        let grads = (&y * upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let grads: Vec<Tensor> = inputs.iter().map(|x| grads.get(x).unwrap().clone()).collect();
        (y, grads)
    };
    let (y_cpu, g_cpu) = run(&Device::Cpu);
    let (y_gpu, g_gpu) = run(gpu);
    assert!(y_gpu.device().is_cuda());
    let d = rel_diff(&y_gpu, &y_cpu);
    eprintln!("{what}: values differ by {d:.1e}");
    assert!(d <= tol, "{what}: the GPU's values differ from the CPU's by {d:.1e}");
    for (k, (g, c)) in g_gpu.iter().zip(&g_cpu).enumerate() {
        let d = rel_diff(g, c);
        eprintln!("{what}: gradient {k} differs by {d:.1e}");
        assert!(d <= tol, "{what}: gradient {k} differs from the CPU's by {d:.1e}");
    }
}

#[test]
fn gpu_gelu_swiglu_and_bias_add_equal_the_cpu() {
    let Some(dev) = gpu() else { return };
    for shape in [&[64, 1536][..], &[3, 5, 7]] {
        same_on_both("gelu", &dev, &[shape], |_, x| gelu(&x[0]), 1e-5);
        same_on_both("swiglu", &dev, &[shape, shape], |_, x| swiglu(&x[0], &x[1]), 1e-5);
    }
    same_on_both("bias add", &dev, &[&[300, 384], &[384]], |_, x| bias_add(&x[0], &x[1]), 1e-5);
    same_on_both("bias add", &dev, &[&[2, 3, 5], &[5]], |_, x| bias_add(&x[0], &x[1]), 1e-5);
}

#[test]
fn gpu_masked_softmax_equals_the_cpu() {
    let Some(dev) = gpu() else { return };
    // A padding mask: batch b hides its last 9 b keys.
    let (b, h, l) = (4, 12, 128);
    let pad: Vec<f32> =
        (0..b * l).map(|k| if k % l >= l - 9 * (k / l) { f32::MIN } else { 0.0 }).collect();
    same_on_both(
        "masked softmax (padding)",
        &dev,
        &[&[b, h, l, l]],
        |dev, x| masked_softmax(&x[0], &Tensor::from_vec(pad.clone(), (b, 1, 1, l), dev)?),
        1e-5,
    );
    // A causal mask per query, 33 keys (a partial warp).
    let causal: Vec<f32> =
        (0..2 * 33 * 33).map(|k| if k % 33 > (k / 33) % 33 { f32::MIN } else { 0.0 }).collect();
    same_on_both(
        "masked softmax (causal)",
        &dev,
        &[&[2, 3, 33, 33]],
        |dev, x| masked_softmax(&x[0], &Tensor::from_vec(causal.clone(), (2, 1, 33, 33), dev)?),
        1e-5,
    );
}

#[test]
fn gpu_layer_norm_and_rms_norm_equal_the_cpu() {
    let Some(dev) = gpu() else { return };
    for (rows, width) in [(2 * 100, 384), (3 * 5, 7), (70, 4096)] {
        same_on_both(
            "layer norm",
            &dev,
            &[&[rows, width], &[width], &[width]],
            |_, x| layer_norm(&x[0], &x[1], &x[2], 1e-12),
            1e-4,
        );
        same_on_both(
            "rms norm",
            &dev,
            &[&[rows, width], &[width]],
            |_, x| rms_norm(&x[0], &x[1], 1e-6),
            1e-4,
        );
    }
}

/// The fused attention kernels (`--attn_implementation flash_attention_2`) against the CPU's
/// fused attention, values and the gradients of q, k and v: a MiniLM batch (12 heads of 32,
/// 128 tokens, padding, attention dropout drawn from the same stream position on both), and a
/// decoder's grouped-query heads (8 over 2, 64 values, 33 tokens, causal with left padding,
/// through `rotary_attention` with tables that rotate nothing).
#[test]
fn gpu_fused_attention_equals_the_cpu() {
    use crate::backbone::attention::fused_attention_applies;
    use crate::backbone::layers::{attention, rotary_attention};
    use crate::backbone::{Mode, Training};
    let Some(dev) = gpu() else { return };
    let (b, l, heads) = (4, 128, 12);
    let pad: Vec<f32> =
        (0..b * l).map(|k| if k % l >= l - 9 * (k / l) { f32::MIN } else { 0.0 }).collect();
    same_on_both(
        "fused attention (MiniLM, dropout 0.1)",
        &dev,
        &[&[b, l, heads * 32], &[b, l, heads * 32], &[b, l, heads * 32]],
        |dev, x| {
            let training = Training::new(None, 9).with_gpu_fused_attention(true);
            let bias = Tensor::from_vec(pad.clone(), (b, 1, 1, l), dev)?;
            let mode = Mode::Train(&training);
            assert!(fused_attention_applies(&[&x[0], &x[1], &x[2], &bias], 32, 0.1, mode));
            attention(&x[0], &x[1], &x[2], &bias, heads, 0.1, Mode::Train(&training))
        },
        1e-4,
    );
    let (b, l, d) = (2, 33, 64);
    let causal: Vec<f32> = (0..b * l * l)
        .map(|k| {
            let (seq, row, col) = (k / (l * l), (k / l) % l, k % l);
            if col > row || (seq == 1 && col < 3) {
                f32::MIN
            } else {
                0.0
            }
        })
        .collect();
    same_on_both(
        "fused attention (grouped-query, causal)",
        &dev,
        &[&[b, l, 8, d], &[b, l, 2, d], &[b, l, 2, d]],
        |dev, x| {
            let training = Training::new(None, 9).with_gpu_fused_attention(true);
            let bias = Tensor::from_vec(causal.clone(), (b, 1, l, l), dev)?;
            let mode = Mode::Train(&training);
            assert!(fused_attention_applies(&[&x[0], &x[1], &x[2], &bias], d, 0.0, mode));
            let (cos, sin) =
                (Tensor::ones((l, d), DType::F32, dev)?, Tensor::zeros((l, d), DType::F32, dev)?);
            let qkv = [x[0].clone(), x[1].clone(), x[2].clone()];
            rotary_attention(qkv, (&bias, &cos, &sin), 0.0, Mode::Train(&training))
        },
        1e-4,
    );
}

#[test]
fn gpu_rotary_equals_the_cpu() {
    let Some(dev) = gpu() else { return };
    let (l, d) = (17, 64);
    let angles: Vec<f32> =
        (0..l).flat_map(|p| (0..d).map(move |j| p as f32 * 0.9f32.powi(j as i32 % 32))).collect();
    let table = |f: fn(f32) -> f32| angles.iter().map(|&a| f(a)).collect::<Vec<f32>>();
    let (cos, sin) = (table(f32::cos), table(f32::sin));
    same_on_both(
        "rotary",
        &dev,
        &[&[2, l, 4, d]],
        |dev, x| {
            rotary(
                &x[0],
                &Tensor::from_vec(cos.clone(), (l, d), dev)?,
                &Tensor::from_vec(sin.clone(), (l, d), dev)?,
            )
        },
        1e-5,
    );
}

#[test]
fn gpu_embedding_lookup_and_its_gradient_equal_the_cpu() {
    let Some(dev) = gpu() else { return };
    // 32 x 128 tokens of a 1,000-row table: row 0 read by every fourth token (many segments),
    // the others spread, most rows never read.
    let ids: Vec<u32> =
        (0..32 * 128u32).map(|k| if k % 4 == 0 { 0 } else { k * 7919 % 997 }).collect();
    same_on_both(
        "embedding",
        &dev,
        &[&[1000, 384]],
        |dev, x| embedding(&x[0], &Tensor::from_vec(ids.clone(), (32, 128), dev)?),
        1e-5,
    );
}
