//! NCCL collectives on the ranks' GPUs, as candle's multi-process example runs them: custom
//! ops whose CUDA forward calls NCCL on the device's own stream, so they are ordered with the
//! model's kernels.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};

use super::Transport;
use crate::{Error, Result};

/// A communicator over every rank's GPU.
pub struct Nccl {
    comm: Mutex<Comm>,
    world: usize,
}

// SAFETY: the communicator is used under the mutex only, one collective at a time, which
// NCCL allows from any thread.
unsafe impl Send for Nccl {}
// SAFETY: as above; shared references only reach the communicator through the mutex.
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Rank 0 makes the NCCL id and the transport hands it to the others; then every rank
    /// joins with its GPU's stream.
    pub fn connect(t: &dyn Transport, device: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(Error::Invalid("NCCL needs a CUDA device".into()));
        };
        let mine: Vec<u8> = if t.rank() == 0 {
            let id =
                Id::new().map_err(|e| Error::Invalid(format!("creating the NCCL id: {e:?}")))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let shared = t.all_gather_bytes(&mine)?.swap_remove(0);
        let mut internal = [0 as std::ffi::c_char; 128];
        if shared.len() != internal.len() {
            return Err(Error::Invalid(format!(
                "rank 0 sent an NCCL id of {} bytes, not 128; is every rank built with NCCL?",
                shared.len()
            )));
        }
        for (d, s) in internal.iter_mut().zip(&shared) {
            *d = *s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(cuda.cuda_stream(), t.rank(), t.world_size(), Id::uninit(internal))
            .map_err(|e| {
                Error::Invalid(format!(
                    "rank {}: joining the NCCL communicator: {e:?} (is libnccl.so.2 on LD_LIBRARY_PATH, and each rank on its own GPU?)",
                    t.rank()
                ))
            })?;
        Ok(Self { comm: Mutex::new(comm), world: t.world_size() })
    }

    /// Every rank's rows of `x` (F32, `(n, d)`, contiguous), in rank order.
    pub fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.apply_op1_no_bwd(&Collective(self, Kind::AllGather))?)
    }

    /// The element-wise sum over ranks of `x` (F32).
    pub fn all_reduce(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.apply_op1_no_bwd(&Collective(self, Kind::AllReduce))?)
    }

    fn comm(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Comm>> {
        self.comm
            .lock()
            .map_err(|_| candle_core::Error::Msg("the NCCL communicator was poisoned".into()))
    }
}

/// Which collective a [`Collective`] op runs.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    AllGather,
    AllReduce,
}

/// One NCCL collective as a candle op (no backward: its inputs are detached).
struct Collective<'a>(&'a Nccl, Kind);

impl CustomOp1 for Collective<'_> {
    fn name(&self) -> &'static str {
        match self.1 {
            Kind::AllGather => "nccl-all-gather",
            Kind::AllReduce => "nccl-all-reduce",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives take CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("NCCL needs a contiguous tensor".into()))?;
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = s.device().clone();
        let mut dims = l.shape().dims().to_vec();
        if self.1 == Kind::AllGather {
            dims[0] *= self.0.world;
        }
        // SAFETY: the collective writes every element before anything reads it.
        let mut dst = unsafe { dev.alloc::<f32>(dims.iter().product()) }?;
        let comm = self.0.comm()?;
        match self.1 {
            Kind::AllGather => comm.all_gather(&src, &mut dst),
            Kind::AllReduce => comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
        }
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e:?}", self.name())))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), Shape::from(dims)))
    }
}
