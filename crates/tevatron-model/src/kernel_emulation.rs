//! The GPU kernels of `kernels/train.cu`, run on the CPU (`kernels/emulate.hpp`: a block's
//! threads are OS threads, a warp's shuffles meet at a barrier) with the launch shapes of
//! `cuda_kernels`, against the CPU ops they stand in for on a GPU. This proves the kernels'
//! indexing, reductions and formulas on machines without a GPU; the Rust launch code around
//! them runs only on a GPU (`scripts/gpu-check.sh`, whose training parts go through it).
#![cfg(kernel_emulation)]

use candle_core::{DType, Device, Tensor, Var};

use crate::backbone::train_ops;
use crate::cuda_kernels::{ColumnChunks, Launch, CHUNK_ROWS};
use crate::fused_adamw::{adamw_step, AdamWStep};
use crate::rng::{keep_threshold, SplitMix64};

extern "C" {
    fn emu_rms_norm_f32(
        g: u32,
        b: u32,
        x: *const f32,
        w: *const f32,
        y: *mut f32,
        rows: u64,
        h: u32,
        eps: f32,
    );
    fn emu_rms_norm_grad_f32(
        g: u32,
        b: u32,
        x: *const f32,
        w: *const f32,
        grad: *const f32,
        dx: *mut f32,
        stats: *mut f32,
        rows: u64,
        h: u32,
        eps: f32,
    );
    fn emu_rms_norm_param_partials_f32(
        g: u32,
        b: u32,
        x: *const f32,
        grad: *const f32,
        stats: *const f32,
        partial: *mut f32,
        rows: u64,
        h: u32,
        chunk_rows: u64,
        column_blocks: u32,
    );
    #[allow(clippy::too_many_arguments)]
    fn emu_rotary_f32(
        g: u32,
        b: u32,
        x: *const f32,
        cos: *const f32,
        sin: *const f32,
        y: *mut f32,
        pairs: u64,
        width: u32,
        len: u32,
        dim: u32,
        sign: f32,
    );
    fn emu_swiglu_f32(g: u32, b: u32, gate: *const f32, up: *const f32, y: *mut f32, n: u64);
    fn emu_swiglu_grad_f32(
        g: u32,
        b: u32,
        gate: *const f32,
        up: *const f32,
        dy: *const f32,
        out: *mut f32,
        n: u64,
    );
    fn emu_dropout_f32(
        g: u32,
        b: u32,
        x: *const f32,
        y: *mut f32,
        n: u64,
        base: u64,
        threshold: u64,
        scale: f32,
    );
    fn emu_dropout_f64(
        g: u32,
        b: u32,
        x: *const f64,
        y: *mut f64,
        n: u64,
        base: u64,
        threshold: u64,
        scale: f32,
    );
    #[allow(clippy::too_many_arguments)]
    fn emu_adamw_f32(
        g: u32,
        b: u32,
        w: *const f32,
        grad: *const f32,
        mv: *const f32,
        out: *mut f32,
        n: u64,
        b1: f32,
        one_minus_b1: f32,
        b2: f32,
        one_minus_b2: f32,
        eps: f32,
        bc2_sqrt: f32,
        step_size: f32,
        decay: f32,
    );
    fn emu_layer_norm_f32(
        g: u32,
        b: u32,
        x: *const f32,
        w: *const f32,
        bias: *const f32,
        y: *mut f32,
        rows: u64,
        h: u32,
        eps: f32,
    );
    fn emu_layer_norm_grad_f32(
        g: u32,
        b: u32,
        x: *const f32,
        w: *const f32,
        grad: *const f32,
        dx: *mut f32,
        stats: *mut f32,
        rows: u64,
        h: u32,
        eps: f32,
    );
    fn emu_layer_norm_param_partials_f32(
        g: u32,
        b: u32,
        x: *const f32,
        grad: *const f32,
        stats: *const f32,
        partial: *mut f32,
        rows: u64,
        h: u32,
        chunk_rows: u64,
        column_blocks: u32,
    );
    fn emu_column_partials_f32(
        g: u32,
        b: u32,
        grad: *const f32,
        partial: *mut f32,
        rows: u64,
        width: u32,
        chunk_rows: u64,
        column_blocks: u32,
    );
    fn emu_bias_add_f32(
        g: u32,
        b: u32,
        y: *const f32,
        bias: *const f32,
        out: *mut f32,
        n: u64,
        h: u32,
    );
    fn emu_column_chunks_sum_f32(
        g: u32,
        b: u32,
        partial: *const f32,
        out: *mut f32,
        chunks: u64,
        width: u32,
    );
    fn emu_masked_softmax_f32(
        g: u32,
        b: u32,
        x: *const f32,
        bias: *const f32,
        y: *mut f32,
        rows: u64,
        n: u32,
        rows_per_batch: u64,
        queries: u64,
    );
    fn emu_softmax_grad_f32(
        g: u32,
        b: u32,
        y: *const f32,
        grad: *const f32,
        dx: *mut f32,
        rows: u64,
        n: u32,
    );
    fn emu_gelu_f32(g: u32, b: u32, x: *const f32, y: *mut f32, n: u64);
    fn emu_gelu_grad_f32(g: u32, b: u32, x: *const f32, grad: *const f32, dx: *mut f32, n: u64);
}

