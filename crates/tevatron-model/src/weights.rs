//! Model weights from a folder: `model.safetensors`, sharded safetensors with
//! `model.safetensors.index.json`, or `pytorch_model.bin`. Names are kept as HF writes them,
//! minus a task prefix such as `bert.` (so `BertForMaskedLM` checkpoints load as `BertModel`).
//! Knows nothing of architectures.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Reads every tensor of the checkpoint in `dir` onto `device`, stripping `prefixes`.
pub fn load(dir: &Path, prefixes: &[&str], device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let pickle = dir.join("pytorch_model.bin");
    let mut raw: Vec<(String, Tensor)> = Vec::new();
    let bad = |path: &Path, e: candle_core::Error| Error::Weights {
        path: path.to_path_buf(),
        what: format!("cannot read weights ({e})"),
    };
    if single.is_file() {
        raw.extend(read_safetensors(&single, device).map_err(|e| bad(&single, e))?);
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .map_err(|source| Error::Read { path: index.clone(), source })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|source| Error::Json { path: index.clone(), source })?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
            Error::Weights { path: index.clone(), what: "no `weight_map` object".into() }
        })?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        for f in files {
            let shard = dir.join(f);
            raw.extend(read_safetensors(&shard, device).map_err(|e| bad(&shard, e))?);
        }
    } else if pickle.is_file() {
        for (name, t) in candle_core::pickle::read_all(&pickle).map_err(|e| bad(&pickle, e))? {
            raw.push((name, t.to_device(device)?));
        }
    } else {
        return Err(Error::NotFound(format!(
            "{}: no weights (looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin)",
            dir.display()
        )));
    }
    Ok(raw
        .into_iter()
        .map(|(name, t)| {
            let name = prefixes
                .iter()
                .find_map(|p| name.strip_prefix(p))
                .map(str::to_owned)
                .unwrap_or(name);
            (name, t)
        })
        .collect())
}

/// Reads a safetensors file. On the CPU with [`crate::mapped::MappedAlloc`] installed, the
/// tensors use the mapped file as their buffers (nothing is copied; a tensor that is not
/// aligned for its dtype is copied). Otherwise it reads one tensor at a time, so that loading
/// peaks at the model plus its largest tensor: candle's `safetensors::load` reads the whole file
/// into memory first, which doubled the peak (a 1.9 GB Qwen2-0.5B file peaked at 3.8 GB).
fn read_safetensors(path: &Path, device: &Device) -> candle_core::Result<Vec<(String, Tensor)>> {
    use candle_core::safetensors::Load;
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n)?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > file_len {
        fail!("a header of {n} bytes does not fit a file of {file_len} bytes");
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)?;
    // Deserialising validates the offsets: tensors are contiguous and never overlap, so no two
    // mapped buffers share bytes.
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| candle_core::Error::Msg(format!("bad safetensors header ({e})")))?;
    let mut tensors: Vec<_> = meta.tensors().into_iter().collect();
    tensors.sort_by_key(|(_, info)| info.data_offsets.0);
    // Mapping is an optimisation: a file system that cannot map falls back to reading.
    let mapping = match device.is_cpu().then(|| crate::mapped::MappedFile::open(&file)) {
        Some(Ok(map)) => map,
        Some(Err(e)) => {
            tracing::debug!("{}: not memory-mapped ({e}); reading it", path.display());
            None
        }
        None => None,
    };
    let mut out = Vec::with_capacity(tensors.len());
    for (name, info) in tensors {
        // The offsets come from the file: compared with the data's length before any sum, which
        // offsets near 2^64 would overflow.
        let (start, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        if end > file_len - 8 - n || start > end {
            fail!(
                "tensor {name} ends at byte {} of a {file_len}-byte file (truncated?)",
                end.saturating_add(8 + n)
            );
        }
        let (start, end) = (8 + n + start, 8 + n + end);
        if let Some(map) = &mapping {
            let range = start as usize..end as usize;
            if let Some(t) = mapped_tensor(map, range, info.dtype, &info.shape)? {
                out.push((name, t));
                continue;
            }
        }
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = vec![0u8; (end - start) as usize];
        file.read_exact(&mut bytes)?;
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), &bytes)?;
        out.push((name, view.load(device)?));
    }
    Ok(out)
}

