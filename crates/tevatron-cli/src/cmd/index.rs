//! `tevatron index`: the int8 or binary codes of passage embeddings, one compact file per
//! shard, for `tevatron search --quantize` (the format is documented in `tevatron_ir::compact`),
//! or an HNSW graph per shard for `tevatron search --hnsw` (`tevatron_ir::hnsw`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tevatron_ir::compact::{calibrate, compact_path, write};
use tevatron_ir::hnsw::{build, hnsw_paths, GraphDtype, HnswOptions};
use tevatron_ir::quantize::Precision;
use tevatron_ir::vectors::{expand_glob, glob_would_match, Vectors};

use crate::args::IndexArgs;

pub fn run(a: &IndexArgs) -> Result<()> {
    // The flags first: a mistake in them is named before any file is read.
    let defaults = HnswOptions::default();
    let kind = match (a.quantize, a.hnsw) {
        (Some(q), false) => {
            if a.hnsw_m.is_some() || a.hnsw_ef_construction.is_some() || a.hnsw_dtype.is_some() {
                bail!(
                    "--hnsw_m, --hnsw_ef_construction and --hnsw_dtype are read by --hnsw, not --quantize"
                );
            }
            Ok(Precision::from(q))
        }
        (None, true) => Err(HnswOptions {
            connectivity: a.hnsw_m.unwrap_or(defaults.connectivity),
            expansion_add: a.hnsw_ef_construction.unwrap_or(defaults.expansion_add),
            dtype: a.hnsw_dtype.map_or(defaults.dtype, Into::into),
            ..defaults
        }),
        _ => bail!("give one of --quantize int8|binary and --hnsw"),
    };
    if let Err(opts) = &kind {
        if opts.connectivity < 2 || opts.expansion_add == 0 {
            bail!("--hnsw_m must be at least 2 and --hnsw_ef_construction at least 1");
        }
    }
    let files = expand_glob(&a.passage_reps).context("resolving --passage_reps")?;
    let shards = files.iter().map(|f| Vectors::open(f)).collect::<Result<Vec<_>, _>>()?;
    let dim = shards[0].dim();
    for shard in &shards[1..] {
        if shard.dim() != dim {
            bail!(
                "{} holds vectors of {} dimensions where {} holds {dim}: the shards of a corpus \
                 must have one width",
                shard.path().display(),
                shard.dim(),
                shards[0].path().display()
            );
        }
    }
    // Each shard's outputs: the compact file, or the graph's description and graph.
    let outputs: Vec<Vec<PathBuf>> = files
        .iter()
        .map(|f| match &kind {
            Ok(precision) => vec![compact_path(&a.output_dir, f, *precision)],
            Err(_) => {
                let (graph, description) = hnsw_paths(&a.output_dir, f);
                vec![description, graph]
            }
        })
        .collect();
    for (i, later) in outputs.iter().enumerate() {
        if let Some(j) = outputs[..i].iter().position(|earlier| earlier[0] == later[0]) {
            bail!(
                "--passage_reps {} and {} have the same name: their outputs ({}) would overwrite \
                 each other",
                files[j].display(),
                files[i].display(),
                later[0].display()
            );
        }
    }
    if let Some(out) = outputs.iter().flatten().find(|o| glob_would_match(&a.passage_reps, o)) {
        bail!(
            "{} would match --passage_reps {:?}: the next search or index would read it as a \
             shard of passages; give another --output_dir",
            out.display(),
            a.passage_reps
        );
    }
    std::fs::create_dir_all(&a.output_dir)
        .with_context(|| format!("creating {}", a.output_dir.display()))?;
    let start = std::time::Instant::now();
    match kind {
        Ok(precision) => {
            // One calibration over every shard, so the whole corpus is quantized alike.
            let scales = match precision {
                Precision::Int8 => calibrate(&shards)?,
                Precision::Binary => Vec::new(),
            };
            for (i, (shard, out)) in shards.iter().zip(&outputs).enumerate() {
                let out = &out[0];
                write(out, shard, precision, &scales)
                    .map_err(|e| remove_written(&outputs[..=i], e.into()))?;
                tracing::info!(
                    "{} codes of {} ({} x {dim}) written to {}",
                    precision.name(),
                    shard.path().display(),
                    shard.len(),
                    out.display()
                );
            }
        }
        Err(opts) => {
            tracing::info!("USearch kernels available: {}", tevatron_ir::hnsw::kernels());
            if opts.dtype == GraphDtype::I8 {
                warn_unless_unit_length(&shards);
            }
            for (i, shard) in shards.iter().enumerate() {
                let (graph, _) = build(&a.output_dir, shard, &opts)
                    .map_err(|e| remove_written(&outputs[..=i], e.into()))?;
                tracing::info!(
                    "HNSW graph of {} ({} x {dim}, M {}, ef_construction {}, {} vectors) written to {}",
                    shard.path().display(),
                    shard.len(),
                    opts.connectivity,
                    opts.expansion_add,
                    opts.dtype.name(),
                    graph.display()
                );
            }
        }
    }
    tracing::info!("indexed {} shard(s) in {:.2}s", shards.len(), start.elapsed().as_secs_f64());
    Ok(())
}

/// A shard that fails (a NaN row, a full disk): the outputs of the shards before it and its
/// own (a graph renamed into place before its description failed, or an earlier run's file)
/// are removed, so that a failed run leaves no set that looks whole but is not (int8 codes
/// also share one calibration over every shard).
fn remove_written(written: &[Vec<PathBuf>], e: anyhow::Error) -> anyhow::Error {
    let mut removed = 0;
    for path in written.iter().flatten() {
        removed += usize::from(std::fs::remove_file(path).is_ok());
    }
    if removed > 0 {
        tracing::warn!("removed {removed} file(s) of the shards up to the one that failed");
    }
    e
}

/// An i8 graph ranks by cosine (USearch scales each vector to unit length before rounding), so
/// for vectors that are not unit length its candidates follow another order than the inner
/// product the rescoring restores: said in the log, from the first rows of each shard.
fn warn_unless_unit_length(shards: &[Vectors]) {
    let mut scratch = Vec::new();
    for shard in shards {
        let (dim, rows) = (shard.dim(), shard.len().min(1000));
        let block = shard.rows().block(dim, 0, rows, &mut scratch);
        let off = block.chunks_exact(dim.max(1)).enumerate().find_map(|(row, v)| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            ((norm - 1.0).abs() > 1e-2).then_some((row, norm))
        });
        if let Some((row, norm)) = off {
            tracing::warn!(
                "--hnsw_dtype i8 ranks candidates by cosine, and {} is not unit length (row {row} \
                 has norm {norm:.4}): the graph proposes by cosine, the rescoring then ranks by \
                 inner product; f32 or bf16 keep the inner product",
                shard.path().display()
            );
        }
    }
}