/// A column sum's two passes as the GPU runs them: `partials(launch, buffer)` runs a per-chunk
/// kernel into a buffer of `chunks` rows of `width`, then the chunks are added in order.
fn column_sums(
    chunks: ColumnChunks,
    width: usize,
    partials: impl FnOnce(Launch, *mut f32),
) -> Vec<f32> {
    let mut partial = vec![f32::NAN; chunks.chunks as usize * width];
    partials(chunks.partials(), partial.as_mut_ptr());
    let mut sums = vec![f32::NAN; width];
    let s = Launch::elements(width);
    let (p, out) = (partial.as_ptr(), sums.as_mut_ptr());
    unsafe { emu_column_chunks_sum_f32(s.grid, s.block, p, out, chunks.chunks, width as u32) };
    sums
}

/// `n` values spread over about [-3, 3] without a pattern a wrong index could hide behind.
fn wave(n: usize, k: f32) -> Vec<f32> {
    (0..n).map(|i| 3.0 * ((i as f32 + 1.0) * k).sin() * ((i as f32) * 0.013).cos()).collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

/// The largest difference relative to `max(1, |want|)`, after checking the lengths agree.
fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0.0, f32::max)
}

#[test]
fn emulated_dropout_keeps_what_the_cpu_stream_keeps() {
    let (n, p) = (3001, 0.1);
    let mut rng = SplitMix64::new(11);
    rng.next_u64();
    let base = rng.clone().skip_mask(0);
    let keep = rng.keep_mask(n, p);
    let scale = (1.0 / (1.0 - p)) as f32;
    let x = wave(n, 0.7);
    let mut y = vec![f32::NAN; n];
    let l = Launch::elements(n);
    unsafe {
        emu_dropout_f32(
            l.grid,
            l.block,
            x.as_ptr(),
            y.as_mut_ptr(),
            n as u64,
            base,
            keep_threshold(p),
            scale,
        )
    };
    for i in 0..n {
        let want = if keep[i] == 1 { x[i] * scale } else { 0.0 };
        assert_eq!(y[i], want, "element {i}");
    }
    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let mut y64 = vec![f64::NAN; n];
    unsafe {
        emu_dropout_f64(
            l.grid,
            l.block,
            x64.as_ptr(),
            y64.as_mut_ptr(),
            n as u64,
            base,
            keep_threshold(p),
            scale,
        )
    };
    let kept = y64.iter().zip(&keep).filter(|(y, &k)| (**y != 0.0) == (k == 1)).count();
    assert_eq!(kept, n);
}

#[test]
fn emulated_adamw_equals_the_cpu_step_bit_for_bit() {
    let n = 2100;
    let step = AdamWStep {
        beta1: 0.9,
        one_minus_beta1: 0.1,
        beta2: 0.999,
        one_minus_beta2: 0.001,
        eps: 1e-8,
        bc2_sqrt: 0.05,
        step_size: 1e-3,
        decay: 0.99,
    };
    let (w, g, m, v) = (wave(n, 0.3), wave(n, 1.1), wave(n, 0.05), wave(n, 0.02));
    let v: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    let t = |x: &[f32]| tensor(x, &[n]);
    let (w2, m2, v2) = adamw_step(&t(&w), &t(&g), &t(&m), &t(&v), step).unwrap();
    let mv = [m, v].concat();
    let mut out = vec![f32::NAN; 3 * n];
    let l = Launch::elements(n);
    let s = step;
    unsafe {
        emu_adamw_f32(
            l.grid,
            l.block,
            w.as_ptr(),
            g.as_ptr(),
            mv.as_ptr(),
            out.as_mut_ptr(),
            n as u64,
            s.beta1,
            s.one_minus_beta1,
            s.beta2,
            s.one_minus_beta2,
            s.eps,
            s.bc2_sqrt,
            s.step_size,
            s.decay,
        )
    };
    assert_eq!(out, [values(&w2), values(&m2), values(&v2)].concat());
}

