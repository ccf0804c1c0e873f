//! Vectorisable CPU helpers shared by the raw-buffer kernels: branch-free `erf` and `exp`
//! (candle 0.11 calls scalar libm `erff`/`expf` per element; these polynomials let the
//! compiler use SIMD), the inference attention softmax, the projections, lane reductions and
//! the parallel row loops. The inference GELU that uses `erf` is in `activation.rs`; the
//! training versions of the ops, with a backward, are in their modules.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, StorageRef, Tensor};
use rayon::prelude::*;

/// erf(x) as a rational function (Eigen's `generic_fast_erf_float`), |error| < 1e-7.
///
/// Its polynomials (and [`exp`]'s) are fused multiply-adds (`mul_add`): exactly rounded, so the
/// same bits on every CPU and path; one instruction in the copies [`with_simd!`] makes (AVX-512,
/// or AVX2 with FMA), where every caller runs them (against a multiply and an add, 4% of
/// `encode --bf16` on an AMX Xeon), and a call to libm's `fmaf` outside them (the same values,
/// many times slower: call them only from a function `with_simd!` copies, never from a closure
/// LLVM may leave out of line).
#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142e-10_f32;
    p = p.mul_add(x2, 2.770_681_4e-8);
    p = p.mul_add(x2, -2.101_024e-6);
    p = p.mul_add(x2, -5.692_506_4e-5);
    p = p.mul_add(x2, -7.349_906_3e-4);
    p = p.mul_add(x2, -2.954_6e-3);
    p = p.mul_add(x2, -1.609_603_3e-2);
    p *= x;
    let mut q = -1.456_607_2e-5_f32;
    q = q.mul_add(x2, -2.133_740_6e-4);
    q = q.mul_add(x2, -1.682_827e-3);
    q = q.mul_add(x2, -7.373_329e-3);
    q = q.mul_add(x2, -1.426_473_9e-2);
    p / q
}

/// exp(x) by range reduction to 2^n * e^g, |g| <= ln2/2, and a degree-6 Taylor polynomial
/// (fused multiply-adds: call it as [`erf`] says);
/// relative error about 2e-7 * max(1, |x|); inputs below -87 give exactly 0 (as softmax over
/// masked positions needs), above 88 are clamped, and a NaN gives a NaN.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    // Below -87 the result is (as good as) zero; returning exactly 0 keeps masked attention
    // probabilities out of the subnormal range, where every later multiply takes a slow
    // microcode path (a masked softmax made the following matrix products 10x slower).
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E;
    // Round to nearest with the 1.5 * 2^23 trick (vectorises, unlike f32::round).
    let n = (t + 12_582_912.0) - 12_582_912.0;
    let g = (t - n) * std::f32::consts::LN_2;
    let p = g.mul_add(1.0 / 720.0, 1.0 / 120.0);
    let p = p.mul_add(g, 1.0 / 24.0);
    let p = p.mul_add(g, 1.0 / 6.0);
    let p = p.mul_add(g, 0.5);
    let p = p.mul_add(g, 1.0);
    let p = p.mul_add(g, 1.0);
    // A NaN input stays NaN through `p` (and the result); its exponent is taken as 0 so that
    // the conversion below never sees a NaN.
    let n = if n.is_nan() { 0.0 } else { n };
    // SAFETY: n is an integer in [-126, 127] (x was clamped, a NaN replaced), so the
    // conversion is exact; unlike `as`, it has no saturation branch and vectorises.
    let n = unsafe { n.to_int_unchecked::<i32>() };
    let r = f32::from_bits(((n + 127) << 23) as u32) * p;
    if underflow {
        0.0
    } else {
        r
    }
}

