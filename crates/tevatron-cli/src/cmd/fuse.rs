//! `tevatron fuse`: several runs of the same queries fused into one (`tevatron_ir::fusion`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tevatron_ir::fusion::{fuse, Method, Normalization};
use tevatron_ir::trec::{write_run, Run, RunFormat};

use crate::args::{FuseArgs, FuseMethod, FuseNormalization};

pub fn run(a: &FuseArgs) -> Result<()> {
    let method = method(a)?;
    if a.depth == 0 || a.k == 0 {
        bail!("--depth and --k must be at least 1");
    }
    let mut runs = Vec::with_capacity(a.runs.len());
    for path in &a.runs {
        runs.push(Run::read(path).with_context(|| format!("reading --runs {}", path.display()))?);
    }
    let named: Vec<(&Path, &Run)> = a.runs.iter().map(PathBuf::as_path).zip(&runs).collect();
    let (fused, coverage) = fuse(&named, &method, a.depth, a.k)?;
    if coverage.partial > 0 {
        tracing::warn!(
            "{} of {} queries are missing from some runs; each is fused from the runs that have it",
            coverage.partial,
            coverage.queries
        );
    }
    write_run(
        &a.output,
        fused.iter().flat_map(|(q, docs)| {
            docs.iter().map(move |(d, s)| (q.as_str(), d.as_str(), s.to_string()))
        }),
        RunFormat::Tsv,
        false,
    )?;
    tracing::info!(
        "fused {} runs by {} into {} ({} queries, each run read to depth {}, at most {} documents each)",
        runs.len(),
        describe(&method),
        a.output.display(),
        coverage.queries,
        a.depth,
        a.k
    );
    Ok(())
}

/// The fusion the flags ask for; a flag of the other method is refused, not ignored.
fn method(a: &FuseArgs) -> Result<Method> {
    Ok(match a.method {
        FuseMethod::Rrf => {
            if !a.weights.is_empty() || a.normalization.is_some() {
                bail!(
                    "--weights and --normalization apply to --method wsum; reciprocal rank \
                     fusion uses ranks only"
                );
            }
            Method::Rrf { k: a.rrf_k.unwrap_or(60.0) }
        }
        FuseMethod::Wsum => {
            if a.rrf_k.is_some() {
                bail!("--rrf_k applies to --method rrf");
            }
            let weights = if a.weights.is_empty() {
                vec![1.0 / a.runs.len() as f64; a.runs.len()]
            } else {
                a.weights.clone()
            };
            let normalization = match a.normalization.unwrap_or(FuseNormalization::MinMax) {
                FuseNormalization::MinMax => Normalization::MinMax,
                FuseNormalization::Zmuv => Normalization::Zmuv,
                FuseNormalization::None => Normalization::None,
            };
            Method::WeightedSum { weights, normalization }
        }
    })
}

/// The method in words, for the log.
fn describe(method: &Method) -> String {
    match method {
        Method::Rrf { k } => format!("reciprocal rank fusion (k {k})"),
        Method::WeightedSum { weights, normalization } => {
            format!("a weighted sum (weights {weights:?}) of {normalization:?}-normalised scores")
        }
    }
}
