//! `tevatron index`: the int8 or binary codes of passage embeddings, one compact file per
//! shard, for `tevatron search --quantize` (the format is documented in `tevatron_ir::compact`).

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use tevatron_ir::compact::{calibrate, compact_path, write};
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
    let precision = Precision::from(a.quantize);
    let outputs: Vec<_> = files.iter().map(|f| compact_path(&a.output_dir, f, precision)).collect();
    if outputs.iter().collect::<BTreeSet<_>>().len() != outputs.len() {
        bail!(
            "two --passage_reps files have the same name; their codes would overwrite each other"
        );
    }
    std::fs::create_dir_all(&a.output_dir)
        .with_context(|| format!("creating {}", a.output_dir.display()))?;
    let start = std::time::Instant::now();
    // One calibration over every shard, so the whole corpus is quantized alike.
    let scales = match precision {
        Precision::Int8 => calibrate(&shards)?,
        Precision::Binary => Vec::new(),
    };
    for (shard, out) in shards.iter().zip(&outputs) {
        write(out, shard, precision, &scales)?;
        tracing::info!(
            "{} codes of {} ({} x {}) written to {}",
            precision.name(),
            shard.path().display(),
            shard.len(),
            dim,
            out.display()
        );
    }
    tracing::info!("indexed {} shard(s) in {:.2}s", shards.len(), start.elapsed().as_secs_f64());
    Ok(())
}