/// The F32 values of a contiguous CPU input of custom op `op`; an error naming `op` otherwise.
pub fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{op}: only f32 is supported") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// [`contiguous_f32`] for a storage an in-place op writes.
pub fn contiguous_f32_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{op}: only f32 is supported") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Reduces with 16 independent lanes so the compiler can keep them in one SIMD register
/// (a single running accumulator is a serial dependency chain).
#[inline(always)]
pub(super) fn lanes_reduce(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = f(acc[i], c[i]);
        }
    }
    let mut r = chunks.remainder().iter().fold(init, |a, &b| f(a, b));
    for a in acc {
        r = f(r, a);
    }
    r
}

/// The sum of squares, with eight independent lanes (see [`lanes_reduce`]).
#[inline(always)]
pub(super) fn lanes_reduce_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    acc.iter().sum::<f32>() + tail
}

/// A tensor's F32 values on the CPU, borrowed from its storage; contiguous only.
pub(crate) struct Data<'a> {
    guard: StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl<'a> Data<'a> {
    /// Borrows `t`'s values; an error unless `t` is contiguous F32 on the CPU.
    pub fn of(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("cpu kernels: tensor is not contiguous")
        };
        if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
            candle_core::bail!("cpu kernels: tensor is not F32 on the CPU")
        }
        Ok(Self { guard, range: start..end })
    }

    /// The values.
    pub fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.clone()],
            // `of` admits only F32 CPU storage.
            _ => &[],
        }
    }
}

/// `x W^T (+ b)` over the rows of `x` (row-major, as wide as `weight` `(out, in)` is deep),
/// all F32 on the CPU: the output starts as the bias (or zero) and one multithreaded gemm adds
/// the product to it. Each output element is summed by one thread in a fixed order, so the
/// result is the same bits on every run.
pub(super) fn project(x: &[f32], weight: &Tensor, bias: Option<&Tensor>) -> Result<Vec<f32>> {
    let (out_dim, in_dim) = weight.dims2()?;
    let wd = Data::of(weight)?;
    let bd = bias.map(Data::of).transpose()?;
    let bias = bd.as_ref().map(Data::slice);
    let w = wd.slice();
    if in_dim == 0
        || !x.len().is_multiple_of(in_dim)
        || w.len() != out_dim * in_dim
        || bias.is_some_and(|b| b.len() != out_dim)
    {
        candle_core::bail!("cpu kernels: linear shapes do not match");
    }
    let n = x.len() / in_dim * out_dim;
    let mut y: Vec<f32> = Vec::with_capacity(n);
    match bias {
        Some(bias) => {
            let spare = &mut y.spare_capacity_mut()[..n];
            spare.par_chunks_mut(out_dim.max(1)).for_each(|row| {
                row.iter_mut().zip(bias).for_each(|(o, &b)| {
                    o.write(b);
                })
            });
            // SAFETY: every row was written with the bias just above.
            unsafe { y.set_len(n) };
            add_xwt(&mut y, x, w, in_dim, 1.0)?;
        }
        None => {
            // SAFETY: the gemm writes all rows x out_dim elements without reading them
            // (in_dim > 0 and the lengths were checked above), before the length is set.
            unsafe {
                xwt(y.as_mut_ptr(), x, w, in_dim, 1.0, false);
                y.set_len(n);
            }
        }
    }
    Ok(y)
}

/// `y += beta * x W^T` for row-major `x` `(rows, k)`, `w` `(n, k)` and `y` `(rows, n)`: one
/// multithreaded gemm (each output element summed by one thread in a fixed order).
pub(super) fn add_xwt(y: &mut [f32], x: &[f32], w: &[f32], k: usize, beta: f32) -> Result<()> {
    if k == 0 || !x.len().is_multiple_of(k) || !w.len().is_multiple_of(k) {
        candle_core::bail!("cpu kernels: inner dimension {k} does not divide the operands");
    }
    let (rows, n) = (x.len() / k, w.len() / k);
    if y.len() != rows * n {
        candle_core::bail!("cpu kernels: output of {} for {rows} x {n}", y.len());
    }
    // SAFETY: the lengths were checked above.
    unsafe { xwt(y.as_mut_ptr(), x, w, k, beta, true) };
    Ok(())
}

