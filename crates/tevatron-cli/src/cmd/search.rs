//! `tevatron search`: exact inner-product top-k of query embeddings over memory-mapped passage
//! shards (or, with `--quantize`, a scan of their compact codes rescored exactly), written as
//! Tevatron's TSV or a safetensors file.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

use tevatron_ir::compact::compact_path;
use tevatron_ir::compact::{search_compact, CompactShard, ScanReport};
use tevatron_ir::hnsw::{hnsw_paths, search_hnsw, HnswOptions, HnswShard};
use tevatron_ir::quantize::{Kernels, Precision};
use tevatron_ir::search::{
    check_dims, check_queries, merge_shards, pass_for, queries_per_batch, search_shard, Ranking,
};
use tevatron_ir::trec::{write_run, RunFormat};
use tevatron_ir::vectors::{expand_glob, Ids, Vectors};

use crate::args::{QuantizeArg, SearchArgs};

pub fn run(a: &SearchArgs) -> Result<()> {
    crate::tune_allocator_for_search();
    if a.depth == 0 {
        bail!("--depth must be at least 1");
    }
    let queries = Vectors::open(&a.query_reps).context("reading --query_reps")?;
    let queries = match a.truncate_dim {
        None => queries,
        Some(k) => {
            let trained = queries
                .metadata()
                .get("matryoshka_dims")
                .map(|d| d.split(',').filter_map(|x| x.parse().ok()).collect::<Vec<usize>>());
            // Cut first, and check the passages' width, so that a width the vectors cannot take
            // is an error without a warning about the model before it.
            let cut = queries.truncated(k, normalized(&queries)).context("--truncate_dim")?;
            // The widest vectors cut: queries encoded at the width already may meet wider
            // passages, and the warning is about those.
            let mut widest = queries.dim();
            for file in expand_glob(&a.passage_reps).context("resolving --passage_reps")? {
                let shard = Vectors::open(&file)?;
                if shard.dim() < k {
                    bail!(
                        "{}: cannot be cut to {k} dimensions: its vectors have {}",
                        file.display(),
                        shard.dim()
                    );
                }
                if a.compact_reps.is_some() && shard.dim() != k {
                    bail!(
                        "--compact_reps were made from the full vectors of {} ({} dimensions): \
                         for --truncate_dim {k}, encode with --truncate_dim and run tevatron \
                         index on those vectors",
                        file.display(),
                        shard.dim()
                    );
                }
                widest = widest.max(shard.dim());
            }
            let what = match queries.metadata().get("model") {
                Some(model) => format!("the model {model:?}"),
                None => format!("the model of {} (the file names none)", a.query_reps.display()),
            };
            super::warn_untrained_width(k, widest, trained.as_deref(), &what);
            cut
        }
    };
    let q = check_queries(&queries)?;
    check_query_ids(&queries, a.save_text)?;
    let files = expand_glob(&a.passage_reps).context("resolving --passage_reps")?;
    let inputs: Vec<std::path::PathBuf> =
        std::iter::once(a.query_reps.clone()).chain(files.iter().cloned()).collect();
    tevatron_ir::atomic::refuse_input_as_output(&a.save_ranking_to, &inputs, "--save_ranking_to")?;
    let batch = if a.batch_size <= 0 { 0 } else { a.batch_size as usize };
    let dim = queries.dim();
    let compact = compact_plan(a, &files)?;
    let device = if compact.is_some() { Device::Cpu } else { search_device(a)? };
    let index_dtype = if a.gpu_float32 { DType::F32 } else { DType::F16 };
    let nq = queries.len();
    let depth = a.depth;
    let kernels = Kernels::from_env()?;
    if compact.as_ref().is_none_or(|p| p.hnsw.is_some())
        && std::env::var_os("TEVATRON_KERNELS").is_some_and(|k| !k.is_empty())
    {
        tracing::info!(
            "TEVATRON_KERNELS changes nothing here: it picks the kernels of --quantize scans"
        );
    }
    if compact.is_none() && matches!(device, Device::Cpu) {
        let (per_batch, per_pass) = (queries_per_batch(batch, nq), pass_for(batch, nq, depth));
        if per_pass > per_batch {
            tracing::info!(
                "scoring at least {per_pass} queries per pass over the corpus (--batch_size {} \
                 widened: their top-{depth} buffers fit in 256 MiB; the results are the same)",
                a.batch_size
            );
        }
    }
    // The last shard's scan report, with its HNSW graph's vector dtype when one was searched.
    let reported = std::cell::Cell::new(None);
    // Queries scanned again over all shards (a compact scan's sampled floor too high).
    let rescanned = std::cell::Cell::new(0usize);
    let search = |shard: &Vectors| {
        let cut;
        let shard = match a.truncate_dim {
            Some(k) if shard.dim() != k => {
                cut = shard.truncated(k, normalized(shard))?;
                &cut
            }
            _ => shard,
        };
        check_dims(&queries, shard)?;
        if let Some(plan) = &compact {
            if let Some(ef) = plan.hnsw {
                let graph = plan.graph_for(shard, ef)?;
                let (hits, candidates) =
                    search_hnsw(&q, dim, &graph, shard, depth, rescore_multiplier(a))?;
                let report = ScanReport { candidates, kernels, rescanned: 0 };
                reported.set(Some((report, Some(graph.dtype()))));
                return Ok(hits);
            }
            let codes = plan.codes_for(shard)?;
            let (hits, report) = search_compact(
                &q,
                dim,
                &codes,
                shard,
                depth,
                batch,
                rescore_multiplier(a),
                kernels,
            )?;
            reported.set(Some((report, None)));
            rescanned.set(rescanned.get() + report.rescanned);
            return Ok(hits);
        }
        match &device {
            Device::Cpu => search_shard(&q, dim, shard, depth, batch),
            gpu => tevatron_model::device_search::search_shard_on(
                gpu,
                index_dtype,
                &q,
                dim,
                shard,
                depth,
                batch,
            ),
        }
    };
    let start = std::time::Instant::now();
    let ranking = if a.shard_search {
        merge_shards(nq, files.iter().map(|f| Vectors::open(f)), depth, search)?
    } else {
        // Open and validate every shard before any work.
        let shards = files.iter().map(|f| Vectors::open(f)).collect::<Result<Vec<_>, _>>()?;
        for shard in &shards {
            match a.truncate_dim {
                // Cut when searched.
                Some(k) if shard.dim() >= k => {}
                Some(k) => bail!(
                    "{}: cannot be cut to {k} dimensions: its vectors have {}",
                    shard.path().display(),
                    shard.dim()
                ),
                None => check_dims(&queries, shard)?,
            }
        }
        merge_shards(nq, shards.iter().map(Ok), depth, search)?
    };
    if let Some((report, graph_dtype)) = reported.get() {
        let scanned = match (compact.as_ref(), graph_dtype) {
            (_, Some(dtype)) => format!("searched the HNSW graphs ({} vectors)", dtype.name()),
            (Some(p), None) => {
                format!(
                    "scanned {} codes with the {} kernels",
                    p.precision.name(),
                    report.kernels.name_for(p.precision)
                )
            }
            (None, None) => String::new(),
        };
        tracing::info!(
            "{scanned}; rescored {} candidates per query (last shard) with the full-precision vectors",
            report.candidates
        );
        if rescanned.get() > 0 {
            tracing::info!(
                "{} query scans of a shard started from a floor sampled from the codes that \
                 proved too high, and were run again without one (the same results; frequent \
                 when a query's best rows cluster in the corpus order)",
                rescanned.get()
            );
        }
    }
    if !a.quiet {
        tracing::info!(
            "searched {} queries over {} shard(s) in {:.2}s",
            queries.len(),
            files.len(),
            start.elapsed().as_secs_f64()
        );
    }
    check_ranking(queries.ids(), &ranking, &files)?;
    if ranking.hits.iter().all(Vec::is_empty) {
        tracing::warn!("{} hold no passage: every query's ranking is empty", a.passage_reps);
    }
    if a.save_text {
        let ranking = &ranking;
        let rows = queries.ids().iter().zip(&ranking.hits).flat_map(|(qid, hs)| {
            hs.iter().map(move |h| (qid, ranking.docid(h), format!("{:?}", h.score)))
        });
        write_run(&a.save_ranking_to, rows, RunFormat::Tsv, false)?;
    } else {
        write_safetensors(a, queries.ids(), &ranking)?;
    }
    Ok(())
}

