//! GPU twins of the fused training ops of `train_ops` (`kernels/train.cu`), F32 only: the same
//! operands, checked the same way, the same formulas. The kernels run on the CPU in tests
//! through `kernel_emulation`, against the ops' CPU forwards; this launch code runs only on a
//! GPU (`scripts/gpu-check.sh`).

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaViewMut, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape, Storage, Tensor};

use super::SoftmaxRows;
use crate::cuda_kernels::{f32_view, function, ColumnChunks, Launch, CHUNK_ROWS};

/// Launches kernel `$name` of `kernels/train.cu` on `$dev`'s stream with `$launch`'s shape
/// and the arguments in order (each a reference that lives past the launch).
macro_rules! launch {
    ($dev:expr, $name:expr, $launch:expr, $($arg:expr),+ $(,)?) => {{
        let func = function($dev, $name)?;
        let stream = $dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        $(builder.arg($arg);)+
        // SAFETY: every call below passes the arguments of the kernel's signature in
        // `kernels/train.cu`, in order, with buffers as long as the launch covers.
        unsafe { builder.launch($launch.config()) }.w()?;
    }};
}

/// Rows of width `h` in an operand of `len` elements, or an error naming the op.
fn rows_of(len: usize, h: usize, op: &str) -> Result<usize> {
    if h == 0 || !len.is_multiple_of(h) {
        candle_core::bail!("{op}: {len} elements are not rows of {h}");
    }
    Ok(len / h)
}

pub(super) fn gelu(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let x = f32_view(s, l, "train-gelu")?;
    let n = l.shape().elem_count();
    let dev = s.device.clone();
    // SAFETY: the kernel writes all n elements before anything reads them.
    let y = unsafe { dev.alloc::<f32>(n)? };
    let len = n as u64;
    launch!(&dev, "gelu_f32", Launch::elements(n), &x, &y, &len);
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l.shape().clone()))
}

pub(super) fn gelu_grad(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (x, g) = (f32_view(s1, l1, "train-gelu-grad")?, f32_view(s2, l2, "train-gelu-grad")?);
    let n = l1.shape().elem_count();
    let dev = s1.device.clone();
    // SAFETY: the kernel writes all n elements before anything reads them.
    let dx = unsafe { dev.alloc::<f32>(n)? };
    let len = n as u64;
    launch!(&dev, "gelu_grad_f32", Launch::elements(n), &x, &g, &dx, &len);
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), l1.shape().clone()))
}

pub(super) fn masked_softmax(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let SoftmaxRows { n, rows_per_batch, queries } = SoftmaxRows::new(l1, l2)?;
    let x = f32_view(s1, l1, "train-masked-softmax")?;
    let bias = f32_view(s2, l2, "train-masked-softmax")?;
    let len = l1.shape().elem_count();
    let dev = s1.device.clone();
    // SAFETY: the kernel writes all `len` elements before anything reads them.
    let y = unsafe { dev.alloc::<f32>(len)? };
    let rows = len / n;
    let (rows64, n32) = (rows as u64, n as u32);
    let (per_batch, queries) = (rows_per_batch as u64, queries as u64);
    let shape = Launch::rows(rows);
    launch!(&dev, "masked_softmax_f32", shape, &x, &bias, &y, &rows64, &n32, &per_batch, &queries);
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

pub(super) fn softmax_grad(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let y = f32_view(s1, l1, "train-softmax-grad")?;
    let g = f32_view(s2, l2, "train-softmax-grad")?;
    let len = l1.shape().elem_count();
    let n = l1.dims().last().copied().unwrap_or(1).max(1);
    let rows = rows_of(len, n, "train-softmax-grad")?;
    let dev = s1.device.clone();
    // SAFETY: the kernel writes all `len` elements before anything reads them.
    let dx = unsafe { dev.alloc::<f32>(len)? };
    let (rows64, n32) = (rows as u64, n as u32);
    launch!(&dev, "softmax_grad_f32", Launch::rows(rows), &y, &g, &dx, &rows64, &n32);
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), l1.shape().clone()))
}

