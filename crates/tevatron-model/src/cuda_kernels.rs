//! How the workspace's own CUDA kernels are launched: the launch shapes each kind of kernel
//! takes, the [`Kernels`] device the launch code is written against (a GPU, or in tests the
//! CPU emulation of [`crate::emulator`]), and, with the `cuda` feature, how an op loads a
//! kernel from PTX on a device. This crate's kernels are `kernels/train.cu` (the model's
//! ops); `tevatron-train` launches its optimizer's (`kernels/optim.cu`) through the same
//! interface, from its own PTX (`Ptx`, with the `cuda` feature).

use candle_core::Result;

/// Threads per block, for every kernel: eight warps.
pub const BLOCK: u32 = 256;
/// Rows a warp-per-row kernel's block covers at once (its warps).
const WARPS: u64 = (BLOCK / 32) as u64;
/// The most blocks a launch uses; the kernels' grid-stride loops cover the rest.
const MAX_GRID: u64 = 1 << 20;
/// Rows per chunk of the column sums (`layer_norm_param_partials_f32`, `column_partials_f32`):
/// enough chunks to fill a GPU on an activation of a few thousand rows, few enough that adding
/// the chunks' partials is a short second pass.
#[cfg(any(test, feature = "cuda"))]
pub(crate) const CHUNK_ROWS: u64 = 64;

/// Blocks and threads per block of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Blocks.
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
}

impl Launch {
    /// A grid-stride launch over `n` elements (one thread each, up to `MAX_GRID` blocks).
    pub fn elements(n: usize) -> Self {
        Self::blocks((n as u64).div_ceil(u64::from(BLOCK)))
    }

    /// A warp-per-row launch over `rows` rows.
    pub fn rows(rows: usize) -> Self {
        Self::blocks((rows as u64).div_ceil(WARPS))
    }

    /// `blocks` blocks of [`BLOCK`] threads, at least one and at most `MAX_GRID`.
    pub fn blocks(blocks: u64) -> Self {
        Self { grid: blocks.clamp(1, MAX_GRID) as u32, block: BLOCK }
    }

    #[cfg(feature = "cuda")]
    /// The driver's form of the shape.
    pub fn config(self) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
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
#[cfg(any(test, feature = "cuda"))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct ColumnChunks {
    pub(crate) chunks: u64,
    pub(crate) column_blocks: u32,
}

#[cfg(any(test, feature = "cuda"))]
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

/// One parameter of a kernel launch, as the kernel's signature in its source takes it: a device pointer (`const float *`, `float *`), or a scalar of the kernel's width.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device address.
    Ptr(u64),
    /// A `uint64_t`.
    U64(u64),
    /// A `uint32_t`.
    U32(u32),
    /// A `float`.
    F32(f32),
}

/// `len` contiguous F32 elements at a device address: an input of a launch, or a buffer, or
/// part of one, that a launch writes.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    /// Device address of the first element.
    pub address: u64,
    /// Elements.
    pub len: usize,
}

impl Operand {
    /// The operand as a pointer parameter.
    pub fn arg(self) -> Arg {
        Arg::Ptr(self.address)
    }

    /// Elements `start..start + len` of the operand, which must hold them.
    pub fn part(self, start: usize, len: usize, op: &str) -> Result<Self> {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            candle_core::bail!("{op}: elements {start}..+{len} of a buffer of {}", self.len);
        }
        Ok(Self { address: self.address + 4 * start as u64, len })
    }
}

/// A device that runs kernels of a source compiled for it: a GPU through the CUDA driver, or, in
/// tests, their CPU emulation ([`crate::emulator::Emulator`]). The launch code (`train_ops`' `cuda`
/// module here, the optimizer's in `tevatron-train`) is written once against this, so tests run the argument lists, buffer sizes and
/// launch shapes that a GPU gets.
pub trait Kernels {
    /// An F32 buffer the device owns.
    type Buffer;

    /// A buffer of `len` F32 elements whose values are undefined: every launch here writes
    /// its outputs whole before anything reads them.
    fn alloc(&self, len: usize) -> Result<Self::Buffer>;

    /// `buffer`, whole, as an operand of launches.
    fn operand(&self, buffer: &Self::Buffer) -> Operand;

    /// A buffer holding a copy of `values` (also integers, as the bits of F32 cells).
    fn upload(&self, values: &[f32]) -> Result<Self::Buffer>;

    /// Launches kernel `kernel` with `shape` on the device's stream, after every launch before
    /// it.
    ///
    /// # Safety
    /// `args` are the kernel's parameters, in order and of its types, and every pointer holds
    /// the elements the launch reads or writes through it.
    unsafe fn launch(&self, kernel: &str, shape: Launch, args: &[Arg]) -> Result<()>;
}

#[cfg(feature = "cuda")]
pub(crate) use device::function;
#[cfg(feature = "cuda")]
pub use device::{run, storage_operand, tensor_operand, CudaKernels, Ptx};