/// Checks the query ids before any search. For a text run (`--save_text`): refuses an id
/// given to two rows (their rankings would be written under one id, which evaluation and
/// fusion read as one query with every hit twice) and an id that is empty or holds whitespace
/// (the run's readers split columns on it), so that a long search does not fail when it
/// writes. A safetensors ranking keeps its queries by row, so a repeated id is only warned
/// about there.
fn check_query_ids(queries: &Vectors, text_run: bool) -> Result<()> {
    let mut seen = std::collections::HashMap::with_capacity(queries.len());
    let file = queries.path().display();
    for (row, id) in queries.ids().iter().enumerate() {
        if text_run && !tevatron_ir::trec::fits_a_run(id) {
            bail!(
                "{file}: query id {id:?} (row {row}) is empty or holds whitespace, which a \
                 text run cannot carry (its readers split columns on whitespace): rename the \
                 ids, or keep the ranking in safetensors (no --save_text)"
            );
        }
        if let Some(first) = seen.insert(id, row) {
            if text_run {
                bail!(
                    "{file}: query id {id:?} is given to rows {first} and {row}: a text run's \
                     query ids must be unique"
                );
            }
            tracing::warn!(
                "{file}: query id {id:?} is given to rows {first} and {row} (the ranking keeps \
                 them apart by row; a text run of it would merge them)"
            );
            return Ok(());
        }
    }
    Ok(())
}

