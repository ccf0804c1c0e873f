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

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

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
    pub fn with_nccl(mut self, device: &Device, timeout: Duration) -> Result<Self> {
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
    /// size; see [`crate::step::micro_step`] for why no division is needed here). Sums are
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

/// NCCL collectives on the ranks' GPUs, as candle's multi-process example runs them: custom
/// ops whose CUDA forward calls NCCL on the device's own stream, so they are ordered with the
/// model's kernels.
#[cfg(feature = "nccl")]
mod nccl {
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
                let id = Id::new()
                    .map_err(|e| Error::Invalid(format!("creating the NCCL id: {e:?}")))?;
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

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
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
}

/// Ranks that are threads of one process (tests of the collective logic).
pub struct LocalTransport {
    rank: usize,
    shared: Arc<LocalShared>,
}

struct LocalShared {
    world: usize,
    timeout: Duration,
    state: Mutex<LocalState>,
    changed: Condvar,
}

#[derive(Default)]
struct LocalState {
    slots: Vec<Option<Vec<u8>>>,
    filled: usize,
    /// The finished round, read by every rank before the next may start.
    result: Option<Arc<Vec<Vec<u8>>>>,
    readers: usize,
}

impl LocalTransport {
    /// `world` connected ranks; a rank waiting longer than `timeout` for the others fails.
    pub fn group(world: usize, timeout: Duration) -> Vec<Self> {
        let shared = Arc::new(LocalShared {
            world,
            timeout,
            state: Mutex::new(LocalState { slots: vec![None; world], ..LocalState::default() }),
            changed: Condvar::new(),
        });
        (0..world).map(|rank| Self { rank, shared: shared.clone() }).collect()
    }

    fn wait<'a>(
        &self,
        guard: std::sync::MutexGuard<'a, LocalState>,
        until: impl Fn(&LocalState) -> bool,
    ) -> Result<std::sync::MutexGuard<'a, LocalState>> {
        let (guard, timed_out) = self
            .shared
            .changed
            .wait_timeout_while(guard, self.shared.timeout, |s| !until(s))
            .map_err(|_| Error::Invalid("a rank panicked".into()))?;
        if timed_out.timed_out() {
            return Err(Error::Invalid(format!(
                "rank {}: the other ranks did not answer within {} s",
                self.rank,
                self.shared.timeout.as_secs_f64()
            )));
        }
        Ok(guard)
    }
}

impl Transport for LocalTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let state =
            self.shared.state.lock().map_err(|_| Error::Invalid("a rank panicked".into()))?;
        let mut state = self.wait(state, |s| s.result.is_none())?;
        state.slots[self.rank] = Some(data.to_vec());
        state.filled += 1;
        if state.filled == self.shared.world {
            let all = state.slots.iter_mut().map(|s| s.take().unwrap_or_default()).collect();
            state.result = Some(Arc::new(all));
            state.filled = 0;
            state.readers = 0;
            self.shared.changed.notify_all();
        }
        let mut state = self.wait(state, |s| s.result.is_some())?;
        let result = state.result.clone().expect("checked by the wait");
        state.readers += 1;
        if state.readers == self.shared.world {
            state.result = None;
            self.shared.changed.notify_all();
        }
        Ok((*result).clone())
    }
}

/// Where ranks meet and how long they wait for each other.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    /// This process's rank (`RANK`).
    pub rank: usize,
    /// Number of ranks (`WORLD_SIZE`).
    pub world_size: usize,
    /// Rank 0's host (`MASTER_ADDR`).
    pub master_addr: String,
    /// Rank 0's port (`MASTER_PORT`).
    pub master_port: u16,
    /// Longest wait for another rank, at the meeting and in every collective (`--ddp_timeout`).
    pub timeout: Duration,
}