/// Layer norm forward and backward over rows of 48 (lanes with one and two elements) and of
/// 300 (more columns than a block has threads), with rows cut into several column-sum chunks,
/// the last one partial.
#[test]
fn emulated_layer_norm_and_its_gradients_equal_the_cpu_op() {
    let eps = 1e-12;
    for (rows, h) in [(150usize, 48usize), (70, 300)] {
        let n = rows * h;
        let (x, w, b, g) = (wave(n, 0.37), wave(h, 1.7), wave(h, 0.9), wave(n, 2.3));
        let xv = Var::from_tensor(&tensor(&x, &[rows, h])).unwrap();
        let wv = Var::from_tensor(&tensor(&w, &[h])).unwrap();
        let bv = Var::from_tensor(&tensor(&b, &[h])).unwrap();
        let y = train_ops::layer_norm(&xv, &wv, &bv, eps).unwrap();
        let grads =
            (y.clone() * tensor(&g, &[rows, h])).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| values(grads.get(v).unwrap());

        let mut got = vec![f32::NAN; n];
        let l = Launch::rows(rows);
        let (rows64, h32, e) = (rows as u64, h as u32, eps as f32);
        unsafe {
            emu_layer_norm_f32(
                l.grid,
                l.block,
                x.as_ptr(),
                w.as_ptr(),
                b.as_ptr(),
                got.as_mut_ptr(),
                rows64,
                h32,
                e,
            )
        };
        assert!(max_rel_diff(&got, &values(&y)) < 1e-5, "forward, h {h}");

        let mut dx = vec![f32::NAN; n];
        let mut stats = vec![f32::NAN; 2 * rows];
        unsafe {
            emu_layer_norm_grad_f32(
                l.grid,
                l.block,
                x.as_ptr(),
                w.as_ptr(),
                g.as_ptr(),
                dx.as_mut_ptr(),
                stats.as_mut_ptr(),
                rows64,
                h32,
                e,
            )
        };
        assert!(max_rel_diff(&dx, &grad(&xv)) < 1e-4, "dx, h {h}");

        let chunks = ColumnChunks::new(rows, h);
        assert!(chunks.chunks > 1 && !(rows as u64).is_multiple_of(CHUNK_ROWS));
        let sums = column_sums(chunks, 2 * h, |p, partial| unsafe {
            emu_layer_norm_param_partials_f32(
                p.grid,
                p.block,
                x.as_ptr(),
                g.as_ptr(),
                stats.as_ptr(),
                partial,
                rows64,
                h32,
                CHUNK_ROWS,
                chunks.column_blocks,
            )
        });
        assert!(max_rel_diff(&sums[..h], &grad(&wv)) < 1e-4, "dw, h {h}");
        assert!(max_rel_diff(&sums[h..], &grad(&bv)) < 1e-4, "db, h {h}");
    }
}

/// The masked softmax over rows of 37 keys (lanes with one and two elements) under a padding
/// mask `(b, 1, 1, n)` and a causal one `(b, 1, n, n)`, and its backward.
#[test]
fn emulated_masked_softmax_and_its_gradient_equal_the_cpu_op() {
    let (b, heads, n) = (2usize, 3usize, 37usize);
    let len = b * heads * n * n;
    let scores = wave(len, 0.61);
    let g = wave(len, 1.9);
    let padding: Vec<f32> =
        (0..b * n).map(|i| if i % n >= n - 5 * (i / n) { f32::MIN } else { 0.0 }).collect();
    let causal: Vec<f32> =
        (0..b * n * n).map(|i| if i % n > (i / n) % n { f32::MIN } else { 0.0 }).collect();
    for (bias, bias_shape) in [(padding, [b, 1, 1, n]), (causal, [b, 1, n, n])] {
        let sv = Var::from_tensor(&tensor(&scores, &[b, heads, n, n])).unwrap();
        let y = train_ops::masked_softmax(&sv, &tensor(&bias, &bias_shape)).unwrap();
        let grads = (y.clone() * tensor(&g, &[b, heads, n, n]))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want_dx = values(grads.get(&sv).unwrap());

        let rows = b * heads * n;
        let queries = bias.len() / (b * n);
        let mut got = vec![f32::NAN; len];
        let l = Launch::rows(rows);
        unsafe {
            emu_masked_softmax_f32(
                l.grid,
                l.block,
                scores.as_ptr(),
                bias.as_ptr(),
                got.as_mut_ptr(),
                rows as u64,
                n as u32,
                (heads * n) as u64,
                queries as u64,
            )
        };
        assert!(max_rel_diff(&got, &values(&y)) < 1e-6, "forward, {queries} mask rows");
        assert!(got.iter().zip(values(&y)).all(|(a, b)| (*a == 0.0) == (b == 0.0)));

        let mut dx = vec![f32::NAN; len];
        unsafe {
            emu_softmax_grad_f32(
                l.grid,
                l.block,
                got.as_ptr(),
                g.as_ptr(),
                dx.as_mut_ptr(),
                rows as u64,
                n as u32,
            )
        };
        assert!(max_rel_diff(&dx, &want_dx) < 1e-5, "backward, {queries} mask rows");
    }
}

