//! Data-parallel training across processes (ranks): the collectives the trainer needs and the
//! transports that carry them.
//!
//! Tevatron trains under PyTorch DDP: every rank encodes its own slice of the global batch,
//! the representations of all ranks are all-gathered so that each query sees every rank's
//! passages as negatives (only the local slice carries gradient), and the gradients are
//! all-reduced before the optimizer step. [`Group`] offers exactly those operations over a
//! [`Transport`] that can only do one thing: give every rank every rank's bytes. Two transports:
//! [`LocalTransport`] (threads of one process, for tests) and [`TcpTransport`] (processes,
//! possibly on several machines, meeting at `MASTER_ADDR:MASTER_PORT` as torchrun's ranks do).
//!
//! Reductions add the ranks' contributions in rank order on every rank, so all ranks hold
//! bit-identical gradients and their weights never drift apart.
//!
//! With the `nccl` feature, GPU ranks move representations and gradients with NCCL instead
//! (`Group::with_nccl`); the TCP transport then only carries the rendezvous and small
//! control messages.

//!
//! Modules: this one holds the [`Transport`] trait and the collectives ([`Group`]); `local` the
//! in-process transport, `rendezvous` torchrun's meeting variables, `tcp` the TCP transport,
//! `nccl` the GPU collectives.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

mod local;
#[cfg(feature = "nccl")]
mod nccl;
mod rendezvous;
mod tcp;
#[cfg(test)]
mod tests;

pub use local::LocalTransport;
pub use rendezvous::Rendezvous;
pub use tcp::TcpTransport;

/// Moves byte strings between ranks: the one primitive the collectives are built from.
pub trait Transport: Send + Sync {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Every rank's `data` (lengths may differ), in rank order. All ranks must call it the
    /// same number of times.
    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>>;
}

/// Floats exchanged per round of an all-reduce: bounds the transport's buffers (W copies of
/// this on the rank that relays) whatever the model size.
const REDUCE_CHUNK: usize = 4 << 20;

/// The ranks of one training run and the collectives over them. A group of one rank does no
/// communication at all.
#[derive(Clone)]
pub struct Group {
    transport: Option<Arc<dyn Transport>>,
    #[cfg(feature = "nccl")]
    nccl: Option<Arc<nccl::Nccl>>,
    /// With NCCL, the deadline its collectives lack (`Group::watch`).
    #[cfg(feature = "nccl")]
    watchdog: Option<Arc<crate::watchdog::Watchdog>>,
}

impl Group {
    /// A run of one process.
    pub fn single() -> Self {
        Self {
            transport: None,
            #[cfg(feature = "nccl")]
            nccl: None,
            #[cfg(feature = "nccl")]
            watchdog: None,
        }
    }