/// Refuses a ranking that names a document twice for one query (a docid given to two rows of
/// the corpus: evaluation would count it twice) or holds a score that is not finite (vectors
/// whose products overflow F32), naming the query, the document and the files.
fn check_ranking(qids: &Ids, ranking: &Ranking, files: &[PathBuf]) -> Result<()> {
    use rayon::prelude::*;
    let file = |shard: u32| files.get(shard as usize).map_or(Path::new("?"), PathBuf::as_path);
    ranking.hits.par_iter().enumerate().try_for_each(|(q, hits)| {
        // FxHash: SipHash here was about 2% of a compact search's samples at 1M rows.
        let mut seen = tevatron_ir::fxhash::FxHashMap::default();
        seen.reserve(hits.len());
        for h in hits {
            let docid = ranking.docid(h);
            if !h.score.is_finite() {
                bail!(
                    "query {:?}: its score with {docid:?} ({} row {}) is {}: the vectors' products \
                     overflow F32",
                    qids.get(q),
                    file(h.shard).display(),
                    h.row,
                    h.score
                );
            }
            if let Some(first) = seen.insert(docid, h) {
                bail!(
                    "docid {docid:?} is given to two passages ({} row {} and {} row {}), both \
                     retrieved for query {:?}: a corpus's docids must be unique",
                    file(first.shard).display(),
                    first.row,
                    file(h.shard).display(),
                    h.row,
                    qids.get(q)
                );
            }
        }
        Ok(())
    })
}

/// What `--quantize` or `--hnsw` searches: each shard's codes or graph from `--compact_reps`
/// (paired with the passage files by the name `tevatron index` gives them, each checked
/// against its shard's fingerprint), or codes built in memory.
struct CompactPlan {
    precision: Precision,
    /// `--hnsw_ef_search` when the files are HNSW graphs.
    hnsw: Option<usize>,
    files: Option<Vec<(PathBuf, PathBuf)>>,
}

impl CompactPlan {
    /// The `--compact_reps` file paired with `shard`.
    fn file_for(files: &[(PathBuf, PathBuf)], shard: &Vectors) -> tevatron_ir::Result<PathBuf> {
        match files.iter().find(|(p, _)| p == shard.path()) {
            Some((_, path)) => Ok(path.clone()),
            None => Err(tevatron_ir::Error::Invalid(format!(
                "no --compact_reps file for {}",
                shard.path().display()
            ))),
        }
    }

    fn graph_for(&self, shard: &Vectors, ef: usize) -> tevatron_ir::Result<HnswShard> {
        let path = Self::file_for(self.files.as_deref().unwrap_or_default(), shard)?;
        HnswShard::open(&path, shard, ef)
    }

    fn codes_for(&self, shard: &Vectors) -> tevatron_ir::Result<CompactShard> {
        let Some(files) = &self.files else {
            return CompactShard::build(shard, self.precision, None);
        };
        let path = Self::file_for(files, shard)?;
        let codes = CompactShard::open(&path, shard)?;
        if codes.precision() != self.precision {
            return Err(tevatron_ir::Error::Embeddings {
                path,
                what: format!(
                    "holds {} codes, not the {} of --quantize",
                    codes.precision().name(),
                    self.precision.name()
                ),
            });
        }
        Ok(codes)
    }
}