#[test]
fn emulated_gelu_and_its_gradient_equal_the_cpu_op() {
    let n = 1500;
    let x: Vec<f32> = (0..n).map(|i| -9.0 + 18.0 * i as f32 / n as f32).collect();
    let g = wave(n, 0.77);
    let xv = Var::from_tensor(&tensor(&x, &[n])).unwrap();
    let y = train_ops::gelu(&xv).unwrap();
    let grads = (y.clone() * tensor(&g, &[n])).unwrap().sum_all().unwrap().backward().unwrap();
    let l = Launch::elements(n);
    let (mut got, mut dx) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    unsafe {
        emu_gelu_f32(l.grid, l.block, x.as_ptr(), got.as_mut_ptr(), n as u64);
        emu_gelu_grad_f32(l.grid, l.block, x.as_ptr(), g.as_ptr(), dx.as_mut_ptr(), n as u64);
    }
    assert!(max_rel_diff(&got, &values(&y)) < 2e-6);
    assert!(max_rel_diff(&dx, &values(grads.get(&xv).unwrap())) < 2e-6);
    assert_eq!(y.dtype(), DType::F32);
}

/// The bias add and its bias gradient (a column sum in chunks) over rows of 300 (more columns
/// than a block has threads).
#[test]
fn emulated_bias_add_and_column_sum_equal_the_cpu_op() {
    let (rows, h) = (130usize, 300usize);
    let n = rows * h;
    let (y, b, g) = (wave(n, 0.41), wave(h, 1.3), wave(n, 0.29));
    let bv = Var::from_tensor(&tensor(&b, &[h])).unwrap();
    let yv = Var::from_tensor(&tensor(&y, &[rows, h])).unwrap();
    let out = train_ops::bias_add(&yv, &bv).unwrap();
    let grads =
        (out.clone() * tensor(&g, &[rows, h])).unwrap().sum_all().unwrap().backward().unwrap();

    let mut got = vec![f32::NAN; n];
    let l = Launch::elements(n);
    unsafe {
        emu_bias_add_f32(
            l.grid,
            l.block,
            y.as_ptr(),
            b.as_ptr(),
            got.as_mut_ptr(),
            n as u64,
            h as u32,
        )
    };
    assert_eq!(got, values(&out));

    let chunks = ColumnChunks::new(rows, h);
    assert!(chunks.chunks > 1 && chunks.column_blocks > 1);
    let sums = column_sums(chunks, h, |p, partial| unsafe {
        emu_column_partials_f32(
            p.grid,
            p.block,
            g.as_ptr(),
            partial,
            rows as u64,
            h as u32,
            CHUNK_ROWS,
            chunks.column_blocks,
        )
    });
    assert!(max_rel_diff(&sums, &values(grads.get(&bv).unwrap())) < 1e-5);
}