    /// A run whose ranks talk through `transport`.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        if transport.world_size() <= 1 {
            return Self::single();
        }
        Self {
            transport: Some(transport),
            #[cfg(feature = "nccl")]
            nccl: None,
            #[cfg(feature = "nccl")]
            watchdog: None,
        }
    }

    /// Moves the group's tensors with NCCL when `device` is a GPU (every rank calls this with
    /// its own device). A CPU device, a single rank, or ranks sharing a GPU (which one NCCL
    /// communicator cannot hold) keep the transport alone; [`Group::uses_nccl`] says which.
    /// NCCL's waits have no deadline, so a rank whose joining or step (see [`Group::watch`])
    /// takes longer than `timeout` ends with a message instead of hanging.
    #[cfg(feature = "nccl")]
    pub fn with_nccl(mut self, device: &Device, timeout: std::time::Duration) -> Result<Self> {
        let Some(t) = &self.transport else { return Ok(self) };
        if !device.is_cuda() {
            return Ok(self);
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
        let me = format!("{}/{visible}/{:?}", host.trim(), device.location());
        let all = t.all_gather_bytes(me.as_bytes())?;
        let distinct: std::collections::HashSet<&Vec<u8>> = all.iter().collect();
        if distinct.len() < all.len() {
            if t.rank() == 0 {
                tracing::warn!("several ranks share a GPU, which NCCL cannot do: using TCP");
            }
            return Ok(self);
        }
        let watchdog = crate::watchdog::Watchdog::start(timeout, crate::watchdog::exit_with)?;
        let joining = watchdog.watch(format!("rank {}: joining the NCCL communicator", t.rank()));
        self.nccl = Some(Arc::new(nccl::Nccl::connect(t.as_ref(), device)?));
        drop(joining);
        self.watchdog = Some(Arc::new(watchdog));
        Ok(self)
    }

    /// Puts `what` (one training step) under the NCCL watchdog until the guard is dropped;
    /// `None` where the collectives are the transport's, which have deadlines of their own.
    pub fn watch(&self, what: impl FnOnce() -> String) -> Option<crate::watchdog::Watch> {
        #[cfg(feature = "nccl")]
        if let Some(dog) = &self.watchdog {
            return Some(dog.watch(what()));
        }
        let _ = what;
        None
    }

    /// Whether NCCL carries this group's tensors.
    pub fn uses_nccl(&self) -> bool {
        #[cfg(feature = "nccl")]
        return self.nccl.is_some();
        #[cfg(not(feature = "nccl"))]
        false
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.transport.as_ref().map_or(0, |t| t.rank())
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.transport.as_ref().map_or(1, |t| t.world_size())
    }

    /// Rank 0 writes checkpoints and logs.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Rank 0's `data` on every rank.
    pub fn broadcast_bytes(&self, data: &[u8]) -> Result<Vec<u8>> {
        match &self.transport {
            None => Ok(data.to_vec()),
            Some(t) => {
                let own = if t.rank() == 0 { data } else { &[] };
                Ok(t.all_gather_bytes(own)?.swap_remove(0))
            }
        }
    }

    /// Waits until every rank has reached this point.
    pub fn barrier(&self) -> Result<()> {
        match &self.transport {
            None => Ok(()),
            Some(t) => t.all_gather_bytes(&[]).map(drop),
        }
    }

    /// Tevatron's `_dist_gather_tensor`: the rows of every rank concatenated in rank order,
    /// with this rank's own rows being `local` itself (so its graph, and only its graph, is
    /// kept). Ranks may hold different numbers of rows.
    pub fn gather_rows(&self, local: &Tensor) -> Result<Tensor> {
        let Some(t) = &self.transport else { return Ok(local.clone()) };
        let (_, width) = local.dims2()?;
        #[cfg(feature = "nccl")]
        if let Some(all) = self.gather_rows_nccl(t.as_ref(), local)? {
            return Ok(all);
        }
        let wire = Wire::of(&[local]);
        let parts = t.all_gather_bytes(&wire.encode(&local.detach())?)?;
        let mut rows = Vec::with_capacity(parts.len());
        for (rank, bytes) in parts.iter().enumerate() {
            if rank == t.rank() {
                rows.push(local.clone());
                continue;
            }
            let values = wire.decode(bytes);
            if !values.len().is_multiple_of(width.max(1)) {
                return Err(Error::Invalid(format!(
                    "rank {rank} sent {} values, not rows of width {width}; are all ranks running the same model?",
                    values.len()
                )));
            }
            let n = values.len() / width.max(1);
            rows.push(
                Tensor::from_vec(values, (n, width), &Device::Cpu)?
                    .to_dtype(local.dtype())?
                    .to_device(local.device())?,
            );
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// [`Group::gather_rows`] by NCCL, for GPU tensors of equal row counts on every rank (the
    /// trainer's slices always are); `None` where NCCL does not apply.
    #[cfg(feature = "nccl")]
    fn gather_rows_nccl(&self, t: &dyn Transport, local: &Tensor) -> Result<Option<Tensor>> {
        let Some(nccl) = self.nccl.as_ref().filter(|_| local.device().is_cuda()) else {
            return Ok(None);
        };
        let rows = local.dim(0)?;
        let counts = t.all_gather_bytes(&(rows as u64).to_le_bytes())?;
        if counts.iter().any(|c| c != &counts[t.rank()]) {
            return Ok(None);
        }
        let all = nccl
            .all_gather(&local.detach().to_dtype(DType::F32)?.contiguous()?)?
            .to_dtype(local.dtype())?;
        let parts = (0..t.world_size())
            .map(|r| if r == t.rank() { Ok(local.clone()) } else { all.narrow(0, r * rows, rows) })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&parts, 0)?))
    }

    /// The sum over ranks of each tensor (DDP's all-reduce before its division by the world
    /// size; see [`crate::step::step`] for why no division is needed here). Sums are
    /// taken in f64 in rank order, so every rank gets the same bits.
    pub fn all_reduce_sum(&self, tensors: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let Some(t) = &self.transport else { return Ok(tensors) };
        #[cfg(feature = "nccl")]
        if let Some(nccl) = &self.nccl {
            if tensors.iter().all(|x| x.device().is_cuda() && x.dtype() == DType::F32) {
                let flat = Tensor::cat(
                    &tensors
                        .iter()
                        .map(Tensor::flatten_all)
                        .collect::<candle_core::Result<Vec<_>>>()?,
                    0,
                )?;
                let summed = nccl.all_reduce(&flat)?;
                let mut at = 0;
                let mut out = Vec::with_capacity(tensors.len());
                for x in &tensors {
                    out.push(summed.narrow(0, at, x.elem_count())?.reshape(x.shape())?);
                    at += x.elem_count();
                }
                return Ok(out);
            }
        }
        let wire = Wire::of(&tensors.iter().collect::<Vec<_>>());
        let flat = Tensor::cat(
            &tensors
                .iter()
                .map(|x| x.flatten_all()?.to_dtype(wire.0))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let n = flat.elem_count();
        let mut summed = Vec::with_capacity(n);
        // An empty round still runs when there is nothing to send, so that every rank makes
        // the same number of calls.
        let mut start = 0;
        loop {
            let len = REDUCE_CHUNK.min(n - start);
            let parts = t.all_gather_bytes(&wire.encode(&flat.narrow(0, start, len)?)?)?;
            let mut acc = vec![0f64; len];
            for (rank, bytes) in parts.iter().enumerate() {
                let values = wire.decode(bytes);
                if values.len() != len {
                    return Err(Error::Invalid(format!(
                        "rank {rank} sent {} gradient values where this rank has {len}; are all ranks training the same model?",
                        values.len()
                    )));
                }
                for (a, v) in acc.iter_mut().zip(values) {
                    *a += v;
                }
            }
            summed.extend(acc);
            start += len;
            if start >= n {
                break;
            }
        }
        let summed = Tensor::from_vec(summed, n, &Device::Cpu)?;
        let mut at = 0;
        let mut out = Vec::with_capacity(tensors.len());
        for x in &tensors {
            let part = summed.narrow(0, at, x.elem_count())?.reshape(x.shape())?;
            out.push(part.to_dtype(x.dtype())?.to_device(x.device())?);
            at += x.elem_count();
        }
        Ok(out)
    }
}

/// How values travel: f64 for f64 tensors, f32 for the rest (bf16 and f16 widen without
/// loss).
struct Wire(DType);

impl Wire {
    fn of(tensors: &[&Tensor]) -> Self {
        Self(if tensors.iter().any(|t| t.dtype() == DType::F64) { DType::F64 } else { DType::F32 })
    }

    fn encode(&self, t: &Tensor) -> Result<Vec<u8>> {
        let flat = t.flatten_all()?.to_dtype(self.0)?;
        Ok(if self.0 == DType::F64 {
            flat.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()
        } else {
            flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()
        })
    }

    fn decode(&self, bytes: &[u8]) -> Vec<f64> {
        if self.0 == DType::F64 {
            bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect()
        } else {
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64)
                .collect()
        }
    }
}
