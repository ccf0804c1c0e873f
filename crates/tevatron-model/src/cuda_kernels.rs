//! The crate's own CUDA kernels (`kernels/train.cu`): the launch shapes each kind of kernel
//! takes, and, with the `cuda` feature, how an op loads a kernel (compiled to PTX by
//! `build.rs`) on a device. The shapes are also what the CPU emulation of the kernels runs
//! with in tests (`kernel_emulation`), so a launch there covers the data as it does on a GPU.

/// Threads per block, for every kernel: eight warps.
pub(crate) const BLOCK: u32 = 256;
/// Rows a warp-per-row kernel's block covers at once (its warps).
const WARPS: u64 = (BLOCK / 32) as u64;
/// The most blocks a launch uses; the kernels' grid-stride loops cover the rest.
const MAX_GRID: u64 = 1 << 20;
/// Rows per chunk of the column sums (`layer_norm_param_partials_f32`, `column_partials_f32`):
/// enough chunks to fill a GPU on an activation of a few thousand rows, few enough that adding
/// the chunks' partials is a short second pass.
pub(crate) const CHUNK_ROWS: u64 = 64;

/// Blocks and threads per block of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Launch {
    pub(crate) grid: u32,
    pub(crate) block: u32,
}

impl Launch {
    /// A grid-stride launch over `n` elements (one thread each, up to [`MAX_GRID`] blocks).
    pub(crate) fn elements(n: usize) -> Self {
        Self::blocks((n as u64).div_ceil(u64::from(BLOCK)))
    }

    /// A warp-per-row launch over `rows` rows.
    pub(crate) fn rows(rows: usize) -> Self {
        Self::blocks((rows as u64).div_ceil(WARPS))
    }

    fn blocks(blocks: u64) -> Self {
        Self { grid: blocks.clamp(1, MAX_GRID) as u32, block: BLOCK }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn config(self) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: (self.grid, 1, 1),
            block_dim: (self.block, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// How a column sum over `rows` rows of `width` is cut: thread (chunk, column) sums
/// [`CHUNK_ROWS`] rows of its column, `column_blocks` blocks per chunk, then one thread per
/// column adds the `chunks` partials in order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ColumnChunks {
    pub(crate) chunks: u64,
    pub(crate) column_blocks: u32,
}

impl ColumnChunks {
    pub(crate) fn new(rows: usize, width: usize) -> Self {
        Self {
            chunks: (rows as u64).div_ceil(CHUNK_ROWS).max(1),
            column_blocks: (width as u64).div_ceil(u64::from(BLOCK)).max(1) as u32,
        }
    }

    /// The launch of the per-chunk pass: every (chunk, column block) pair is a block. Its
    /// kernels have no grid-stride loop, so this is never capped.
    pub(crate) fn partials(self) -> Launch {
        Launch { grid: (self.chunks * u64::from(self.column_blocks)) as u32, block: BLOCK }
    }
}

#[cfg(feature = "cuda")]
pub(crate) use device::{f32_view, function};

#[cfg(feature = "cuda")]
mod device {
    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result};

    /// `kernels/train.cu` as PTX; the driver compiles it for the GPU it runs on.
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train.ptx"));

    /// Kernel `name` of `kernels/train.cu` on `dev`, loaded once per device; launch it on
    /// `dev.cuda_stream()`.
    pub(crate) fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
        Ok(dev.get_or_load_custom_func(name, "tevatron_train_kernels", PTX)?.into_cuda_function())
    }

    /// The elements of a contiguous F32 operand of op `op`, or an error naming the op.
    pub(crate) fn f32_view<'a>(
        s: &'a CudaStorage,
        l: &Layout,
        op: &str,
    ) -> Result<CudaView<'a, f32>> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(s.as_cuda_slice::<f32>()?.slice(a..b)),
            None => candle_core::bail!("{op}: F32 contiguous inputs only"),
        }
    }
}
