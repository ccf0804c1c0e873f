//! A kernel source compiled for the CPU (a crate's `kernels/emulate.cpp` against
//! `kernels/emulate.hpp`: a block's threads are OS threads, a warp's shuffles meet at a
//! barrier), as a [`Kernels`] device: the launch code a GPU runs drives it in tests, on machines
//! without a GPU. Each crate with kernels builds its own emulation and names its entry point;
//! this crate's tests are in `kernel_emulation.rs`, the optimizer's in `tevatron-train`.

use std::cell::Cell;
use std::ffi::{c_char, c_void, CString};

use candle_core::Result;

use crate::cuda_kernels::{Arg, Kernels, Launch, Operand};

/// The signature of an emulation's entry point (the `extern "C"` launcher of a crate's
/// `kernels/emulate.cpp`: `emu_launch` here, `emu_optim_launch` in `tevatron-train`):
/// launches kernel `name` as cuLaunchKernel does, after checking each parameter's kind and size
/// against its signature; 0, or -2 for an unknown kernel, -1 for a wrong parameter count, i + 1
/// for parameter i of the wrong kind or size.
pub type EntryPoint = unsafe extern "C" fn(
    name: *const c_char,
    grid: u32,
    block: u32,
    params: *mut *mut c_void,
    kinds: *const c_char,
    sizes: *const u8,
    n: usize,
) -> i32;

/// A kernel source compiled for the CPU, as a device the launch code runs on: buffers are host
/// memory with NaN guards around them, and a launch calls the source's entry point.
#[derive(Clone, Copy)]
pub struct Emulator(pub EntryPoint);

/// Cells before and after every emulated buffer, NaN, that no launch may write.
const GUARD: usize = 64;

/// An emulated device buffer: cells, as a launch writes it through a shared borrow, NaN at
/// first so that an element no launch writes shows in every comparison, between two runs of
/// `GUARD` cells that must stay NaN: a launch that writes outside the buffer fails the test
/// when the buffer is read or dropped, and one that reads outside it reads NaN.
pub struct HostBuffer {
    cells: Box<[Cell<f32>]>,
    len: usize,
}

impl HostBuffer {
    /// Its values, after checking that nothing wrote outside them.
    pub fn values(&self) -> Vec<f32> {
        self.check_guards();
        self.cells[GUARD..GUARD + self.len].iter().map(Cell::get).collect()
    }

    fn check_guards(&self) {
        let (before, rest) = self.cells.split_at(GUARD);
        let written = before.iter().chain(&rest[self.len..]).any(|c| !c.get().is_nan());
        assert!(!written, "a launch wrote outside a buffer of {}", self.len);
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.check_guards();
        }
    }
}

impl Kernels for Emulator {
    type Buffer = HostBuffer;

    fn alloc(&self, len: usize) -> Result<HostBuffer> {
        Ok(HostBuffer { cells: (0..len + 2 * GUARD).map(|_| Cell::new(f32::NAN)).collect(), len })
    }

    fn upload(&self, values: &[f32]) -> Result<HostBuffer> {
        let buffer = self.alloc(values.len())?;
        for (cell, &x) in buffer.cells[GUARD..].iter().zip(values) {
            cell.set(x);
        }
        Ok(buffer)
    }

    fn operand(&self, buffer: &HostBuffer) -> Operand {
        Operand { address: buffer.cells[GUARD..].as_ptr() as u64, len: buffer.len }
    }

    unsafe fn launch(&self, kernel: &str, shape: Launch, args: &[Arg]) -> Result<()> {
        let mut params: Vec<*mut c_void> = Vec::with_capacity(args.len());
        let (mut kinds, mut sizes) = (Vec::new(), Vec::new());
        for a in args {
            let (param, kind, size) = match a {
                Arg::Ptr(v) => (v as *const u64 as *mut c_void, b'p', 8),
                Arg::U64(v) => (v as *const u64 as *mut c_void, b'u', 8),
                Arg::U32(v) => (v as *const u32 as *mut c_void, b'u', 4),
                Arg::F32(v) => (v as *const f32 as *mut c_void, b'f', 4),
            };
            params.push(param);
            kinds.push(kind as c_char);
            sizes.push(size);
        }
        let name = CString::new(kernel).expect("kernel names have no NUL");
        // SAFETY: the caller's contract; the parameters point into `args`, alive for the call,
        // and the emulation checks them against the kernel's signature before it runs.
        let code = unsafe {
            (self.0)(
                name.as_ptr(),
                shape.grid,
                shape.block,
                params.as_mut_ptr(),
                kinds.as_ptr(),
                sizes.as_ptr(),
                args.len(),
            )
        };
        match code {
            0 => Ok(()),
            -2 => candle_core::bail!("no kernel {kernel}"),
            -1 => candle_core::bail!("{kernel}: {} parameters, not its signature's", args.len()),
            i => candle_core::bail!("{kernel}: parameter {} is not its signature's type", i - 1),
        }
    }
}
