//! `tevatron encode --nproc_per_node N`: one command encodes its input (or its
//! `--dataset_shard_index` shard) in N processes, ranks of this binary started as torchrun
//! starts them (`launch`), spread over the visible GPUs. Rank k encodes the k-th of N
//! contiguous parts into `<output>.parts/part-<k>-of-<N>.safetensors`, written whole under a
//! temporary name and renamed, so a part that exists is complete. The launching process then
//! merges the parts in order into the output (the rows of one process's run, in the same order)
//! and removes them. A rerun after a crash starts only the ranks whose part is missing, when the
//! parts were made with the same flags from the same folder (`flags.txt` in the parts folder);
//! parts made otherwise are cleared first.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tevatron_ir::records::shard_range;
use tevatron_ir::vectors::{VectorWriter, Vectors};

use crate::args::EncodeArgs;
use crate::launch;

/// Rows merged per block (bounded memory on any corpus).
const MERGE_ROWS: usize = 4096;

/// Set by [`run`] in the processes it starts: the rank that shows progress (the first whose
/// part is missing). Its presence is what makes an encode one part of a multi-process encode,
/// so no other launched rank (nor `mine`'s encoding) is ever taken for one.
const PROGRESS_RANK: &str = "TEVATRON_ENCODE_PROGRESS_RANK";

/// The parts folder's record of the flags that made its parts.
const STAMP: &str = "flags.txt";

/// The part of a multi-process encode this process makes: rank `rank` of `world`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Part {
    rank: usize,
    world: usize,
    progress: bool,
}

impl Part {
    /// This process's part, when `encode --nproc_per_node` started it for one.
    pub(super) fn of_this_process() -> Result<Option<Self>> {
        if !launch::is_launched_rank() || std::env::var_os(PROGRESS_RANK).is_none() {
            return Ok(None);
        }
        let var = |k: &str| -> Result<usize> {
            let v = std::env::var(k).with_context(|| format!("{k} is not set"))?;
            v.trim().parse().with_context(|| format!("{k}={v:?} is not a number"))
        };
        let (rank, world, shows) = (var("RANK")?, var("WORLD_SIZE")?, var(PROGRESS_RANK)?);
        if rank >= world {
            bail!("RANK {rank} is not below WORLD_SIZE {world}");
        }
        Ok(Some(Self { rank, world, progress: rank == shows }))
    }

    /// Its rows of the rows `range` the command encodes: the rank-th of `world` contiguous
    /// parts (the rule of `--dataset_number_of_shards`).
    pub(super) fn rows(self, range: Range<usize>) -> Range<usize> {
        let sub = shard_range(range.len(), self.world, self.rank);
        range.start + sub.start..range.start + sub.end
    }

    /// The file it writes for the command's `output`.
    pub(super) fn path(self, output: &Path) -> PathBuf {
        parts_dir(output).join(format!("part-{:05}-of-{:05}.safetensors", self.rank, self.world))
    }

    /// Its device for `--device spec`: GPU `rank mod count` when the flag is unset or `cuda`
    /// and GPUs are visible, else the device given (and, with `--int8`, which runs on the CPU,
    /// always the device given).
    pub(super) fn device(self, spec: Option<&str>, int8: bool) -> Option<String> {
        let spread = matches!(spec, None | Some("cuda") | Some("gpu")) && !int8;
        let gpus = if spread { tevatron_model::device::gpu_count() } else { 0 };
        if gpus > 0 {
            Some(format!("cuda:{}", self.rank % gpus))
        } else {
            spec.map(str::to_string)
        }
    }

    /// Whether this part's process shows progress: only one does (the first whose part was
    /// missing), since the others' bars would overwrite it.
    pub(super) fn shows_progress(self) -> bool {
        self.progress
    }
}

/// `<output>.parts` beside the output.
fn parts_dir(output: &Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".parts");
    output.with_file_name(name)
}

/// The regular files of a model folder and of its sub-folders (sentence-transformers'
/// modules, `0_Transformer`, ...; not those of its `checkpoint-*` folders, which encoding does
/// not read, nor below three levels), sorted.
fn model_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for path in entries.filter_map(|e| Some(e.ok()?.path())) {
            let name =
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if path.is_file() {
                out.push(path);
            } else if path.is_dir() && depth < 3 && !name.starts_with("checkpoint-") {
                walk(&path, depth + 1, out);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, 0, &mut files);
    files.sort();
    files
}

/// One line per file: its path and its identity (path, size and modification time, as the
/// row-index cache keys files: `tevatron_ir::rows::cache_key`), as the parts' stamp records
/// them.
fn file_stamps(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| {
            let key = tevatron_ir::rows::cache_key(f).unwrap_or_else(|_| "unreadable".into());
            format!("{} {key}\n", f.display())
        })
        .collect()
}

