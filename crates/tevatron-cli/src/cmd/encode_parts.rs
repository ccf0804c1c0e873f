//! `tevatron encode --nproc_per_node N`: one command encodes its input (or its
//! `--dataset_shard_index` shard) in N processes, ranks of this binary started as torchrun
//! starts them (`launch`), spread over the visible GPUs. Rank k encodes the k-th of N
//! contiguous parts into `<output>.parts/part-<k>-of-<N>.safetensors`, written whole under a
//! temporary name and renamed, so a part that exists is complete. The launching process then
//! merges the parts in order into the output (the rows of one process's run, in the same order)
//! and removes them. A rerun after a crash starts only the ranks whose part is missing, when the
//! parts were made by the same command line (`command.json` in the folder); parts of another
//! command are cleared first.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tevatron_ir::records::shard_range;
use tevatron_ir::vectors::{VectorWriter, Vectors};

use crate::args::EncodeArgs;
use crate::launch;

/// Rows merged per block (bounded memory on any corpus).
const MERGE_ROWS: usize = 4096;

/// The part of a multi-process encode this process makes: rank `rank` of `world`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Part {
    rank: usize,
    world: usize,
}

impl Part {
    /// This process's part, when `encode --nproc_per_node` started it for one.
    pub(super) fn of_this_process() -> Result<Option<Self>> {
        if !launch::is_launched_rank() {
            return Ok(None);
        }
        let var = |k: &str| -> Result<usize> {
            let v = std::env::var(k).with_context(|| format!("{k} is not set"))?;
            v.trim().parse().with_context(|| format!("{k}={v:?} is not a number"))
        };
        let (rank, world) = (var("RANK")?, var("WORLD_SIZE")?);
        if rank >= world {
            bail!("RANK {rank} is not below WORLD_SIZE {world}");
        }
        Ok(Some(Self { rank, world }))
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
    /// and GPUs are visible, else the device given.
    pub(super) fn device(self, spec: Option<&str>) -> Option<String> {
        let gpus = tevatron_model::device::gpu_count();
        match spec {
            None | Some("cuda") | Some("gpu") if gpus > 0 => {
                Some(format!("cuda:{}", self.rank % gpus))
            }
            other => other.map(str::to_string),
        }
    }

    /// Whether this part's process shows progress (the first one only: the others' bars would
    /// overwrite it).
    pub(super) fn shows_progress(self) -> bool {
        self.rank == 0
    }
}

/// `<output>.parts` beside the output.
fn parts_dir(output: &Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".parts");
    output.with_file_name(name)
}

/// Encodes `a`'s input in `a.nproc_per_node` processes, then merges their parts into
/// `--encode_output_path`.
pub(super) fn run(a: &EncodeArgs) -> Result<()> {
    let (world, output) = (a.nproc_per_node, &a.encode_output_path);
    let dir = parts_dir(output);
    let command = serde_json::to_string(
        &std::env::args_os().skip(1).map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>(),
    )?;
    let stamp = dir.join("command.json");
    if dir.exists() && std::fs::read_to_string(&stamp).ok().as_deref() != Some(command.as_str()) {
        tracing::info!("{} holds the parts of another command: cleared", dir.display());
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(&stamp, &command).with_context(|| format!("writing {}", stamp.display()))?;
    let parts: Vec<Part> = (0..world).map(|rank| Part { rank, world }).collect();
    let missing: Vec<usize> =
        parts.iter().filter(|p| !p.path(output).exists()).map(|p| p.rank).collect();
    if missing.len() < world {
        tracing::info!(
            "resuming: {} of {world} parts already written in {}",
            world - missing.len(),
            dir.display()
        );
    }
    if !missing.is_empty() {
        launch::spawn_some_ranks(world, &missing)?;
    }
    let paths: Vec<PathBuf> = parts.iter().map(|p| p.path(output)).collect();
    let n = merge(&paths, output)?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    tracing::info!("wrote {n} embeddings from {world} processes to {}", output.display());
    Ok(())
}

/// Writes the rows of `parts`, in order, to `output` (the first part's width, dtype and
/// metadata); returns the rows written.
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
        if part.dim() != first.dim() || part.dtype() != first.dtype() {
            bail!(
                "{}: {} dimensions in {:?}, where the first part has {} in {:?}",
                path.display(),
                part.dim(),
                part.dtype(),
                first.dim(),
                first.dtype()
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
