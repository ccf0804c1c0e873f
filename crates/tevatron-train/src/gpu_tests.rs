//! The optimizer's GPU kernels on a real GPU against the same computation on the CPU:
//! AdamW in place and the gradient sum of squares (see `tevatron-model`'s `gpu_tests.rs` for the
//! model's kernels). Compiled with the `cuda` feature only; without a visible GPU each test
//! says so and passes without checking anything: `scripts/gpu-check.sh` runs them on the GPU
//! machine, where a skip fails the check.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use candle_core::{Device, Tensor};
use tevatron_model::testing::{first_gpu as gpu, rel_diff, wave};

use crate::fused_adamw::{adamw_step_in_place, AdamWStep};
use crate::grad_norm::sum_of_squares;

#[test]
fn gpu_adamw_in_place_equals_the_cpu_step() {
    let Some(dev) = gpu() else { return };
    let n = 100_003;
    let step = AdamWStep::example();
    let run = |dev: &Device| {
        let t = |v: Vec<f32>| Tensor::from_vec(v, (n,), dev).unwrap();
        let v2: Vec<f32> = wave(n, 0.07, 1.0).iter().map(|x| x * x).collect();
        let (w, g, m, v) =
            (t(wave(n, 0.37, 1.0)), t(wave(n, 1.3, 1.0)), t(wave(n, 0.11, 1.0)), t(v2));
        for _ in 0..2 {
            adamw_step_in_place(&w, &g, &m, &v, step).unwrap();
        }
        [w, m, v]
    };
    let (cpu, on_gpu) = (run(&Device::Cpu), run(&dev));
    for (name, (g, c)) in
        ["weight", "first moment", "second moment"].iter().zip(on_gpu.iter().zip(&cpu))
    {
        let d = rel_diff(g, c);
        eprintln!("adamw {name}: differs by {d:.1e}");
        assert!(d <= 1e-6, "AdamW's {name} on the GPU differs from the CPU's by {d:.1e}");
    }
}

#[test]
fn gpu_sum_of_squares_equals_the_cpu() {
    let Some(dev) = gpu() else { return };
    let sizes = [1, 7, 384, 100_003, 384 * 1536];
    let grads = |dev: &Device| -> Vec<Tensor> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Tensor::from_vec(wave(n, 0.3 + i as f32, 1.5), (n,), dev).unwrap())
            .collect()
    };
    let (cpu, on_gpu) =
        (sum_of_squares(&grads(&Device::Cpu)).unwrap(), sum_of_squares(&grads(&dev)).unwrap());
    let d = ((on_gpu - cpu) / cpu).abs();
    eprintln!("sum of squares: {on_gpu} on the GPU, {cpu} on the CPU, relative difference {d:.1e}");
    assert!(d <= 1e-6, "the GPU's sum of squares {on_gpu} differs from the CPU's {cpu}");
}