/// RMSNorm forward and backward over rows of 48 and of 300, in several column-sum chunks.
#[test]
fn emulated_rms_norm_and_its_gradients_equal_the_cpu_op() {
    let eps = 1e-6;
    for (rows, h) in [(150usize, 48usize), (70, 300)] {
        let n = rows * h;
        let (x, w, g) = (wave(n, 0.53), wave(h, 1.1), wave(n, 1.7));
        let xv = Var::from_tensor(&tensor(&x, &[rows, h])).unwrap();
        let wv = Var::from_tensor(&tensor(&w, &[h])).unwrap();
        let y = train_ops::rms_norm(&xv, &wv, eps).unwrap();
        let grads =
            (y.clone() * tensor(&g, &[rows, h])).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| values(grads.get(v).unwrap());

        let l = Launch::rows(rows);
        let (rows64, h32, e) = (rows as u64, h as u32, eps as f32);
        let mut got = vec![f32::NAN; n];
        unsafe {
            emu_rms_norm_f32(
                l.grid,
                l.block,
                x.as_ptr(),
                w.as_ptr(),
                got.as_mut_ptr(),
                rows64,
                h32,
                e,
            )
        };
        assert!(max_rel_diff(&got, &values(&y)) < 1e-5, "forward, h {h}");

        let (mut dx, mut stats) = (vec![f32::NAN; n], vec![f32::NAN; rows]);
        unsafe {
            emu_rms_norm_grad_f32(
                l.grid,
                l.block,
                x.as_ptr(),
                w.as_ptr(),
                g.as_ptr(),
                dx.as_mut_ptr(),
                stats.as_mut_ptr(),
                rows64,
                h32,
                e,
            )
        };
        assert!(max_rel_diff(&dx, &grad(&xv)) < 1e-4, "dx, h {h}");

        let chunks = ColumnChunks::new(rows, h);
        let dw = column_sums(chunks, h, |p, partial| unsafe {
            emu_rms_norm_param_partials_f32(
                p.grid,
                p.block,
                x.as_ptr(),
                g.as_ptr(),
                stats.as_ptr(),
                partial,
                rows64,
                h32,
                CHUNK_ROWS,
                chunks.column_blocks,
            )
        });
        assert!(max_rel_diff(&dw, &grad(&wv)) < 1e-4, "dw, h {h}");
    }
}

/// Rotary positions over `(b, len, heads, d)` with HF's tables, and the turn back that is its
/// backward.
#[test]
fn emulated_rotary_and_its_gradient_equal_the_cpu_op() {
    let (b, len, heads, d) = (2usize, 5usize, 3usize, 8usize);
    let n = b * len * heads * d;
    let (x, g) = (wave(n, 0.83), wave(n, 1.21));
    let (mut cos, mut sin) = (vec![0f32; len * d], vec![0f32; len * d]);
    for p in 0..len {
        for j in 0..d {
            let angle = p as f32 / 10000f32.powf((2 * (j % (d / 2))) as f32 / d as f32);
            (cos[p * d + j], sin[p * d + j]) = (angle.cos(), angle.sin());
        }
    }
    let xv = Var::from_tensor(&tensor(&x, &[b, len, heads, d])).unwrap();
    let (ct, st) = (tensor(&cos, &[len, d]), tensor(&sin, &[len, d]));
    let y = train_ops::rotary(&xv, &ct, &st).unwrap();
    let grads = (y.clone() * tensor(&g, &[b, len, heads, d]))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let pairs = (n / 2) as u64;
    let l = Launch::elements(n / 2);
    let (mut got, mut dx) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    let (width, len32, d32) = ((heads * d) as u32, len as u32, d as u32);
    unsafe {
        emu_rotary_f32(
            l.grid,
            l.block,
            x.as_ptr(),
            cos.as_ptr(),
            sin.as_ptr(),
            got.as_mut_ptr(),
            pairs,
            width,
            len32,
            d32,
            1.0,
        );
        emu_rotary_f32(
            l.grid,
            l.block,
            g.as_ptr(),
            cos.as_ptr(),
            sin.as_ptr(),
            dx.as_mut_ptr(),
            pairs,
            width,
            len32,
            d32,
            -1.0,
        );
    }
    assert_eq!(got, values(&y));
    assert_eq!(dx, values(grads.get(&xv).unwrap()));
}

#[test]
fn emulated_swiglu_and_its_gradients_equal_the_cpu_op() {
    let n = 1300;
    let (gate, up, dy) = (wave(n, 0.9), wave(n, 0.31), wave(n, 1.4));
    let gv = Var::from_tensor(&tensor(&gate, &[n])).unwrap();
    let uv = Var::from_tensor(&tensor(&up, &[n])).unwrap();
    let y = train_ops::swiglu(&gv, &uv).unwrap();
    let grads = (y.clone() * tensor(&dy, &[n])).unwrap().sum_all().unwrap().backward().unwrap();
    let l = Launch::elements(n);
    let (mut got, mut both) = (vec![f32::NAN; n], vec![f32::NAN; 2 * n]);
    unsafe {
        emu_swiglu_f32(l.grid, l.block, gate.as_ptr(), up.as_ptr(), got.as_mut_ptr(), n as u64);
        emu_swiglu_grad_f32(
            l.grid,
            l.block,
            gate.as_ptr(),
            up.as_ptr(),
            dy.as_ptr(),
            both.as_mut_ptr(),
            n as u64,
        );
    }
    assert!(max_rel_diff(&got, &values(&y)) < 1e-6);
    assert!(max_rel_diff(&both[..n], &values(grads.get(&gv).unwrap())) < 1e-6);
    assert!(max_rel_diff(&both[n..], &values(grads.get(&uv).unwrap())) < 1e-6);
}
