//! The GPU kernels of `kernels/train.cu`, run on the CPU (`kernels/emulate.hpp`: a block's
//! threads are OS threads, a warp's shuffles meet at a barrier) through the same launch code a
//! GPU runs (`train_ops::cuda`, written against [`Kernels`]), against the CPU ops they stand in
//! for on a GPU. The emulation checks every launch's parameters against the kernel's signature
//! (kind, size, count), and its buffers start as NaN, so a launch that passes a wrong argument
//! or leaves an output element unwritten fails here. This proves the kernels' indexing,
//! reductions and formulas and the launch code's arguments and buffer sizes on machines without
//! a GPU; what is left to a GPU (`scripts/gpu-check.sh`) is the glue from candle's storages to
//! operands and the driver itself.
#![cfg(kernel_emulation)]

use std::ffi::{c_char, c_void};

use candle_core::{DType, Device, Tensor, Var};

use crate::backbone::attention::masked_softmax_train;
use crate::backbone::linear::bias_add;
use crate::backbone::train_ops::cuda;
use crate::backbone::train_ops::SoftmaxRows;
use crate::cuda_kernels::{Arg, ColumnChunks, Kernels, Launch, Operand, CHUNK_ROWS};
use crate::emulator::{Emulator, HostBuffer};
use crate::rng::{keep_threshold, SplitMix64};
use crate::testing::max_rel_diff_of;

extern "C" {
    /// `kernels/emulate.cpp`'s entry point ([`crate::emulator::EntryPoint`]).
    fn emu_launch(
        name: *const c_char,
        grid: u32,
        block: u32,
        params: *mut *mut c_void,
        kinds: *const c_char,
        sizes: *const u8,
        n: usize,
    ) -> i32;
}

/// `kernels/train.cu` on the CPU.
const EMU: Emulator = Emulator(emu_launch);

/// An emulated buffer holding `v`.
fn upload(v: &[f32]) -> HostBuffer {
    EMU.upload(v).expect("host memory")
}