/// A CPU tensor over the mapped bytes `range`, or `None` for a dtype or an alignment that
/// cannot be used in place.
fn mapped_tensor(
    map: &crate::mapped::MappedFile,
    range: std::ops::Range<usize>,
    dtype: safetensors::Dtype,
    shape: &[usize],
) -> candle_core::Result<Option<Tensor>> {
    use safetensors::Dtype as S;
    fn build<T: bytemuck::Pod + candle_core::WithDType>(
        values: Option<Vec<T>>,
        shape: &[usize],
    ) -> candle_core::Result<Option<Tensor>> {
        values.map(|v| Tensor::from_vec(v, shape, &Device::Cpu)).transpose()
    }
    if cfg!(target_endian = "big") {
        return Ok(None);
    }
    match dtype {
        S::F32 => build(map.buffer::<f32>(range), shape),
        S::BF16 => build(map.buffer::<half::bf16>(range), shape),
        S::F16 => build(map.buffer::<half::f16>(range), shape),
        S::F64 => build(map.buffer::<f64>(range), shape),
        S::U8 => build(map.buffer::<u8>(range), shape),
        S::U32 => build(map.buffer::<u32>(range), shape),
        S::I64 => build(map.buffer::<i64>(range), shape),
        _ => Ok(None),
    }
}

/// Writes `tensors` (moved to the CPU, sorted by name) as one safetensors file with PyTorch's
/// `format: pt` metadata, which transformers and PEFT expect of the files they load.
pub fn save(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let mut cpu: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()?;
    cpu.sort_by(|x, y| x.0.cmp(&y.0));
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let views: Vec<(String, &Tensor)> = cpu.iter().map(|(k, t)| (k.clone(), t)).collect();
    safetensors::tensor::serialize_to_file(views, Some(meta), path).map_err(|e| {
        Error::Weights { path: path.to_path_buf(), what: format!("cannot write ({e})") }
    })?;
    readable_as_created(path)
}

/// Gives `path` the permissions a newly created file gets (0666 less the umask): safetensors
/// writes through a temporary file made readable by its owner only (0600) and renames it, so
/// the weights were the one file of a saved folder another user (a serving account) could not
/// read. The mode is that of a file created beside it, so no umask is read or changed.
fn readable_as_created(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let write_err = |source| Error::Write { path: path.to_path_buf(), source };
        let probe = path.with_extension(format!("mode.{}", std::process::id()));
        let mode = std::fs::File::create(&probe)
            .and_then(|f| f.metadata())
            .map(|m| m.permissions().mode());
        let _ = std::fs::remove_file(&probe);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode.map_err(write_err)?))
            .map_err(write_err)?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// A `VarBuilder` backend over loaded tensors that records which names the architecture asked
/// for, so a trainable model holds exactly the weights it uses (a checkpoint's unused pooler or
/// MLM head gets no variable, and "every variable receives a gradient" can be asserted).
pub struct TrackedWeights {
    tensors: HashMap<String, Tensor>,
    used: std::sync::Arc<std::sync::Mutex<BTreeSet<String>>>,
}

impl TrackedWeights {
    /// Wraps tensors; returns the backend and a handle on the names it will have served.
    pub fn new(
        tensors: HashMap<String, Tensor>,
    ) -> (Self, std::sync::Arc<std::sync::Mutex<BTreeSet<String>>>) {
        let used = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
        (Self { tensors, used: used.clone() }, used)
    }
}

impl candle_nn::var_builder::SimpleBackend for TrackedWeights {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: candle_core::DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "tensor {name} has shape {:?}, the architecture expects {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: candle_core::DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))?;
        self.used.lock().expect("weight tracker lock").insert(name.to_string());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is the failure report
    use super::*;

    /// Saved weights get the permissions of any file the process creates (safetensors' own
    /// temporary file made them readable by their owner only).
    #[cfg(unix)]
    #[test]
    fn saved_weights_are_as_readable_as_other_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let weights = dir.path().join("model.safetensors");
        save(&weights, vec![("w".into(), t)]).unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(&config, "{}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&weights), mode(&config));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 2, "the probe file is removed");
    }
}