/// `y = beta * x W^T`, or `y += ...` with `read_dst`: the gemm behind [`project`] and
/// [`add_xwt`].
///
/// # Safety
/// `k > 0`, `x` and `w` are whole rows of `k`, and `y` has room for `x.len() / k` rows of
/// `w.len() / k` (initialised when `read_dst`).
unsafe fn xwt(y: *mut f32, x: &[f32], w: &[f32], k: usize, beta: f32, read_dst: bool) {
    let (rows, n) = (x.len() / k, w.len() / k);
    // W^T is read from W (n x k, row-major) with column stride k and row stride 1.
    gemm::gemm(
        rows,
        n,
        k,
        y,
        1,
        n as isize,
        read_dst,
        x.as_ptr(),
        1,
        k as isize,
        w.as_ptr(),
        k as isize,
        1,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::Rayon(0),
    );
}

/// The softmax of `row + mask` in place (`mask` the additive attention mask of the row's keys):
/// the bits of adding the mask and then [`softmax_in_place`], in three passes over the row
/// instead of five. The mask is added as the maximum is taken (the maximum of the same values,
/// which is exact in any order). Attention's softmax is a tenth or more of an encode's time.
#[inline(always)]
pub(super) fn softmax_masked_in_place(row: &mut [f32], mask: &[f32]) {
    debug_assert_eq!(row.len(), mask.len());
    let mut top = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact_mut(16);
    let mut keys = mask.chunks_exact(16);
    for (c, k) in (&mut chunks).zip(&mut keys) {
        for i in 0..16 {
            c[i] += k[i];
            top[i] = top[i].max(c[i]);
        }
    }
    let mut max = f32::NEG_INFINITY;
    for (s, &k) in chunks.into_remainder().iter_mut().zip(keys.remainder()) {
        *s += k;
        max = max.max(*s);
    }
    for t in top {
        max = max.max(t);
    }
    exp_normalize(row, max);
}

/// Softmax of one row in place.
#[inline(always)]
pub(super) fn softmax_in_place(row: &mut [f32]) {
    exp_normalize(row, lanes_reduce(row, f32::NEG_INFINITY, f32::max));
}

/// The softmax's last two passes given the row's maximum: `exp(s - max)` written and summed as
/// it goes in 16 lanes (value `i` into lane `i % 16`), the lanes then added as a tree
/// ([`lanes_tree_sum`]), then each value divided by the sum.
#[inline(always)]
fn exp_normalize(row: &mut [f32], max: f32) {
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for i in 0..16 {
            c[i] = exp(c[i] - max);
            lanes[i] += c[i];
        }
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        // The last (up to 15) exponentials as one vector of 16, the lanes past the row unused:
        // one at a time, the polynomial's scalar code was about a third of the softmax's time
        // on rows of ~100 keys.
        let mut v = [0f32; 16];
        v[..rest.len()].copy_from_slice(rest);
        let mut e = [0f32; 16];
        for i in 0..16 {
            e[i] = exp(v[i] - max);
        }
        for (i, (s, e)) in rest.iter_mut().zip(e).enumerate() {
            *s = e;
            lanes[i] += e;
        }
    }
    let inv = 1.0 / lanes_tree_sum(lanes);
    row.iter_mut().for_each(|s| *s *= inv);
}

/// The sum of 16 lanes as a tree (each lane `i < w` plus lane `i + w`, for `w` = 8, 4, 2, 1):
/// four vector steps where a running sum is sixteen dependent scalar additions (a quarter of
/// the softmax's time, one per attention row).
#[inline(always)]
fn lanes_tree_sum(mut lanes: [f32; 16]) -> f32 {
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            lanes[i] += lanes[i + w];
        }
    }
    lanes[0]
}