impl Rendezvous {
    /// Reads torchrun's variables (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) through
    /// `var`; `None` when `WORLD_SIZE` is unset or 1.
    pub fn from_env(
        var: impl Fn(&str) -> Option<String>,
        timeout: Duration,
    ) -> Result<Option<Self>> {
        let number = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::Invalid(format!("{name}={v:?} is not a non-negative integer"))
                }),
            }
        };
        let world_size = number("WORLD_SIZE")?.unwrap_or(1);
        if world_size <= 1 {
            return Ok(None);
        }
        let rank = number("RANK")?.ok_or_else(|| {
            Error::Invalid(format!("WORLD_SIZE={world_size} but RANK is not set"))
        })?;
        if rank >= world_size {
            return Err(Error::Invalid(format!(
                "RANK={rank} is out of range for WORLD_SIZE={world_size}"
            )));
        }
        let master_addr = var("MASTER_ADDR").ok_or_else(|| {
            Error::Invalid("WORLD_SIZE > 1 needs MASTER_ADDR (rank 0's host)".into())
        })?;
        let port = var("MASTER_PORT").ok_or_else(|| {
            Error::Invalid("WORLD_SIZE > 1 needs MASTER_PORT (a free port on rank 0's host)".into())
        })?;
        let master_port = port
            .trim()
            .parse()
            .map_err(|_| Error::Invalid(format!("MASTER_PORT={port:?} is not a port number")))?;
        Ok(Some(Self { rank, world_size, master_addr, master_port, timeout }))
    }

    fn address(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

/// Ranks that are processes talking over TCP. Rank 0 listens at `MASTER_ADDR:MASTER_PORT`;
/// every other rank connects to it and rank 0 relays each round (a star: fine for the
/// representations and gradients of CPU training, where the model's own work dominates).
pub struct TcpTransport {
    rank: usize,
    world: usize,
    /// Rank 0: the links to ranks 1.. in rank order; other ranks: the link to rank 0.
    links: Mutex<Vec<TcpStream>>,
}

const HELLO: &[u8; 4] = b"TVTR";

fn io_error(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| {
        let why = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                "no answer within --ddp_timeout".to_string()
            }
            std::io::ErrorKind::UnexpectedEof => {
                "the connection closed (that rank probably failed: see its log)".to_string()
            }
            _ => e.to_string(),
        };
        Error::Invalid(format!("{what}: {why}"))
    }
}

fn send_frame(s: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    s.write_all(&(data.len() as u64).to_le_bytes())?;
    s.write_all(data)?;
    s.flush()
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    read_frame_of_at_most(s, usize::MAX)
}

/// A frame from a connection not yet known to be one of our ranks: a short one only.
fn read_frame_of_at_most(s: &mut TcpStream, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len) as usize;
    if len > limit {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a tevatron rank"));
    }
    let mut data = vec![0u8; len];
    s.read_exact(&mut data)?;
    Ok(data)
}

impl TcpTransport {
    /// Meets the other ranks: rank 0 waits for all of them, checking that each was started
    /// with the same `WORLD_SIZE` and a distinct rank; the others connect (retrying while
    /// rank 0 starts). Gives up with a message after `timeout`.
    pub fn connect(rv: &Rendezvous) -> Result<Self> {
        let deadline = Instant::now() + rv.timeout;
        let addr = rv.address();
        let resolved = addr
            .to_socket_addrs()
            .map_err(|e| Error::Invalid(format!("MASTER_ADDR:MASTER_PORT {addr}: {e}")))?
            .next()
            .ok_or_else(|| {
                Error::Invalid(format!("MASTER_ADDR:MASTER_PORT {addr} resolves to nothing"))
            })?;
        let links = if rv.rank == 0 {
            Self::accept_all(rv, &addr, resolved, deadline)?
        } else {
            vec![Self::join(rv, &addr, resolved, deadline)?]
        };
        for link in &links {
            link.set_read_timeout(Some(rv.timeout))
                .and_then(|()| link.set_write_timeout(Some(rv.timeout)))
                .and_then(|()| link.set_nodelay(true))
                .map_err(io_error(format!("rank {}: configuring a link", rv.rank)))?;
        }
        Ok(Self { rank: rv.rank, world: rv.world_size, links: Mutex::new(links) })
    }