fn compact_plan(a: &SearchArgs, passages: &[PathBuf]) -> Result<Option<CompactPlan>> {
    if a.hnsw && a.quantize.is_some() {
        bail!("--hnsw and --quantize are two different searches: give one");
    }
    if a.hnsw && a.compact_reps.is_none() {
        bail!("--hnsw reads the graphs of tevatron index --hnsw: name their .hnsw.json files with --compact_reps");
    }
    if a.hnsw_ef_search == Some(0) {
        bail!("--hnsw_ef_search must be at least 1");
    }
    if a.hnsw && a.batch_size != 128 {
        // 128 is the default; any other value was given.
        tracing::info!(
            "--batch_size {} changes nothing with --hnsw: each query walks the graph alone",
            a.batch_size
        );
    }
    if !a.hnsw && a.hnsw_ef_search.is_some() {
        bail!("--hnsw_ef_search is read by --hnsw, which is not given");
    }
    let quantize = match a.quantize {
        Some(q) => q,
        None if a.hnsw => QuantizeArg::Int8, // unused: the graphs hold F32 vectors
        None => {
            for (given, flag) in [
                (a.compact_reps.is_some(), "--compact_reps"),
                (a.rescore_multiplier.is_some(), "--rescore_multiplier"),
            ] {
                if given {
                    bail!("{flag} is read by --quantize int8|binary or --hnsw, neither of which is given");
                }
            }
            return Ok(None);
        }
    };
    let multiplier = rescore_multiplier(a);
    if !(multiplier >= 1.0 && multiplier.is_finite()) {
        bail!("--rescore_multiplier must be a number of at least 1, not {multiplier}");
    }
    if a.device.as_deref().is_some_and(|d| d != "cpu") {
        bail!(
            "--quantize and --hnsw search on the CPU; --device {} cannot be used with them",
            a.device.as_deref().unwrap_or("")
        );
    }
    if a.gpu_float32 {
        tracing::info!("--gpu_float32 has no effect: --quantize and --hnsw search on the CPU");
    }
    let files = match &a.compact_reps {
        None => {
            tracing::info!(
                "quantizing the passages in memory (tevatron index writes the codes once for every search)"
            );
            None
        }
        Some(glob) => {
            let codes = expand_glob(glob).context("resolving --compact_reps")?;
            let mut pairs = Vec::new();
            for p in passages {
                let want = if a.hnsw {
                    hnsw_paths(Path::new(""), p).1
                } else {
                    compact_path(Path::new(""), p, quantize.into())
                };
                let Some(c) = codes.iter().find(|c| c.file_name() == want.file_name()) else {
                    bail!(
                        "--compact_reps has no {} for {} (tevatron index names each shard's output so)",
                        want.display(),
                        p.display()
                    );
                };
                pairs.push((p.clone(), c.clone()));
            }
            if codes.len() != passages.len() {
                let unpaired: Vec<String> = codes
                    .iter()
                    .filter(|c| !pairs.iter().any(|(_, paired)| paired == *c))
                    .map(|c| c.display().to_string())
                    .collect();
                bail!(
                    "--compact_reps names {} file(s) for {} --passage_reps shard(s): {} belong \
                     to no shard given",
                    codes.len(),
                    passages.len(),
                    unpaired.join(", ")
                );
            }
            Some(pairs)
        }
    };
    Ok(Some(CompactPlan {
        precision: quantize.into(),
        hnsw: a.hnsw.then_some(a.hnsw_ef_search.unwrap_or(HnswOptions::default().expansion_search)),
        files,
    }))
}

/// `--rescore_multiplier`, 4 when not given (sentence-transformers' default).
fn rescore_multiplier(a: &SearchArgs) -> f64 {
    a.rescore_multiplier.unwrap_or(4.0)
}

/// Whether an embeddings file says its model normalises (so that a cut is re-normalised).
fn normalized(v: &Vectors) -> bool {
    v.metadata().get("normalize").is_some_and(|n| n == "true")
}

/// The CPU with `--cpu_search`, else `--device` (default: a GPU when there is one).
fn search_device(a: &SearchArgs) -> Result<Device> {
    if a.cpu_search {
        if a.device.as_deref().is_some_and(|d| d != "cpu") {
            bail!(
                "--cpu_search and --device {} contradict each other",
                a.device.as_deref().unwrap_or("")
            );
        }
        return Ok(Device::Cpu);
    }
    let device = tevatron_model::device::select(a.device.as_deref())?;
    if !device.is_cpu() {
        let index = if a.gpu_float32 { "f32" } else { "f16" };
        tracing::info!("searching on {:?} with an {index} index", device.location());
    } else if a.gpu_float32 {
        tracing::info!("--gpu_float32 has no effect: searching on the CPU in f32");
    }
    Ok(device)
}

/// `scores` `[Q, k]` F32, `docids` and `query_ids` as `\n`-joined UTF-8 (U8), k = min(depth, N).
fn write_safetensors(a: &SearchArgs, qids: &Ids, ranking: &Ranking) -> Result<()> {
    let bytes = ranking_bytes(qids, ranking)?;
    let mut out = tevatron_ir::atomic::AtomicFile::create(&a.save_ranking_to)?;
    std::io::Write::write_all(&mut out, &bytes).map_err(|e| out.err(e))?;
    out.commit()?;
    Ok(())
}