pub(super) fn layer_norm(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let x = f32_view(s1, l1, "train-layer-norm")?;
    let w = f32_view(s2, l2, "train-layer-norm")?;
    let b = f32_view(s3, l3, "train-layer-norm")?;
    let (len, h) = (l1.shape().elem_count(), l2.shape().elem_count());
    let rows = rows_of(len, h, "train-layer-norm")?;
    let dev = s1.device.clone();
    // SAFETY: the kernel writes all `len` elements before anything reads them.
    let y = unsafe { dev.alloc::<f32>(len)? };
    let (rows64, h32) = (rows as u64, h as u32);
    launch!(&dev, "layer_norm_f32", Launch::rows(rows), &x, &w, &b, &y, &rows64, &h32, &eps);
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// The two normalisations whose backward has the same three passes: the input gradient and
/// per-row statistics, per-chunk partial sums of the parameter gradients, then their sum.
#[derive(Clone, Copy)]
pub(super) enum Norm {
    /// Layer norm: statistics (mean, 1/std) per row; gradients dw and db.
    Layer,
    /// RMSNorm: statistic 1/rms per row; gradient dw.
    Rms,
}

impl Norm {
    /// Its op name, for errors, and its two kernels.
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Norm::Layer => {
                ("train-layer-norm-grad", "layer_norm_grad_f32", "layer_norm_param_partials_f32")
            }
            Norm::Rms => {
                ("train-rms-norm-grad", "rms_norm_grad_f32", "rms_norm_param_partials_f32")
            }
        }
    }

    /// Values per row in `stats`, and parameter gradients (each `h` long).
    fn per_row(self) -> usize {
        match self {
            Norm::Layer => 2,
            Norm::Rms => 1,
        }
    }
}

/// The backward of `norm` from `(x, w, g)`: `[dx (all elements), then each parameter
/// gradient (h)]` in one buffer, as the CPU ops return them.
pub(super) fn norm_grad(
    norm: Norm,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let (op, grad_kernel, partials_kernel) = norm.names();
    let (x, w, g) = (f32_view(s1, l1, op)?, f32_view(s2, l2, op)?, f32_view(s3, l3, op)?);
    let (len, h) = (l1.shape().elem_count(), l2.shape().elem_count());
    let rows = rows_of(len, h, op)?;
    let width = norm.per_row() * h;
    let dev = s1.device.clone();
    let chunks = ColumnChunks::new(rows, h);
    // SAFETY: the launches below write every element of each buffer (dx and the stats by row,
    // the partials by chunk and column, the sums by column) before any read.
    let (mut out, stats, partial) = unsafe {
        (
            dev.alloc::<f32>(len + width)?,
            dev.alloc::<f32>(norm.per_row() * rows)?,
            dev.alloc::<f32>(chunks.chunks as usize * width)?,
        )
    };
    let (rows64, h32) = (rows as u64, h as u32);
    let (chunk_rows, column_blocks) = (CHUNK_ROWS, chunks.column_blocks);
    {
        let mut dx = out.slice_mut(0..len);
        let shape = Launch::rows(rows);
        launch!(&dev, grad_kernel, shape, &x, &w, &g, &mut dx, &stats, &rows64, &h32, &eps);
    }
    let p = chunks.partials();
    launch!(
        &dev,
        partials_kernel,
        p,
        &x,
        &g,
        &stats,
        &partial,
        &rows64,
        &h32,
        &chunk_rows,
        &column_blocks
    );
    sum_chunks(&dev, &partial, chunks.chunks, &mut out.slice_mut(len..len + width))?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(len + width)))
}

/// Adds per-chunk partial column sums (`chunks` rows of `out`'s length) in chunk order into
/// `out`, the second pass of every column sum here.
fn sum_chunks(
    dev: &CudaDevice,
    partial: &CudaSlice<f32>,
    chunks: u64,
    out: &mut CudaViewMut<f32>,
) -> Result<()> {
    let (width, shape) = (out.len() as u32, Launch::elements(out.len()));
    launch!(dev, "column_chunks_sum_f32", shape, partial, out, &chunks, &width);
    Ok(())
}

pub(super) fn bias_add(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let y = f32_view(s1, l1, "train-bias-add")?;
    let b = f32_view(s2, l2, "train-bias-add")?;
    let (len, h) = (l1.shape().elem_count(), l2.shape().elem_count());
    rows_of(len, h, "train-bias-add")?;
    let dev = s1.device.clone();
    // SAFETY: the kernel writes all `len` elements before anything reads them.
    let out = unsafe { dev.alloc::<f32>(len)? };
    let (len64, h32) = (len as u64, h as u32);
    launch!(&dev, "bias_add_f32", Launch::elements(len), &y, &b, &out, &len64, &h32);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l1.shape().clone()))
}