    fn accept_all(
        rv: &Rendezvous,
        addr: &str,
        at: std::net::SocketAddr,
        deadline: Instant,
    ) -> Result<Vec<TcpStream>> {
        let listener = TcpListener::bind(at).map_err(|e| {
            Error::Invalid(format!("rank 0 cannot listen on {addr} (MASTER_ADDR:MASTER_PORT): {e}"))
        })?;
        listener.set_nonblocking(true).map_err(io_error(format!("rank 0 listening on {addr}")))?;
        let mut peers: Vec<Option<TcpStream>> = (1..rv.world_size).map(|_| None).collect();
        while peers.iter().any(Option::is_none) {
            let (mut s, _) = match listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = (peers.iter().enumerate())
                            .filter(|(_, p)| p.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(Error::Invalid(format!(
                            "rank 0: rank(s) {} did not connect to {addr} within {} s (--ddp_timeout); were they started with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE?",
                            missing.join(", "),
                            rv.timeout.as_secs_f64()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(io_error(format!("rank 0 accepting on {addr}"))(e)),
            };
            let what = || format!("rank 0: a rank connecting to {addr}");
            s.set_nonblocking(false).map_err(io_error(what()))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).map_err(io_error(what()))?;
            let Ok(hello) = read_frame_of_at_most(&mut s, 64) else {
                continue; // not one of our ranks: ignore the stranger
            };
            let field = |i: usize| {
                hello.get(i..i + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            };
            let (rank, world) = match (hello.starts_with(HELLO), field(4), field(8)) {
                (true, Some(r), Some(w)) => (r, w),
                _ => continue,
            };
            let problem = if world != rv.world_size {
                Some(format!(
                    "rank {rank} was started with WORLD_SIZE={world} but rank 0 with WORLD_SIZE={}; start every rank with the same WORLD_SIZE",
                    rv.world_size
                ))
            } else if rank == 0 || rank >= rv.world_size || peers[rank - 1].is_some() {
                Some(format!("two processes claim RANK={rank}; give each rank its own RANK"))
            } else {
                None
            };
            if let Some(problem) = problem {
                let _ = send_frame(&mut s, format!("ERR {problem}").as_bytes());
                return Err(Error::Invalid(problem));
            }
            peers[rank - 1] = Some(s);
        }
        let mut links: Vec<TcpStream> = peers.into_iter().flatten().collect();
        for s in &mut links {
            send_frame(s, b"OK").map_err(io_error("rank 0 greeting the ranks".into()))?;
        }
        Ok(links)
    }

    fn join(
        rv: &Rendezvous,
        addr: &str,
        at: std::net::SocketAddr,
        deadline: Instant,
    ) -> Result<TcpStream> {
        let mut s = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(&at, left.max(Duration::from_millis(1))) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(Error::Invalid(format!(
                        "rank {}: could not reach rank 0 at {addr} (MASTER_ADDR:MASTER_PORT) within {} s (--ddp_timeout): {e}; is rank 0 running?",
                        rv.rank,
                        rv.timeout.as_secs_f64()
                    )))
                }
            }
        };
        let what = || format!("rank {}: meeting rank 0 at {addr}", rv.rank);
        let mut hello = HELLO.to_vec();
        hello.extend((rv.rank as u32).to_le_bytes());
        hello.extend((rv.world_size as u32).to_le_bytes());
        send_frame(&mut s, &hello).map_err(io_error(what()))?;
        s.set_read_timeout(Some(
            deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1)),
        ))
        .map_err(io_error(what()))?;
        let answer = read_frame(&mut s).map_err(io_error(what()))?;
        if answer != b"OK" {
            let text = String::from_utf8_lossy(&answer);
            return Err(Error::Invalid(text.strip_prefix("ERR ").unwrap_or(&text).to_string()));
        }
        Ok(s)
    }
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut links = self.links.lock().map_err(|_| Error::Invalid("a link panicked".into()))?;
        if self.rank == 0 {
            let mut all = vec![data.to_vec()];
            for (i, s) in links.iter_mut().enumerate() {
                all.push(
                    read_frame(s)
                        .map_err(io_error(format!("rank 0 waiting for rank {}", i + 1)))?,
                );
            }
            let mut packed = Vec::new();
            for part in &all {
                packed.extend((part.len() as u64).to_le_bytes());
                packed.extend(part);
            }
            for (i, s) in links.iter_mut().enumerate() {
                send_frame(s, &packed)
                    .map_err(io_error(format!("rank 0 sending to rank {}", i + 1)))?;
            }
            return Ok(all);
        }
        let s = &mut links[0];
        let what = || format!("rank {} waiting for rank 0", self.rank);
        send_frame(s, data).map_err(io_error(what()))?;
        let packed = read_frame(s).map_err(io_error(what()))?;
        let mut all = Vec::with_capacity(self.world);
        let mut at = 0;
        while at < packed.len() {
            let len = packed
                .get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
                .filter(|&n| at + 8 + n <= packed.len())
                .ok_or_else(|| {
                    Error::Invalid(format!("rank {}: a garbled message from rank 0", self.rank))
                })?;
            all.push(packed[at + 8..at + 8 + len].to_vec());
            at += 8 + len;
        }
        if all.len() != self.world {
            return Err(Error::Invalid(format!(
                "rank {}: rank 0 relayed {} parts for {} ranks",
                self.rank,
                all.len(),
                self.world
            )));
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn rendezvous(rank: usize, world: usize, port: u16, secs: u64) -> Rendezvous {
        Rendezvous {
            rank,
            world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: Duration::from_secs(secs),
        }
    }

    /// Many rounds of messages of different lengths arrive whole, in rank order, each in its
    /// own round; rows gather around the local tensor and sums are equal on every rank.
    fn exercise(group: Group) {
        let (rank, world) = (group.rank(), group.world_size());
        for round in 0..40u8 {
            let mine = vec![rank as u8; rank + round as usize % 3];
            let all = group.transport.as_ref().unwrap().all_gather_bytes(&mine).unwrap();
            for (r, got) in all.iter().enumerate() {
                assert_eq!(got, &vec![r as u8; r + round as usize % 3], "round {round}");
            }
        }
        let local = Tensor::full(rank as f32, (rank + 1, 2), &Device::Cpu).unwrap();
        let rows = group.gather_rows(&local).unwrap();
        assert_eq!(rows.dims2().unwrap(), ((1..=world).sum::<usize>(), 2));
        let first: Vec<f32> = rows.get(0).unwrap().to_vec1().unwrap();
        assert_eq!(first, vec![0.0, 0.0]);
        let x = Tensor::new(&[1f32 + rank as f32, 10.0], &Device::Cpu).unwrap();
        let summed = group.all_reduce_sum(vec![x]).unwrap();
        let want = (1..=world).sum::<usize>() as f32;
        assert_eq!(summed[0].to_vec1::<f32>().unwrap(), vec![want, 10.0 * world as f32]);
        assert_eq!(group.broadcast_bytes(&[rank as u8 + 7]).unwrap(), vec![7]);
        group.barrier().unwrap();
    }

    #[test]
    fn local_ranks_exchange_in_order() {
        let ranks = LocalTransport::group(3, Duration::from_secs(20));
        std::thread::scope(|s| {
            for t in ranks {
                s.spawn(move || exercise(Group::new(Arc::new(t))));
            }
        });
    }

    #[test]
    fn tcp_ranks_exchange_in_order() {
        let port = free_port();
        std::thread::scope(|s| {
            for rank in 0..3 {
                s.spawn(move || {
                    let t = TcpTransport::connect(&rendezvous(rank, 3, port, 20)).unwrap();
                    exercise(Group::new(Arc::new(t)));
                });
            }
        });
    }

    #[test]
    fn mismatched_world_sizes_are_refused_on_both_sides() {
        let port = free_port();
        let (zero, one) = std::thread::scope(|s| {
            let zero = s.spawn(move || TcpTransport::connect(&rendezvous(0, 2, port, 10)).err());
            let one = s.spawn(move || TcpTransport::connect(&rendezvous(1, 3, port, 10)).err());
            (zero.join().unwrap(), one.join().unwrap())
        });
        let want = "rank 1 was started with WORLD_SIZE=3 but rank 0 with WORLD_SIZE=2";
        assert!(zero.unwrap().to_string().contains(want));
        assert!(one.unwrap().to_string().contains(want));
    }

    #[test]
    fn an_absent_rank_zero_is_a_timeout_with_a_message() {
        let port = free_port();
        let start = Instant::now();
        let e = TcpTransport::connect(&rendezvous(1, 2, port, 1)).err().unwrap().to_string();
        assert!(e.contains("rank 1: could not reach rank 0 at 127.0.0.1:"), "{e}");
        assert!(e.contains("within 1 s"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(10));
        // And rank 0 waiting for a rank that never comes.
        let e = TcpTransport::connect(&rendezvous(0, 2, port, 1)).err().unwrap().to_string();
        assert!(e.contains("rank(s) 1 did not connect"), "{e}");
    }

    #[test]
    fn a_rank_that_stops_answering_fails_the_others() {
        let ranks = LocalTransport::group(2, Duration::from_millis(200));
        let e = ranks[0].all_gather_bytes(b"x").err().unwrap().to_string();
        assert!(e.contains("did not answer within 0.2 s"), "{e}");
    }

    /// Over TCP: a rank that meets the others and then never sends makes rank 0 end with a
    /// message naming it once `--ddp_timeout` has passed, and the rank waiting on rank 0 end
    /// with a message too, instead of hanging.
    #[test]
    fn a_silent_tcp_rank_fails_the_others_with_a_message() {
        let port = free_port();
        let secs = 2;
        let (done, silent_may_go) = std::sync::mpsc::channel::<()>();
        let start = Instant::now();
        let (zero, one) = std::thread::scope(|s| {
            let silent = s.spawn(move || {
                let t = TcpTransport::connect(&rendezvous(2, 3, port, secs)).unwrap();
                // Connected, then silent until the others have given up.
                silent_may_go.recv().unwrap();
                drop(t);
            });
            let talk = |rank: usize| {
                s.spawn(move || {
                    let t = TcpTransport::connect(&rendezvous(rank, 3, port, secs)).unwrap();
                    let e = t.all_gather_bytes(b"x").err().map(|e| e.to_string());
                    (e, Instant::now())
                })
            };
            let (zero, one) = (talk(0), talk(1));
            let zero = zero.join().unwrap();
            let one = one.join().unwrap();
            done.send(()).unwrap();
            silent.join().unwrap();
            (zero, one)
        });
        let e = zero.0.expect("rank 0 gathered without rank 2");
        assert_eq!(e, "rank 0 waiting for rank 2: no answer within --ddp_timeout");
        let e = one.0.expect("rank 1 gathered without rank 2");
        assert!(e.starts_with("rank 1 waiting for rank 0: "), "{e}");
        assert!(
            e.ends_with("no answer within --ddp_timeout")
                || e.ends_with("the connection closed (that rank probably failed: see its log)"),
            "{e}"
        );
        for (rank, end) in [(0, zero.1), (1, one.1)] {
            let took = end.duration_since(start);
            assert!(took >= Duration::from_secs(secs), "rank {rank} gave up after {took:?}");
            assert!(took < Duration::from_secs(4 * secs), "rank {rank} took {took:?}");
        }
    }

    #[test]
    fn environment_is_checked() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let t = Duration::from_secs(1);
        assert!(Rendezvous::from_env(env(&[]), t).unwrap().is_none());
        assert!(Rendezvous::from_env(env(&[("WORLD_SIZE", "1")]), t).unwrap().is_none());
        let e = |p| Rendezvous::from_env(env(p), t).unwrap_err().to_string();
        assert_eq!(e(&[("WORLD_SIZE", "two")]), "WORLD_SIZE=\"two\" is not a non-negative integer");
        assert_eq!(e(&[("WORLD_SIZE", "2")]), "WORLD_SIZE=2 but RANK is not set");
        assert_eq!(
            e(&[("WORLD_SIZE", "2"), ("RANK", "2")]),
            "RANK=2 is out of range for WORLD_SIZE=2"
        );
        assert!(e(&[("WORLD_SIZE", "2"), ("RANK", "1")]).contains("MASTER_ADDR"));
        let ok = Rendezvous::from_env(
            env(&[
                ("WORLD_SIZE", "2"),
                ("RANK", "1"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "29500"),
            ]),
            t,
        )
        .unwrap()
        .unwrap();
        assert_eq!((ok.rank, ok.world_size, ok.address()), (1, 2, "h:29500".to_string()));
    }
}
