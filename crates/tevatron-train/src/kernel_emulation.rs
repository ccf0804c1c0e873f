//! The optimizer's GPU kernels (`kernels/optim.cu`), run on the CPU through the same launch code
//! a GPU runs, against the CPU computation they stand in for (see `tevatron-model`'s
//! `kernel_emulation.rs` for what the emulation checks and what is left to a GPU).
#![cfg(kernel_emulation)]
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::ffi::{c_char, c_void};

use candle_core::{Device, Tensor};
use tevatron_model::cuda_kernels::{Kernels, Operand};
use tevatron_model::emulator::{Emulator, HostBuffer};

use crate::fused_adamw::{adamw_step, AdamWStep};

extern "C" {
    /// `kernels/emulate.cpp`'s entry point (`tevatron_model::emulator::EntryPoint`).
    fn emu_optim_launch(
        name: *const c_char,
        grid: u32,
        block: u32,
        params: *mut *mut c_void,
        kinds: *const c_char,
        sizes: *const u8,
        n: usize,
    ) -> i32;
}

/// `kernels/optim.cu` on the CPU.
const EMU: Emulator = Emulator(emu_optim_launch);

/// `n` values spread over about [-3, 3] without a pattern a wrong index could hide behind.
fn wave(n: usize, k: f32) -> Vec<f32> {
    (0..n).map(|i| 3.0 * ((i as f32 + 1.0) * k).sin() * ((i as f32) * 0.013).cos()).collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn upload(v: &[f32]) -> HostBuffer {
    EMU.upload(v).unwrap()
}

#[test]
fn emulated_adamw_equals_the_cpu_step_bit_for_bit() {
    let n = 2100;
    let step = AdamWStep::example();
    let (w, g, m, v) = (wave(n, 0.3), wave(n, 1.1), wave(n, 0.05), wave(n, 0.02));
    let v: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    let t = |x: &[f32]| Tensor::from_slice(x, n, &Device::Cpu).unwrap();
    let (w2, m2, v2) = adamw_step(&t(&w), &t(&g), &t(&m), &t(&v), step).unwrap();
    let (wb, gb, mb, vb) = (upload(&w), upload(&g), upload(&m), upload(&v));
    let operand = |b| EMU.operand(b);
    step.launch_in_place(&EMU, operand(&wb), operand(&gb), operand(&mb), operand(&vb)).unwrap();
    assert_eq!((wb.values(), mb.values(), vb.values()), (values(&w2), values(&m2), values(&v2)));
    assert_eq!(gb.values(), g, "the gradient is read, not written");
}

/// The gradient norm's two kernels over gradients of one element (most warps idle) and of
/// 70,000 (several elements per thread), through the launch code the GPU runs: the F64 sum of
/// the squares, within F32's rounding of the partials.
#[test]
fn emulated_sum_of_squares_equals_the_f64_sum() {
    let grads = [vec![3.0f32], wave(70_000, 0.011)];
    let want: f64 = grads.iter().flatten().map(|&v| f64::from(v) * f64::from(v)).sum();
    let buffers: Vec<HostBuffer> = grads.iter().map(|g| upload(g)).collect();
    let operands: Vec<Operand> = buffers.iter().map(|b| EMU.operand(b)).collect();
    let got = crate::grad_norm::launch_sum_of_squares(&EMU, &operands).unwrap().values();
    assert_eq!(got.len(), 1);
    assert!((f64::from(got[0]) - want).abs() / want < 1e-6, "{} vs {want}", got[0]);
}