/// A copy of a test's input data in an emulated buffer (so a read outside it reads NaN), as
/// an operand.
fn input(v: &[f32]) -> Operand {
    thread_local! {
        /// The inputs of this thread's test, alive (and their guards checked) until it ends.
        static INPUTS: std::cell::RefCell<Vec<HostBuffer>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let buffer = upload(v);
    let operand = EMU.operand(&buffer);
    INPUTS.with(|inputs| inputs.borrow_mut().push(buffer));
    operand
}

/// `n` values spread over about [-3, 3] without a pattern a wrong index could hide behind.
fn wave(n: usize, k: f32) -> Vec<f32> {
    (0..n).map(|i| 3.0 * ((i as f32 + 1.0) * k).sin() * ((i as f32) * 0.013).cos()).collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Fails, saying by how much, unless `got` is within `tol` of `want` relative to
/// `max(1, |want|)`, element by element; a NaN (an element no launch wrote reads NaN here) or
/// an infinity only one side holds fails ([`max_rel_diff_of`]).
#[track_caller]
fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    let d = max_rel_diff_of(got, want);
    assert!(d < tol, "{what}: differs by {d:e} (relative), more than {tol:e}");
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

/// The emulation refuses what a GPU would run on garbage: a parameter of another width or kind,
/// parameters out of order, too few, an unknown kernel. Nothing runs then.
#[test]
fn the_emulation_refuses_a_launch_that_does_not_match_the_kernel() {
    let x = wave(64, 0.5);
    let y = EMU.alloc(64).unwrap();
    let out = EMU.operand(&y);
    let launch = |kernel: &str, args: &[Arg]| {
        // SAFETY: the buffers hold the 64 elements; mismatches are refused before running.
        unsafe { EMU.launch(kernel, Launch::elements(64), args) }.map_err(|e| e.to_string())
    };
    let error = |kernel, args: &[Arg]| launch(kernel, args).unwrap_err();
    assert!(error("gelu_f32", &[input(&x).arg(), out.arg(), Arg::U32(64)]).contains("parameter 2"));
    assert!(
        error("gelu_f32", &[input(&x).arg(), out.arg(), Arg::F32(64.0)]).contains("parameter 2")
    );
    assert!(error("gelu_f32", &[Arg::U64(64), out.arg(), input(&x).arg()]).contains("parameter 0"));
    assert!(error("gelu_f32", &[input(&x).arg(), out.arg()]).contains("2 parameters"));
    assert!(error("gelu_f64", &[input(&x).arg(), out.arg(), Arg::U64(64)]).contains("no kernel"));
    assert!(y.values().iter().all(|v| v.is_nan()), "a refused launch ran");
    launch("gelu_f32", &[input(&x).arg(), out.arg(), Arg::U64(64)]).unwrap();
    assert!(y.values().iter().all(|v| v.is_finite()));
}

/// Dropout launched here by hand: on a GPU its launch is candle's per-dtype `Map1`
/// (`backbone/dropout.rs`), since it also has BF16 and F16 kernels, which need CUDA's types.
#[test]
fn emulated_dropout_keeps_what_the_cpu_stream_keeps() {
    let (n, p) = (3001, 0.1);
    let mut rng = SplitMix64::new(11);
    rng.next_u64();
    let base = rng.clone().skip_mask(0);
    let keep = rng.keep_mask(n, p);
    let scale = (1.0 / (1.0 - p)) as f32;
    let dropout = |kernel, x: u64, y: u64| {
        let args = [
            Arg::Ptr(x),
            Arg::Ptr(y),
            Arg::U64(n as u64),
            Arg::U64(base),
            Arg::U64(keep_threshold(p)),
        ];
        let args = [&args[..], &[Arg::F32(scale)]].concat();
        // SAFETY: dropout_<t>(x, y, n, base, threshold, scale) with x and y of n elements.
        unsafe { EMU.launch(kernel, Launch::elements(n), &args) }.unwrap();
    };
    let x = wave(n, 0.7);
    let y = EMU.alloc(n).unwrap();
    dropout("dropout_f32", input(&x).address, EMU.operand(&y).address);
    for (i, y) in y.values().into_iter().enumerate() {
        let want = if keep[i] == 1 { x[i] * scale } else { 0.0 };
        assert_eq!(y, want, "element {i}");
    }
    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let mut y64 = vec![f64::NAN; n];
    dropout("dropout_f64", x64.as_ptr() as u64, y64.as_mut_ptr() as u64);
    let kept = y64.iter().zip(&keep).filter(|(y, &k)| (**y != 0.0) == (k == 1)).count();
    assert_eq!(kept, n);
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
        let y = crate::backbone::norm::layer_norm_train(&xv, &wv, &bv, eps).unwrap();
        let grads =
            (y.clone() * tensor(&g, &[rows, h])).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| values(grads.get(v).unwrap());

        let (x, w, b, g) = (input(&x), input(&w), input(&b), input(&g));
        let got = cuda::layer_norm(&EMU, x, w, b, eps as f32).unwrap().values();
        assert_close(&got, &values(&y), 1e-5, &format!("forward, h {h}"));
        let short = Operand { len: h - 1, ..b };
        let e = cuda::layer_norm(&EMU, x, w, short, eps as f32).err().unwrap().to_string();
        let want = format!("train-layer-norm: an operand of {} elements where {h} fit", h - 1);
        assert!(e.contains(&want), "{e}");

        let chunks = ColumnChunks::new(rows, h);
        assert!(chunks.chunks > 1 && !(rows as u64).is_multiple_of(CHUNK_ROWS));
        let out = cuda::norm_grad(&EMU, cuda::Norm::Layer, x, w, g, eps as f32).unwrap().values();
        assert_eq!(out.len(), n + 2 * h);
        assert_close(&out[..n], &grad(&xv), 1e-4, &format!("dx, h {h}"));
        assert_close(&out[n..n + h], &grad(&wv), 1e-4, &format!("dw, h {h}"));
        assert_close(&out[n + h..], &grad(&bv), 1e-4, &format!("db, h {h}"));
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
        let mask = tensor(&bias, &bias_shape);
        let y = masked_softmax_train(&sv, &mask).unwrap();
        let grads = (y.clone() * tensor(&g, &[b, heads, n, n]))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want_dx = values(grads.get(&sv).unwrap());

        let queries = bias.len() / (b * n);
        let shape = SoftmaxRows::new(sv.layout(), mask.layout()).unwrap();
        let got = cuda::masked_softmax(&EMU, input(&scores), input(&bias), &shape).unwrap();
        let got = got.values();
        assert_close(&got, &values(&y), 1e-6, &format!("forward, {queries} mask rows"));
        assert!(got.iter().zip(values(&y)).all(|(a, b)| (*a == 0.0) == (b == 0.0)));

        let dx = cuda::softmax_grad(&EMU, input(&got), input(&g), n).unwrap().values();
        assert_close(&dx, &want_dx, 1e-5, &format!("backward, {queries} mask rows"));
    }
}

#[test]
fn emulated_gelu_and_its_gradient_equal_the_cpu_op() {
    let n = 1500;
    let x: Vec<f32> = (0..n).map(|i| -9.0 + 18.0 * i as f32 / n as f32).collect();
    let g = wave(n, 0.77);
    let xv = Var::from_tensor(&tensor(&x, &[n])).unwrap();
    let y = crate::backbone::activation::gelu_train(&xv).unwrap();
    let grads = (y.clone() * tensor(&g, &[n])).unwrap().sum_all().unwrap().backward().unwrap();
    let got = cuda::gelu(&EMU, input(&x)).unwrap().values();
    let dx = cuda::gelu_grad(&EMU, input(&x), input(&g)).unwrap().values();
    assert_close(&got, &values(&y), 2e-6, "gelu");
    assert_close(&dx, &values(grads.get(&xv).unwrap()), 2e-6, "gelu dx");
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
    let out = bias_add(&yv, &bv).unwrap();
    let grads =
        (out.clone() * tensor(&g, &[rows, h])).unwrap().sum_all().unwrap().backward().unwrap();

    let got = cuda::bias_add(&EMU, input(&y), input(&b)).unwrap().values();
    assert_eq!(got, values(&out));

    let chunks = ColumnChunks::new(rows, h);
    assert!(chunks.chunks > 1 && chunks.column_blocks > 1);
    let sums = cuda::column_sum(&EMU, input(&g), h).unwrap().values();
    assert_close(&sums, &values(grads.get(&bv).unwrap()), 1e-5, "column sums");
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
        let y = crate::backbone::norm::rms_norm_train(&xv, &wv, eps).unwrap();
        let grads =
            (y.clone() * tensor(&g, &[rows, h])).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| values(grads.get(v).unwrap());

        let (x, w, g) = (input(&x), input(&w), input(&g));
        let got = cuda::rms_norm(&EMU, x, w, eps as f32).unwrap().values();
        assert_close(&got, &values(&y), 1e-5, &format!("forward, h {h}"));

        let out = cuda::norm_grad(&EMU, cuda::Norm::Rms, x, w, g, eps as f32).unwrap().values();
        assert_eq!(out.len(), n + h);
        assert_close(&out[..n], &grad(&xv), 1e-4, &format!("dx, h {h}"));
        assert_close(&out[n..], &grad(&wv), 1e-4, &format!("dw, h {h}"));
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
    let y = crate::backbone::rotary::rotary_train(&xv, &ct, &st).unwrap();
    let grads = (y.clone() * tensor(&g, &[b, len, heads, d]))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let dims = (b, len, heads, d);
    let rotary = |x: &[f32], inverse| {
        cuda::rotary(&EMU, input(x), dims, input(&cos), input(&sin), inverse).unwrap().values()
    };
    assert_eq!(rotary(&x, false), values(&y));
    assert_eq!(rotary(&g, true), values(grads.get(&xv).unwrap()));
    let wrong = (b, len, heads, d - 1);
    let e = cuda::rotary(&EMU, input(&x), wrong, input(&cos), input(&sin), false);
    let e = e.err().unwrap().to_string();
    assert!(e.contains(&format!("train-rotary: {n} elements are not (2, 5, 3, 7)")), "{e}");
}

#[test]
fn emulated_swiglu_and_its_gradients_equal_the_cpu_op() {
    let n = 1300;
    let (gate, up, dy) = (wave(n, 0.9), wave(n, 0.31), wave(n, 1.4));
    let gv = Var::from_tensor(&tensor(&gate, &[n])).unwrap();
    let uv = Var::from_tensor(&tensor(&up, &[n])).unwrap();
    let y = crate::backbone::activation::swiglu_train(&gv, &uv).unwrap();
    let grads = (y.clone() * tensor(&dy, &[n])).unwrap().sum_all().unwrap().backward().unwrap();
    let (gate, up, dy) = (input(&gate), input(&up), input(&dy));
    let got = cuda::swiglu(&EMU, gate, up).unwrap().values();
    let both = cuda::swiglu_grad(&EMU, gate, up, dy).unwrap().values();
    assert_close(&got, &values(&y), 1e-6, "swiglu");
    assert_close(&both[..n], &values(grads.get(&gv).unwrap()), 1e-6, "swiglu d gate");
    assert_close(&both[n..], &values(grads.get(&uv).unwrap()), 1e-6, "swiglu d up");
}

/// The embedding gradient's two kernels, through the launch code the GPU runs, against candle's
/// backward of `index_select` on the CPU: a table row read 70 times (several segments), rows
/// read once, rows never read (zero), and rows wider than a block. Other summation orders
/// than candle's differ in the last bits; the CPU twin's, the kernels' order, is bit for bit.
#[test]
fn emulated_embedding_grad_equals_the_cpu_backward() {
    use crate::backbone::lookup::{table_grad, RowGroups};
    let (rows, width, n) = (40usize, 300usize, 150usize);
    let ids: Vec<u32> = (0..n).map(|k| if k % 2 == 0 { 7 } else { (k * 13 % 31) as u32 }).collect();
    let g = wave(n * width, 0.23);
    let table = Var::from_tensor(&tensor(&wave(rows * width, 0.7), &[rows, width])).unwrap();
    let ids_t = Tensor::from_vec(ids.clone(), n, &Device::Cpu).unwrap();
    let out = table.as_tensor().index_select(&ids_t, 0).unwrap();
    let grads = (out * tensor(&g, &[n, width])).unwrap().sum_all().unwrap().backward().unwrap();
    let want = values(grads.get(table.as_tensor()).unwrap());

    let groups = RowGroups::new(&ids, rows).unwrap();
    let got = table_grad(&EMU, input(&g), width, &groups).unwrap().values();
    assert_eq!(got.len(), rows * width);
    assert_close(&got, &want, 1e-5, "embedding grad");
    assert_eq!(got, groups.table_grad(&g, width), "the CPU twin adds in the kernels' order");
    assert!(got[35 * width..36 * width].iter().all(|&v| v == 0.0), "an unread row is zero");
    let e = table_grad(&EMU, input(&g[..width]), width, &groups).err().unwrap().to_string();
    assert!(e.contains("embedding-grad: 300 elements are not 150 rows of 300"), "{e}");
}

/// The fused attention kernels (forward, and the query then key/value gradients) against
/// candle's composed attention on the CPU and its autograd: grouped-query heads (4 over 2) of
/// 40 values (lanes with one and two of them) under a padding mask and under a causal mask with
/// left padding (a query row whose every key is masked), with and without dropout drawn from
/// the same stream position; and plain heads of 8 values (lanes with none).
#[test]
fn emulated_fused_attention_and_its_gradients_equal_the_composed_ops() {
    use crate::backbone::layers::attend;
    use crate::backbone::{Mode, Training};
    use crate::rng::StreamMask;
    let (b, l) = (2usize, 9usize);
    let padding: Vec<f32> =
        (0..b * l).map(|i| if i >= 2 * l - 4 { f32::MIN } else { 0.0 }).collect();
    let causal: Vec<f32> = (0..b * l * l)
        .map(|i| {
            let (seq, row, col) = (i / (l * l), (i / l) % l, i % l);
            if col > row || (seq == 0 && col < 2) {
                f32::MIN
            } else {
                0.0
            }
        })
        .collect();
    let cases = [
        (4usize, 2usize, 40usize, &padding, [b, 1, 1, l], 0.0),
        (4, 2, 40, &causal, [b, 1, l, l], 0.3),
        (3, 3, 8, &padding, [b, 1, 1, l], 0.3),
    ];
    for (query, kv, dim, mask, mask_shape, p) in cases {
        let what = format!("{query}/{kv} heads of {dim}, mask {mask_shape:?}, dropout {p}");
        let (qn, kn) = (b * l * query * dim, b * l * kv * dim);
        let (q, k, v, g) = (wave(qn, 0.31), wave(kn, 0.57), wave(kn, 0.83), wave(qn, 1.37));
        let var = |x: &[f32], heads| Var::from_tensor(&tensor(x, &[b, l, heads, dim])).unwrap();
        let (qv, kv_, vv) = (var(&q, query), var(&k, kv), var(&v, kv));
        let heads_first = |t: &Tensor| t.transpose(1, 2).unwrap().contiguous().unwrap();
        let repeat = |t: &Tensor| {
            heads_first(t)
                .unsqueeze(2)
                .unwrap()
                .expand((b, kv, query / kv, l, dim))
                .unwrap()
                .reshape((b, query, l, dim))
                .unwrap()
        };
        let training = Training::new(None, 5);
        let bias = tensor(mask, &mask_shape);
        let y = attend(
            &heads_first(qv.as_tensor()),
            &repeat(kv_.as_tensor()),
            &repeat(vv.as_tensor()),
            &bias,
            p,
            Mode::Train(&training),
        )
        .unwrap();
        let grads =
            (y.clone() * tensor(&g, &[b, l, query * dim])).unwrap().sum_all().unwrap().backward();
        let grads = grads.unwrap();
        let grad = |v: &Var| values(grads.get(v).unwrap());

        // The composed path drew its mask first from a fresh stream of the same seed.
        let dropout = (p > 0.0)
            .then(|| StreamMask { base: Training::new(None, 5).skip_mask(b * query * l * l), p });
        let dims = cuda::AttentionDims { b, l, query, kv, dim };
        let operands = [input(&q), input(&k), input(&v), input(mask)];
        let ctx = cuda::attention(&EMU, operands, dims, dropout).unwrap().values();
        assert_close(&ctx, &values(&y), 1e-5, &format!("forward, {what}"));
        let all = [operands[0], operands[1], operands[2], operands[3], input(&g), input(&ctx)];
        let out = cuda::attention_grad(&EMU, all, dims, dropout).unwrap().values();
        assert_eq!(out.len(), qn + 2 * kn);
        assert_close(&out[..qn], &grad(&qv), 1e-4, &format!("dq, {what}"));
        assert_close(&out[qn..qn + kn], &grad(&kv_), 1e-4, &format!("dk, {what}"));
        assert_close(&out[qn + kn..], &grad(&vv), 1e-4, &format!("dv, {what}"));
        if p > 0.0 {
            let other = Some(StreamMask { base: 12345, p });
            let moved = cuda::attention(&EMU, operands, dims, other).unwrap().values();
            assert!(max_rel_diff_of(&moved, &ctx) > 1e-3, "another stream position drops others");
        }
    }
    // Refused before any launch: a mask of neither shape, heads wider than a warp holds.
    let dims = cuda::AttentionDims { b, l, query: 2, kv: 2, dim: 8 };
    let x = wave(b * l * 16, 0.1);
    let short = input(&padding[..b * l - 1]);
    let e = cuda::attention(&EMU, [input(&x), input(&x), input(&x), short], dims, None);
    assert!(e.err().unwrap().to_string().contains("mask of 17 values for 2 x 9"));
    let wide = cuda::AttentionDims { dim: 264, query: 1, kv: 1, b: 1, l: 1 };
    let y = wave(264, 0.2);
    let e = cuda::attention(&EMU, [input(&y), input(&y), input(&y), input(&[0.0])], wide, None);
    assert!(e.err().unwrap().to_string().contains("1 query heads, 1 key/value heads of 264"));
}