/// The ranking as a safetensors file: `scores` (F32, queries x depth), `docids` and
/// `query_ids` (newline-joined UTF-8), `__metadata__` naming the format and depth. The header
/// is written here, its keys in a fixed order, so that the same ranking gives the same bytes
/// (the `safetensors` crate writes its metadata from a `HashMap`, whose order changed from
/// run to run); serde_json sorts its keys.
fn ranking_bytes(qids: &Ids, ranking: &Ranking) -> Result<Vec<u8>> {
    let hits = &ranking.hits;
    let k = hits.iter().map(Vec::len).max().unwrap_or(0);
    // `scores` is a matrix: every query needs the same number of hits (an HNSW graph can
    // return fewer for some).
    if let Some((qid, hs)) = qids.iter().zip(hits).find(|(_, hs)| hs.len() != k) {
        bail!(
            "query {qid:?} has {} hits where others have {k}: the safetensors ranking holds the \
             same number for every query; write a text run with --save_text",
            hs.len()
        );
    }
    let mut scores = Vec::with_capacity(qids.len() * k * 4);
    let mut docids = Vec::new();
    for hs in hits {
        for (i, h) in hs.iter().enumerate() {
            scores.extend_from_slice(&h.score.to_le_bytes());
            if !docids.is_empty() || i > 0 {
                docids.push(b'\n');
            }
            docids.extend_from_slice(ranking.docid(h).as_bytes());
        }
    }
    let qbytes = qids.iter().collect::<Vec<_>>().join("\n").into_bytes();
    let (s, d) = (scores.len(), docids.len());
    let header = serde_json::json!({
        "__metadata__": {"depth": k.to_string(), "format": "tevatron-ranking-v1"},
        "scores": {"dtype": "F32", "shape": [qids.len(), k], "data_offsets": [0, s]},
        "docids": {"dtype": "U8", "shape": [d], "data_offsets": [s, s + d]},
        "query_ids": {"dtype": "U8", "shape": [qbytes.len()], "data_offsets": [s + d, s + d + qbytes.len()]},
    });
    let mut text = header.to_string();
    // Padded with spaces to a multiple of 8, so that the scores start aligned.
    text.extend(std::iter::repeat_n(' ', (8 - text.len() % 8) % 8));
    let mut bytes = Vec::with_capacity(8 + text.len() + s + d + qbytes.len());
    bytes.extend_from_slice(&(text.len() as u64).to_le_bytes());
    bytes.extend_from_slice(text.as_bytes());
    bytes.extend_from_slice(&scores);
    bytes.extend_from_slice(&docids);
    bytes.extend_from_slice(&qbytes);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tevatron_ir::vectors::{VecDType, VectorWriter};

    fn vectors(dir: &Path, name: &str, ids: &[&str]) -> Vectors {
        let path = dir.join(name);
        let mut w = VectorWriter::create(&path, 2, VecDType::F32, Default::default()).unwrap();
        w.push(&vec![0.5; 2 * ids.len()], ids).unwrap();
        w.finish().unwrap();
        Vectors::open(&path).unwrap()
    }

    /// A ranking whose queries have different numbers of hits cannot be the safetensors
    /// matrix: a clear error naming the query, not a file no reader accepts.
    #[test]
    fn uneven_hits_are_refused_by_the_safetensors_ranking() {
        let dir = tempfile::tempdir().unwrap();
        let (shard, queries) =
            (vectors(dir.path(), "c", &["d0", "d1"]), vectors(dir.path(), "q", &["q0", "q1"]));
        let rank = |hits: Vec<Vec<(f32, u32)>>| {
            merge_shards(2, [Ok(&shard)], 2, |_| Ok(hits.clone())).unwrap()
        };
        let even = rank(vec![vec![(1.0, 0), (0.5, 1)], vec![(0.7, 1), (0.2, 0)]]);
        let bytes = ranking_bytes(queries.ids(), &even).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("scores").unwrap().shape(), [2, 2]);
        assert_eq!(st.tensor("docids").unwrap().data(), b"d0\nd1\nd1\nd0");
        assert_eq!(st.tensor("query_ids").unwrap().data(), b"q0\nq1");
        let uneven = rank(vec![vec![(1.0, 0), (0.5, 1)], vec![(0.7, 1)]]);
        let err = ranking_bytes(queries.ids(), &uneven).unwrap_err().to_string();
        assert!(err.contains("query \"q1\" has 1 hits where others have 2"), "{err}");
    }
}