/// Runs `f` compiled for AVX-512 when the CPU has it, else for AVX2 with FMA when it has those,
/// as it is otherwise. The portable build targets baseline x86-64 (SSE2, four lanes); a loop
/// inlined into `f` vectorises sixteen wide in the AVX-512 copy and eight in the AVX2 one. No
/// copy changes a result: Rust never fuses a multiply and an add on its own. `f` should be a
/// closure over one chunk of work; LLVM usually inlines it into the copies, but need not (see
/// [`with_simd!`], which code calling [`erf`] or [`exp`] must use).
#[inline(always)]
pub(super) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has every feature the copy is compiled for, checked just above.
        return unsafe { avx512(f) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: as above.
        return unsafe { avx2_fma(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_fma<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Whether this CPU runs the AVX-512 copies of [`simd`] and [`with_simd!`] (F, BW, VL, DQ).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn has_avx512() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq")
}

/// Whether this CPU runs the AVX2 copies of [`simd`] and [`with_simd!`] (when it has no
/// AVX-512).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn has_avx2_fma() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx2") && has!("fma")
}

/// `fn $name(args)`: runs the `#[inline(always)]` function `$body` on the same arguments,
/// compiled for AVX-512 or AVX2 with FMA as the CPU allows, as [`simd`] does for a closure.
/// [`simd`] relies on LLVM inlining the closure into its copies; where it was left out of line,
/// the AVX-512 copy ran the portable SSE code (packing bf16 rows for AMX took 2x its time so,
/// after a change elsewhere in the crate moved LLVM's inlining, docs/bf16.md; GELU's gradient
/// in a closure called libm's `fmaf` for each multiply-add). An `#[inline(always)]` function
/// given by name is always inlined into its copies.
macro_rules! with_simd {
    ($(#[$doc:meta])* fn $name:ident = $body:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if $crate::backbone::fast::has_avx512() {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
                unsafe fn wide($($arg: $ty),*) {
                    $body($($arg),*)
                }
                // SAFETY: the CPU has every feature the copy is compiled for, checked above.
                return unsafe { wide($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::backbone::fast::has_avx2_fma() {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn half($($arg: $ty),*) {
                    $body($($arg),*)
                }
                // SAFETY: as above.
                return unsafe { half($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}
pub(super) use with_simd;

/// `out = x * keep * scale` elementwise (`keep` 0 or 1): inverted dropout with a byte mask.
/// Written as a product rather than a branch so that it compiles to vector code.
pub(super) fn mask_scale(out: &mut [f32], x: &[f32], keep: &[u8], scale: f32) {
    simd(|| {
        for ((o, &v), &k) in out.iter_mut().zip(x).zip(keep) {
            *o = v * (f32::from(k) * scale);
        }
    })
}

/// [`mask_scale`] in place: `x *= keep * scale`, the same arithmetic, so that dropout applied
/// inside a fused op gives the bits the dropout op gives.
pub(super) fn mask_scale_in_place(x: &mut [f32], keep: &[u8], scale: f32) {
    simd(|| {
        for (v, &k) in x.iter_mut().zip(keep) {
            *v *= f32::from(k) * scale;
        }
    })
}

/// Chunk of elements per rayon task, so small tensors are not split needlessly.
pub(super) const CHUNK: usize = 1 << 14;

struct Softmax;

with_simd!(
    /// [`softmax_in_place`] over each row of `n` values of `rows`.
    fn softmax_rows_of = softmax_each_row(rows: &mut [f32], n: usize)
);

#[inline(always)]
fn softmax_each_row(rows: &mut [f32], n: usize) {
    rows.chunks_mut(n).for_each(softmax_in_place);
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fast-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "fast-softmax")?;
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = x.to_vec();
        out.par_chunks_mut((CHUNK / n).max(1) * n).for_each(|rows| softmax_rows_of(rows, n));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Fills a new vector of `n` elements in parallel chunks of whole rows of width `row`, each
/// task compiled for AVX-512 or AVX2 with FMA where the CPU has them ([`simd`]; code that calls
/// [`erf`] or [`exp`] goes through a [`with_simd!`] function instead). The contract of
/// [`par_fill`].
pub(super) fn par_rows(n: usize, row: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let per_task = (CHUNK / row.max(1)).max(1) * row.max(1);
    par_fill(n, per_task, |start, o| simd(|| fill(start, o)))
}

/// Fills a new vector of `n` elements in parallel chunks of `per_task` elements (the last may be
/// shorter). `fill(start, out)` must write every element of `out` (it may read back what it
/// wrote); the memory is not zeroed first, which would cost a pass over every fresh page.
pub(super) fn par_fill(
    n: usize,
    per_task: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let per_task = per_task.max(1);
    let mut out: Vec<f32> = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    spare.par_chunks_mut(per_task).enumerate().for_each(|(i, o)| {
        // SAFETY: f32 has no invalid bit patterns and `fill` writes each element before any
        // read of it (the contract above), so no uninitialised value is ever observed.
        let o = unsafe { &mut *(o as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
        fill(i * per_task, o)
    });
    // SAFETY: every element was written by `fill`.
    unsafe { out.set_len(n) };
    out
}

/// Whether the fast kernels apply to `x` (F32 on CPU).
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// Softmax over the last dimension, SIMD-friendly; inference only.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Softmax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_and_exp_are_accurate() {
        for i in -3000..3000 {
            let x = i as f32 / 1000.0;
            let want = taylor_erf(x as f64);
            assert!((erf(x) as f64 - want).abs() < 5e-7, "erf({x})");
        }
        for i in 3000..9000 {
            // erfc(3) = 2.2e-5 bounds the distance to +-1 beyond 3.
            let x = i as f32 / 1000.0;
            assert!((erf(x) - 1.0).abs() < 2.3e-5 && (erf(-x) + 1.0).abs() < 2.3e-5, "erf({x})");
        }
        assert!(exp(f32::NAN).is_nan(), "a NaN stays one");
        for i in -8000..8000 {
            let x = i as f32 / 100.0;
            let want = (x as f64).exp();
            // f32 range reduction loses about |x| ulps; softmax inputs near 0 are what matter.
            assert!(
                ((exp(x) as f64) / want - 1.0).abs() < 2e-7 * f64::from(x.abs().max(1.0)),
                "exp({x})"
            );
        }
    }

    /// erf in f64 by its Taylor series (accurate to ~1e-13 for |x| <= 3).
    fn taylor_erf(x: f64) -> f64 {
        let mut sum = 0f64;
        let mut term = x;
        let mut n = 0f64;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 400.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// `erf`'s and `exp`'s bits over a range of inputs (specials included), inlined into each
    /// copy that calls it.
    #[inline(always)]
    fn erf_exp_bits(xs: &[f32]) -> Vec<(u32, u32)> {
        // A plain loop: a closure here could stay out of line, in the portable code.
        let mut bits = Vec::with_capacity(xs.len());
        for &x in xs {
            bits.push((erf(x).to_bits(), exp(x).to_bits()));
        }
        bits
    }

    /// The portable build (where `mul_add` is libm's `fmaf`) and every copy [`with_simd!`]
    /// runs on this CPU give `erf` and `exp` the same bits: fused multiply-adds are exactly
    /// rounded everywhere, so no CPU computes another GELU or softmax.
    #[test]
    fn erf_and_exp_give_the_same_bits_in_every_copy() {
        let xs: Vec<f32> = (-2000..=2000)
            .map(|i| i as f32 * 0.0507)
            .chain([0.0, -0.0, 1e-30, -1e-30, -87.5, 88.5, f32::INFINITY, f32::NEG_INFINITY])
            .collect();
        let portable = erf_exp_bits(&xs);
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
            unsafe fn wide(xs: &[f32]) -> Vec<(u32, u32)> {
                erf_exp_bits(xs)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn half(xs: &[f32]) -> Vec<(u32, u32)> {
                erf_exp_bits(xs)
            }
            if has_avx512() {
                // SAFETY: the CPU has the features, checked just above.
                assert_eq!(unsafe { wide(&xs) }, portable, "AVX-512");
            }
            if has_avx2_fma() {
                // SAFETY: as above.
                assert_eq!(unsafe { half(&xs) }, portable, "AVX2 with FMA");
            }
        }
        // A multiply then an add would differ somewhere in this range.
        let unfused = |x: f32| {
            let x = x.clamp(-4.0, 4.0);
            let x2 = x * x;
            let p = [
                2.770_681_4e-8,
                -2.101_024e-6,
                -5.692_506_4e-5,
                -7.349_906_3e-4,
                -2.954_6e-3,
                -1.609_603_3e-2,
            ]
            .iter()
            .fold(-2.726_142e-10_f32, |p, c| p * x2 + c);
            let q = [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_473_9e-2]
                .iter()
                .fold(-1.456_607_2e-5_f32, |q, c| q * x2 + c);
            p * x / q
        };
        assert!(xs.iter().any(|&x| unfused(x).to_bits() != erf(x).to_bits()));
    }

    /// The three-pass softmaxes (masked, and not) give the bits of the five-pass softmax (add
    /// the mask, maximum, exponentials, sum in 16 lanes added as a tree, scale): every length
    /// around the 16 lanes, masks with the backbone's f32::MIN (every key of a one-key row
    /// masked), large negatives, random ones and zeros.
    #[test]
    fn softmaxes_give_the_bits_of_the_five_pass_order() {
        let mut x = 7u64;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 40) as f32 / (1u64 << 24) as f32
        };
        for len in 1..80 {
            for variant in 0..4 {
                let row: Vec<f32> = (0..len).map(|_| 20.0 * next() - 10.0).collect();
                let mask: Vec<f32> = (0..len)
                    .map(|i| match (variant, i % 3) {
                        (0, _) => 0.0,
                        (1, 0) => f32::MIN,
                        (2, 1) => -3.4e38,
                        (3, _) => -5.0 * next(),
                        _ => 0.0,
                    })
                    .collect();
                // The five passes as they were written before: add, maximum, exponentials,
                // sum, scale.
                let mut want: Vec<f32> = row.iter().zip(&mask).map(|(s, m)| s + m).collect();
                let max = lanes_reduce(&want, f32::NEG_INFINITY, f32::max);
                want.iter_mut().for_each(|s| *s = exp(*s - max));
                // The sum: value `i` into lane `i % 16`, then the lanes pairwise (8, 4, 2, 1).
                let mut lanes = [0f32; 16];
                want.iter().enumerate().for_each(|(i, e)| lanes[i % 16] += e);
                for w in [8, 4, 2, 1] {
                    (0..w).for_each(|i| lanes[i] += lanes[i + w]);
                }
                let inv = 1.0 / lanes[0];
                want.iter_mut().for_each(|s| *s *= inv);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                let mut got = row.clone();
                softmax_masked_in_place(&mut got, &mask);
                assert_eq!(bits(&got), bits(&want), "length {len}, mask {variant}");
                let mut unmasked: Vec<f32> = row.iter().zip(&mask).map(|(s, m)| s + m).collect();
                softmax_in_place(&mut unmasked);
                assert_eq!(bits(&unmasked), bits(&want), "length {len}, mask {variant}, unmasked");
            }
        }
    }

    #[test]
    fn kernels_match_candle() {
        let dev = candle_core::Device::Cpu;
        // A dense fixed grid over [-9, 9]: an unseeded random draw made this test fail now and
        // then, on a value near 9 where one ulp is 1e-6.
        let grid: Vec<f32> = (0..100 * 181).map(|i| -9.0 + 18.0 * i as f32 / 18_099.0).collect();
        let x = Tensor::from_vec(grid, (100, 181), &dev).unwrap();
        let d = |a: Tensor, b: Tensor| crate::testing::max_abs_diff(&a, &b).unwrap();
        assert!(d(softmax_last(&x).unwrap(), candle_nn::ops::softmax_last_dim(&x).unwrap()) < 1e-6);
    }
}
