//! `tevatron index`: the int8 or binary codes of passage embeddings, one compact file per
//! shard, for `tevatron search --quantize` (the format is documented in `tevatron_ir::compact`),
//! or an HNSW graph per shard for `tevatron search --hnsw` (`tevatron_ir::hnsw`).

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use tevatron_ir::compact::{calibrate, compact_path, write};
use tevatron_ir::hnsw::{build, hnsw_paths, GraphDtype, HnswOptions};
use tevatron_ir::quantize::Precision;
use tevatron_ir::search::check_width;
use tevatron_ir::vectors::{expand_glob, Vectors};

use crate::args::IndexArgs;

pub fn run(a: &IndexArgs) -> Result<()> {
    let files = expand_glob(&a.passage_reps).context("resolving --passage_reps")?;
    let shards = files.iter().map(|f| Vectors::open(f)).collect::<Result<Vec<_>, _>>()?;
    let dim = shards[0].dim();
    for shard in &shards {
        check_width(shard, dim)?;
    }
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
    let outputs: Vec<_> = files
        .iter()
        .map(|f| match &kind {
            Ok(precision) => compact_path(&a.output_dir, f, *precision),
            Err(_) => hnsw_paths(&a.output_dir, f).1,
        })
        .collect();
    if outputs.iter().collect::<BTreeSet<_>>().len() != outputs.len() {
        bail!(
            "two --passage_reps files have the same name; their codes would overwrite each other"
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
            for (shard, out) in shards.iter().zip(&outputs) {
                write(out, shard, precision, &scales)?;
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
            if opts.connectivity < 2 || opts.expansion_add == 0 {
                bail!("--hnsw_m must be at least 2 and --hnsw_ef_construction at least 1");
            }
            tracing::info!("USearch kernels available: {}", tevatron_ir::hnsw::kernels());
            if opts.dtype == GraphDtype::I8 {
                warn_unless_unit_length(&shards);
            }
            for shard in &shards {
                let (graph, _) = build(&a.output_dir, shard, &opts)?;
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