/// Encodes `a`'s input in `a.nproc_per_node` processes, then merges their parts into
/// `--encode_output_path`.
pub(super) fn run(a: &EncodeArgs) -> Result<()> {
    let (world, output) = (a.nproc_per_node, &a.encode_output_path);
    let dir = parts_dir(output);
    let cwd = std::env::current_dir().context("reading the current folder")?;
    // Every flag that shapes the parts; not `--quiet`, `--disable_tqdm` or `--output_dir`,
    // which change nothing in them (a rerun with one of them keeps the finished parts).
    let shaping = (
        &a.model_name_or_path,
        &a.encoding,
        &a.data,
        a.nproc_per_node,
        a.encode_is_query,
        &a.encode_output_path,
        (a.dataset_number_of_shards, a.dataset_shard_index),
        &a.embedding_dtype,
        a.truncate_dim,
    );
    // And what the flags name: the data files and the model's (and adapter's) files, by size
    // and modification time, so that parts made before one of them changed are cleared
    // rather than merged with the new ones (resolving them here also names a missing model or
    // data once, before any process starts).
    let cache = a.encoding.cache_dir.as_deref();
    let tokenizer = a.encoding.tokenizer_name.as_deref();
    let model =
        tevatron_model::hub::resolve_model(&a.model_name_or_path, cache, tokenizer.is_none())?;
    let mut named = a.data.files().context("resolving the data")?;
    // The output, its temporary files and its parts may sit inside the model folder: they
    // are not the model.
    let own = |p: &Path| {
        let output_name = output.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        p.starts_with(&dir)
            || (p.parent() == output.parent()
                && matches!((name, output_name), (Some(n), Some(o)) if n.starts_with(&o)))
    };
    named.extend(model_files(&model).into_iter().filter(|p| !own(p)));
    if let Some(name) = tokenizer {
        named.extend(model_files(&tevatron_model::hub::resolve_model_tokenizer(name, cache)?));
    }
    if let Some(adapter) = &a.encoding.lora_name_or_path {
        named.extend(model_files(&tevatron_model::hub::resolve_adapter(adapter, cache)?));
    }
    let flags = format!("{}\n{shaping:?}\n{}", cwd.display(), file_stamps(&named));
    let stamp = dir.join(STAMP);
    if dir.exists() && !stamp.is_file() {
        bail!(
            "{} exists and is not a parts folder of this tool (it has no {STAMP}): remove it, or \
             give another --encode_output_path",
            dir.display()
        );
    }
    if dir.exists() && std::fs::read_to_string(&stamp).ok().as_deref() != Some(flags.as_str()) {
        tracing::info!("{} holds parts made with other flags: cleared", dir.display());
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(&stamp, &flags).with_context(|| format!("writing {}", stamp.display()))?;
    let paths: Vec<PathBuf> =
        (0..world).map(|rank| Part { rank, world, progress: false }.path(output)).collect();
    // What a stopped process left half-written (its temporary files) goes.
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path != stamp && !paths.contains(&path) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let missing: Vec<usize> = (0..world).filter(|&k| !paths[k].exists()).collect();
    if missing.len() < world {
        tracing::info!(
            "resuming: {} of {world} parts already written in {}",
            world - missing.len(),
            dir.display()
        );
    }
    if let Some(first) = missing.first() {
        let shows = first.to_string();
        launch::spawn_some_ranks(world, &missing, &[(PROGRESS_RANK, shows.as_str())])?;
    }
    let n = merge(&paths, output)?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    tracing::info!("wrote {n} embeddings from {world} processes to {}", output.display());
    Ok(())
}

/// Writes the rows of `parts`, in order, to `output` (the first part's width, dtype and
/// metadata, which every part must share); returns the rows written.
fn merge(parts: &[PathBuf], output: &Path) -> Result<usize> {
    let Some(first) = parts.first() else { bail!("no parts to merge") };
    let first = Vectors::open(first)?;
    let mut meta = first.metadata().clone();
    // The writer sets these itself.
    meta.remove("format");
    meta.remove("dtype");
    let mut writer = VectorWriter::create(output, first.dim(), first.dtype(), meta)?;
    let mut block = Vec::new();
    for path in parts {
        let part = Vectors::open(path)?;
        if part.dim() != first.dim()
            || part.dtype() != first.dtype()
            || part.metadata() != first.metadata()
        {
            bail!(
                "{}: {} dimensions in {:?} made with {:?}, where the first part has {} in {:?} made with {:?}; delete the parts folder and encode again",
                path.display(),
                part.dim(),
                part.dtype(),
                part.metadata(),
                first.dim(),
                first.dtype(),
                first.metadata()
            );
        }
        for start in (0..part.len()).step_by(MERGE_ROWS) {
            let end = (start + MERGE_ROWS).min(part.len());
            part.rows().to_f32(part.dim(), start, end, &mut block);
            let ids: Vec<&str> = (start..end).map(|i| part.ids().get(i)).collect();
            writer.push(&block, &ids)?;
        }
    }
    let n = writer.len();
    writer.finish()?;
    Ok(n)
}