pub(super) fn rms_norm(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let x = f32_view(s1, l1, "train-rms-norm")?;
    let w = f32_view(s2, l2, "train-rms-norm")?;
    let (len, h) = (l1.shape().elem_count(), l2.shape().elem_count());
    let rows = rows_of(len, h, "train-rms-norm")?;
    let dev = s1.device.clone();
    // SAFETY: the kernel writes all `len` elements before anything reads them.
    let y = unsafe { dev.alloc::<f32>(len)? };
    let (rows64, h32) = (rows as u64, h as u32);
    launch!(&dev, "rms_norm_f32", Launch::rows(rows), &x, &w, &y, &rows64, &h32, &eps);
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// Rotary positions over `(b, len, heads, d)` with `cos`/`sin` `(len, d)` on the same
/// device; `inverse` turns each pair back (the backward).
pub(super) fn rotary(
    (s, l): (&CudaStorage, &Layout),
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> Result<(CudaStorage, Shape)> {
    let x = f32_view(s, l, "train-rotary")?;
    let (_, len, heads, d) = l.shape().dims4()?;
    if cos.elem_count() != len * d || sin.elem_count() != len * d || !d.is_multiple_of(2) {
        candle_core::bail!("train-rotary: tables do not match {len} positions of {d}");
    }
    let (cos_storage, cos_layout) = cos.storage_and_layout();
    let (sin_storage, sin_layout) = sin.storage_and_layout();
    let (Storage::Cuda(cs), Storage::Cuda(ss)) = (&*cos_storage, &*sin_storage) else {
        candle_core::bail!("train-rotary: the tables are not on the input's GPU");
    };
    let c = f32_view(cs, cos_layout, "train-rotary")?;
    let sn = f32_view(ss, sin_layout, "train-rotary")?;
    let n = l.shape().elem_count();
    let dev = s.device.clone();
    // SAFETY: the kernel writes both elements of every pair, all `n`, before any read.
    let y = unsafe { dev.alloc::<f32>(n)? };
    let (pairs, width, len32, d32) = ((n / 2) as u64, (heads * d) as u32, len as u32, d as u32);
    let sign = if inverse { -1f32 } else { 1.0 };
    let shape = Launch::elements(n / 2);
    launch!(&dev, "rotary_f32", shape, &x, &c, &sn, &y, &pairs, &width, &len32, &d32, &sign);
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l.shape().clone()))
}

pub(super) fn swiglu(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (g, u) = (f32_view(s1, l1, "train-swiglu")?, f32_view(s2, l2, "train-swiglu")?);
    let n = l1.shape().elem_count();
    if l2.shape().elem_count() != n {
        candle_core::bail!("train-swiglu: gate and up differ in size");
    }
    let dev = s1.device.clone();
    // SAFETY: the kernel writes all n elements before anything reads them.
    let y = unsafe { dev.alloc::<f32>(n)? };
    let len = n as u64;
    launch!(&dev, "swiglu_f32", Launch::elements(n), &g, &u, &y, &len);
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// `[d gate; d up]` as one `(2, n)` buffer, as the CPU op returns them.
pub(super) fn swiglu_grad(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let g = f32_view(s1, l1, "train-swiglu-grad")?;
    let u = f32_view(s2, l2, "train-swiglu-grad")?;
    let dy = f32_view(s3, l3, "train-swiglu-grad")?;
    let n = l1.shape().elem_count();
    let dev = s1.device.clone();
    // SAFETY: the kernel writes all 2n elements before anything reads them.
    let out = unsafe { dev.alloc::<f32>(2 * n)? };
    let len = n as u64;
    launch!(&dev, "swiglu_grad_f32", Launch::elements(n), &g, &u, &dy, &out, &len);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((2, n))))
}

/// The sums of the columns of a `(.., width)` operand, in a fixed order.
pub(super) fn column_sum(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let g = f32_view(s, l, "train-column-sum")?;
    let len = l.shape().elem_count();
    let width = l.dims().last().copied().unwrap_or(1).max(1);
    let rows = rows_of(len, width, "train-column-sum")?;
    let dev = s.device.clone();
    let chunks = ColumnChunks::new(rows, width);
    // SAFETY: the partials are written by chunk and column, the sums by column, before
    // any read.
    let (partial, mut sums) =
        unsafe { (dev.alloc::<f32>(chunks.chunks as usize * width)?, dev.alloc::<f32>(width)?) };
    let (rows64, w32) = (rows as u64, width as u32);
    let (chunk_rows, column_blocks) = (CHUNK_ROWS, chunks.column_blocks);
    let p = chunks.partials();
    launch!(
        &dev,
        "column_partials_f32",
        p,
        &g,
        &partial,
        &rows64,
        &w32,
        &chunk_rows,
        &column_blocks
    );
    sum_chunks(&dev, &partial, chunks.chunks, &mut sums.slice_mut(..))?;
    Ok((CudaStorage::wrap_cuda_slice(sums, dev), Shape::from(width)))
}