#[cfg(feature = "cuda")]
mod device {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, DevicePtr, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape, Storage, Tensor};

    use super::{Arg, Kernels, Launch, Operand};

    /// A kernel source compiled to PTX (by a crate's `build.rs`), under the module name the
    /// driver caches it by; the driver compiles it for the GPU it runs on.
    #[derive(Clone, Copy, Debug)]
    pub struct Ptx {
        /// The module's name, unique in the process.
        pub module: &'static str,
        /// The PTX text.
        pub text: &'static str,
    }

    /// `kernels/train.cu`.
    const TRAIN: Ptx = Ptx {
        module: "tevatron_train_kernels",
        text: include_str!(concat!(env!("OUT_DIR"), "/train.ptx")),
    };

    /// Kernel `name` of `ptx` on `dev`, loaded once per device; launch it on
    /// `dev.cuda_stream()`.
    fn function_in(dev: &CudaDevice, ptx: Ptx, name: &str) -> Result<CudaFunction> {
        Ok(dev.get_or_load_custom_func(name, ptx.module, ptx.text)?.into_cuda_function())
    }

    /// Kernel `name` of `kernels/train.cu` on `dev` (see [`function_in`]).
    pub(crate) fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
        function_in(dev, TRAIN, name)
    }

    /// A GPU running the kernels of `ptx`.
    #[derive(Clone, Copy)]
    pub struct CudaKernels<'a> {
        /// The GPU.
        pub device: &'a CudaDevice,
        /// The kernels.
        pub ptx: Ptx,
    }

    impl Kernels for CudaKernels<'_> {
        type Buffer = CudaSlice<f32>;

        fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
            Kernels::alloc(self.device, len)
        }

        fn upload(&self, values: &[f32]) -> Result<CudaSlice<f32>> {
            Kernels::upload(self.device, values)
        }

        fn operand(&self, buffer: &CudaSlice<f32>) -> Operand {
            Kernels::operand(self.device, buffer)
        }

        unsafe fn launch(&self, kernel: &str, shape: Launch, args: &[Arg]) -> Result<()> {
            // SAFETY: the caller's contract.
            unsafe { launch_in(self.device, self.ptx, kernel, shape, args) }
        }
    }

    /// Launches kernel `kernel` of `ptx` on `dev`'s stream (the contract of
    /// [`Kernels::launch`]).
    unsafe fn launch_in(
        dev: &CudaDevice,
        ptx: Ptx,
        kernel: &str,
        shape: Launch,
        args: &[Arg],
    ) -> Result<()> {
        let func = function_in(dev, ptx, kernel)?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        for a in args {
            match a {
                Arg::Ptr(v) | Arg::U64(v) => builder.arg(v),
                Arg::U32(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        // SAFETY: the caller's contract. Raw addresses are enough: candle runs every op of a
        // device on its one stream, in order, and frees buffers in stream order.
        unsafe { builder.launch(shape.config()) }.w()?;
        Ok(())
    }

    /// A GPU running this crate's kernels (`kernels/train.cu`).
    impl Kernels for CudaDevice {
        type Buffer = CudaSlice<f32>;

        fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
            // SAFETY: F32 has no invalid bit patterns, and the launches write before reading.
            unsafe { CudaDevice::alloc::<f32>(self, len) }
        }

        fn upload(&self, values: &[f32]) -> Result<CudaSlice<f32>> {
            self.clone_htod(values)
        }

        fn operand(&self, buffer: &CudaSlice<f32>) -> Operand {
            let stream = self.cuda_stream();
            let (address, _read) = buffer.device_ptr(&stream);
            Operand { address, len: buffer.len() }
        }

        unsafe fn launch(&self, kernel: &str, shape: Launch, args: &[Arg]) -> Result<()> {
            // SAFETY: the caller's contract.
            unsafe { launch_in(self, TRAIN, kernel, shape, args) }
        }
    }

    /// Runs `launch` on op `op`'s contiguous F32 inputs as operands, on the first one's device
    /// (candle has checked that they share it), and returns its buffer as the op's output of
    /// `shape`: a `cuda_fwd` of one of our ops, around launch code written against [`Kernels`].
    pub fn run<const N: usize>(
        op: &str,
        inputs: [(&CudaStorage, &Layout); N],
        shape: &Shape,
        launch: impl FnOnce(&CudaDevice, [Operand; N]) -> Result<CudaSlice<f32>>,
    ) -> Result<(CudaStorage, Shape)> {
        let Some((first, _)) = inputs.first() else {
            candle_core::bail!("{op}: no inputs");
        };
        let dev = first.device.clone();
        let mut operands = [Operand { address: 0, len: 0 }; N];
        for (o, (s, l)) in operands.iter_mut().zip(inputs) {
            *o = storage_operand(s, l, op)?;
        }
        let out = launch(&dev, operands)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape.clone()))
    }

    /// A contiguous F32 tensor on a GPU (a table an op holds) as an operand.
    pub fn tensor_operand(t: &Tensor, op: &str) -> Result<Operand> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            candle_core::bail!("{op}: a table is not on the input's GPU");
        };
        storage_operand(s, layout, op)
    }

    /// A contiguous F32 storage of op `op` as an operand, or an error naming the op.
    pub fn storage_operand(s: &CudaStorage, l: &Layout, op: &str) -> Result<Operand> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("{op}: F32 contiguous inputs only");
        };
        let view = s.as_cuda_slice::<f32>()?.slice(a..b);
        let stream = s.device.cuda_stream();
        let (address, _read) = view.device_ptr(&stream);
        Ok(Operand { address, len: view.len() })
    }
}
