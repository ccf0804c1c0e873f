//! An approximate index for corpora where even a scan of compact codes is too slow: an HNSW
//! graph per shard, built with Unum's USearch (a maintained C++ library used by ClickHouse and
//! DuckDB, bound through `cxx`; its distance kernels are chosen at run time by CPU feature),
//! saved to disk and memory-mapped for search. The graph proposes `depth x multiplier`
//! candidates per query, which are rescored exactly with the shard's full-precision vectors,
//! as in [`crate::compact`].
//!
//! Files, per shard: `<stem>.hnsw.usearch` (USearch's own format, inner-product metric, the
//! row number as key) and `<stem>.hnsw.json`, which says what it is: `format`
//! (`tevatron-hnsw-v1`), the graph's settings and the scalars of its copy of the vectors
//! (`dtype`), the USearch version, the byte size of the graph file and the fingerprint of the
//! vectors it was built from, and a checksum of the graph file. The size and the checksum are
//! checked before the graph is mapped, so a truncated or damaged graph is an error, not a
//! crash: USearch follows the file's links as they are, and a garbled link made it read out of
//! bounds.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::compact::{fingerprint, rescore_candidates, shard_stem, QueryHits};
use crate::search::{check_finite, check_query_rows, check_width};
use crate::vectors::Vectors;
use crate::{Error, Result};

/// The `format` the description file names; any other is refused.
pub const FORMAT: &str = "tevatron-hnsw-v1";

/// How the graph is built and searched (HNSW's `M`, `ef_construction` and `ef_search`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HnswOptions {
    /// Neighbours kept per node (`M`): more is better recall, more memory and a slower build.
    pub connectivity: usize,
    /// Candidates examined while inserting (`ef_construction`).
    pub expansion_add: usize,
    /// Candidates examined per query (`ef_search`); raised to the candidates wanted when lower.
    pub expansion_search: usize,
    /// How the graph stores its copy of the vectors.
    pub dtype: GraphDtype,
}

impl Default for HnswOptions {
    fn default() -> Self {
        Self { connectivity: 32, expansion_add: 128, expansion_search: 128, dtype: GraphDtype::F32 }
    }
}

/// The scalars of the graph's own copy of the vectors (USearch's scalar kind), which its
/// distances are computed on while building and searching: F32 as given, or rounded to bf16 or
/// f16 (half the bytes, a graph of about half the size, distances on the CPU's half-precision
/// instructions where it has them) or to i8 (a quarter; USearch scales each vector to unit
/// length before rounding to [-127, 127], so the graph ranks by cosine, which is the inner
/// product of normalised embeddings). The candidates are rescored with the full-precision
/// vectors either way, so only which candidates the graph proposes changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphDtype {
    /// 32-bit floats, the vectors as given.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
    /// 8-bit integers of the unit-length vector.
    I8,
}

impl GraphDtype {
    /// Every form, in the order of their names.
    pub const ALL: [Self; 4] = [Self::F32, Self::Bf16, Self::F16, Self::I8];

    /// The name in flags and in the graph's description.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::I8 => "i8",
        }
    }

    /// The form a name gives, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes of one scalar of the graph's copy of the vectors.
    fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
            Self::I8 => 1,
        }
    }

    fn scalar_kind(self) -> ScalarKind {
        match self {
            Self::F32 => ScalarKind::F32,
            Self::Bf16 => ScalarKind::BF16,
            Self::F16 => ScalarKind::F16,
            Self::I8 => ScalarKind::I8,
        }
    }
}

/// The instruction sets USearch's distance kernels use on this CPU, for the log.
pub fn kernels() -> String {
    usearch::hardware_acceleration_available()
}

/// The graph and description files of a shard in `dir`.
pub fn hnsw_paths(dir: &Path, shard: &Path) -> (PathBuf, PathBuf) {
    let stem = shard_stem(shard);
    (dir.join(format!("{stem}.hnsw.usearch")), dir.join(format!("{stem}.hnsw.json")))
}

/// A checksum of the graph file's links: [`FxHasher`] over 4 MiB pieces on the rayon threads,
/// their hashes combined in order. USearch writes a graph as the row count and bytes a vector
/// (two `u32`), its copy of the vectors, then its header and the links; damaged links made
/// the search read out of bounds, while damaged vectors only change which candidates the
/// graph proposes (rescored exactly). So where the file starts with this graph's
/// `(rows, bytes_per_vector)` the vectors are left out (an f32 graph of 100k x 384 at M 32
/// holds about 18 MB of links beside 154 MB of vectors); otherwise the whole file is hashed.
///
/// [`FxHasher`]: crate::fxhash::FxHasher
fn graph_checksum(path: &Path, rows: usize, bytes_per_vector: usize) -> Result<String> {
    use std::hash::Hasher;
    let read_err = |source| Error::Read { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    let mut h = crate::fxhash::FxHasher::default();
    h.write_u64(len);
    if len > 0 {
        // SAFETY: read-only; a file changed while it is read gives a checksum that does not
        // match, which is refused.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(read_err)?;
        let vectors_end = 8 + rows as u64 * bytes_per_vector as u64;
        let from = match usearch_lead(&map) {
            Some(lead) if lead == (rows, bytes_per_vector) && vectors_end <= len => {
                h.write(&map[..8]);
                vectors_end as usize
            }
            _ => 0,
        };
        let pieces: Vec<u64> = map[from..]
            .par_chunks(1 << 22)
            .map(|piece| {
                let mut h = crate::fxhash::FxHasher::default();
                h.write(piece);
                h.finish()
            })
            .collect();
        pieces.iter().for_each(|&p| h.write_u64(p));
    }
    Ok(format!("{:016x}", h.finish()))
}

/// The row count and bytes a vector that a USearch graph file starts with (two little-endian
/// `u32`), if it is that long.
fn usearch_lead(file_start: &[u8]) -> Option<(usize, usize)> {
    let word = |i: usize| {
        Some(u32::from_le_bytes(file_start.get(i..i + 4)?.try_into().expect("4 bytes")) as usize)
    };
    Some((word(0)?, word(4)?))
}

fn usearch_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Embeddings { path: path.to_path_buf(), what: format!("{what}: {e}") }
}

fn new_index(dim: usize, opts: &HnswOptions) -> std::result::Result<Index, String> {
    let index = Index::new(&IndexOptions {
        dimensions: dim,
        metric: MetricKind::IP,
        quantization: opts.dtype.scalar_kind(),
        connectivity: opts.connectivity,
        expansion_add: opts.expansion_add,
        expansion_search: opts.expansion_search,
        multi: false,
    });
    index.map_err(|e| e.to_string())
}

/// Builds the graph of `source` (rows inserted on all rayon threads) and writes its two files
/// in `dir`, each under a temporary name renamed into place.
pub fn build(dir: &Path, source: &Vectors, opts: &HnswOptions) -> Result<(PathBuf, PathBuf)> {
    let (graph_path, json_path) = hnsw_paths(dir, source.path());
    let dim = source.dim();
    let index =
        new_index(dim, opts).map_err(|e| usearch_err(&graph_path, "creating the graph", e))?;
    index
        .reserve_capacity_and_threads(source.len(), rayon::current_num_threads().max(1))
        .map_err(|e| usearch_err(&graph_path, "reserving the graph", e))?;
    let blocks: Vec<usize> = (0..source.len()).step_by(1024).collect();
    blocks.par_iter().try_for_each_init(Vec::new, |scratch, &start| {
        let end = (start + 1024).min(source.len());
        let rows = source.rows().block(dim, start, end, scratch);
        check_finite(rows, dim, start, source.path())?;
        for (i, row) in rows.chunks_exact(dim).enumerate() {
            index
                .add((start + i) as u64, row)
                .map_err(|e| usearch_err(&graph_path, "adding a vector", e))?;
        }
        Ok::<_, Error>(())
    })?;
    let tmp = graph_path.with_extension(format!("usearch.tmp.{}", std::process::id()));
    let saved = index
        .save(&tmp.to_string_lossy())
        .map_err(|e| usearch_err(&graph_path, "saving the graph", e))
        .and_then(|()| {
            std::fs::metadata(&tmp).map_err(|source| Error::Read { path: tmp.clone(), source })
        });
    let (size, checksum) = match saved
        .and_then(|m| Ok((m.len(), graph_checksum(&tmp, source.len(), dim * opts.dtype.bytes())?)))
    {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &graph_path)
        .map_err(|source| Error::Write { path: graph_path.clone(), source })?;
    let description = serde_json::json!({
        "format": FORMAT,
        "source": source.path().display().to_string(),
        "source_fingerprint": fingerprint(source),
        "rows": source.len(),
        "dim": dim,
        "metric": "ip",
        "connectivity": opts.connectivity,
        "expansion_add": opts.expansion_add,
        "dtype": opts.dtype.name(),
        "usearch_version": usearch::version(),
        "graph_bytes": size,
        "links_checksum": checksum,
    });
    let mut f = crate::atomic::AtomicFile::create(&json_path)?;
    std::io::Write::write_all(f.writer(), description.to_string().as_bytes())
        .map_err(|e| f.err(e))?;
    f.commit()?;
    Ok((graph_path, json_path))
}

/// A shard's graph, memory-mapped.
pub struct HnswShard {
    index: Index,
    rows: usize,
    graph: PathBuf,
    dtype: GraphDtype,
}

impl HnswShard {
    /// Maps the graph whose description is `json_path` (the graph file beside it), after
    /// checking that it was made from `source`, by this format, and is whole.
    pub fn open(json_path: &Path, source: &Vectors, expansion_search: usize) -> Result<Self> {
        let bad = |what: String| Error::Embeddings { path: json_path.to_path_buf(), what };
        let text = std::fs::read_to_string(json_path)
            .map_err(|source| Error::Read { path: json_path.to_path_buf(), source })?;
        let d: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a graph description ({e})")))?;
        if d["format"] != FORMAT {
            return Err(bad(format!(
                "format {} is not {FORMAT:?}: rebuild it with this version's `tevatron index --hnsw`",
                d["format"]
            )));
        }
        if d["source_fingerprint"] != fingerprint(source).as_str() {
            return Err(bad(format!(
                "was made from other vectors than {} (built from {}): rebuild it with `tevatron index --hnsw`",
                source.path().display(),
                d["source"]
            )));
        }
        let graph = json_path.with_extension("usearch");
        let size = std::fs::metadata(&graph)
            .map_err(|source| Error::Read { path: graph.clone(), source })?
            .len();
        if Some(size) != d["graph_bytes"].as_u64() {
            return Err(Error::Embeddings {
                path: graph,
                what: format!(
                    "is {size} bytes where its description says {} (a partial copy, or an \
                     index stopped between the graph and its description): run tevatron index \
                     --hnsw again",
                    d["graph_bytes"]
                ),
            });
        }
        // Graphs described before the field existed hold F32; a field of the wrong type is
        // refused rather than read as its default.
        let dtype = match &d["dtype"] {
            serde_json::Value::Null => GraphDtype::F32,
            serde_json::Value::String(name) => GraphDtype::from_name(name).ok_or_else(|| {
                let names: Vec<_> = GraphDtype::ALL.iter().map(|d| d.name()).collect();
                bad(format!("dtype {name:?} is none of {}", names.join(", ")))
            })?,
            other => return Err(bad(format!("dtype {other} is not a name"))),
        };
        // USearch's file starts with the row count and bytes a vector: a description whose
        // dtype gives other bytes names the graph's own (the checksum, which leaves the
        // vectors out by that size, would only say it does not match).
        let mut lead = Vec::with_capacity(8);
        std::io::Read::read_to_end(
            &mut std::io::Read::take(
                std::fs::File::open(&graph)
                    .map_err(|source| Error::Read { path: graph.clone(), source })?,
                8,
            ),
            &mut lead,
        )
        .map_err(|source| Error::Read { path: graph.clone(), source })?;
        if let Some((_, bytes)) = usearch_lead(&lead) {
            let dim = source.dim().max(1);
            let held = match bytes.is_multiple_of(dim).then_some(bytes / dim) {
                Some(4) => Some("f32"),
                Some(2) => Some("bf16 or f16"),
                Some(1) => Some("i8"),
                // Not a width of a dtype: a damaged lead, which the checksum names.
                _ => None,
            };
            if let Some(held) = held.filter(|_| bytes != dim * dtype.bytes()) {
                return Err(bad(format!(
                    "says its graph holds {} vectors, but {} holds {held}: rebuild it with \
                     `tevatron index --hnsw`",
                    dtype.name(),
                    graph.display()
                )));
            }
        }
        match d["links_checksum"].as_str() {
            None => {
                return Err(bad(
                    "names no links_checksum (graphs described before 2026-12-07 have none, and \
                     a damaged one could crash the search): rebuild it with `tevatron index --hnsw`"
                        .into(),
                ))
            }
            Some(want) if want != graph_checksum(&graph, source.len(), source.dim() * dtype.bytes())? => {
                return Err(Error::Embeddings {
                    path: graph,
                    what: format!(
                        "does not match the checksum its description {} records (a damaged or \
                         changed copy): run tevatron index --hnsw again",
                        json_path.display()
                    ),
                })
            }
            Some(_) => {}
        }
        let count = |field: &str| match &d[field] {
            serde_json::Value::Null => Ok(None),
            v => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(bad(format!("{field} {v} is not a whole number of at least 1"))),
            },
        };
        let defaults = HnswOptions::default();
        let opts = HnswOptions {
            connectivity: count("connectivity")?.unwrap_or(defaults.connectivity),
            expansion_add: count("expansion_add")?.unwrap_or(defaults.expansion_add),
            // More than the rows examines every row, as the rows do: a huge value asked USearch
            // for memory it could not have.
            expansion_search: expansion_search.min(source.len().max(1)),
            dtype,
        };
        let index = new_index(source.dim(), &opts)
            .map_err(|e| usearch_err(&graph, "opening the graph", e))?;
        index
            .view(&graph.to_string_lossy())
            .map_err(|e| usearch_err(&graph, "mapping the graph", e))?;
        // USearch takes the scalars from the file's own header: it must be the description's.
        if index.scalar_kind() != dtype.scalar_kind() {
            let held = GraphDtype::ALL.into_iter().find(|d| d.scalar_kind() == index.scalar_kind());
            return Err(bad(format!(
                "says its graph holds {} vectors, but {} holds {}: rebuild it with `tevatron index --hnsw`",
                dtype.name(),
                graph.display(),
                held.map_or("other", GraphDtype::name)
            )));
        }
        // One search context per thread, so that queries on all threads do not queue.
        index
            .reserve_capacity_and_threads(index.size(), rayon::current_num_threads().max(1))
            .map_err(|e| usearch_err(&graph, "preparing the graph for search", e))?;
        if index.size() != source.len() || index.dimensions() != source.dim() {
            return Err(Error::Embeddings {
                path: graph,
                what: format!(
                    "holds {} vectors of {} where {} has {} of {}",
                    index.size(),
                    index.dimensions(),
                    source.path().display(),
                    source.len(),
                    source.dim()
                ),
            });
        }
        Ok(Self { index, rows: source.len(), graph, dtype })
    }

    /// The scalars of the graph's copy of the vectors, for the log.
    pub fn dtype(&self) -> GraphDtype {
        self.dtype
    }
}

/// Candidate pairs rescored in one sweep at most (20 bytes a pair while they are scored:
/// 320 MiB): the queries' candidates are gathered and rescored by chunks of this many.
const SWEEP_PAIRS: usize = 1 << 24;

/// Each query's best `depth` `(score, row)` of `shard`, best first, with exact scores: the
/// graph proposes `ceil(depth x multiplier)` candidates (at least `depth`, at most the shard),
/// rescored with the full-precision vectors by exact search's tie rule. When that is every row
/// of the shard, every row is rescored without asking the graph, which may not reach them all
/// (a graph built on several threads can leave a node unreachable), so the answer is exact
/// search's. Queries are spread over rayon threads.
pub fn search_hnsw(
    queries: &[f32],
    dim: usize,
    graph: &HnswShard,
    shard: &Vectors,
    depth: usize,
    multiplier: f64,
) -> Result<(QueryHits, usize)> {
    search_hnsw_in_sweeps(queries, dim, graph, shard, (depth, multiplier), SWEEP_PAIRS)
}

/// [`search_hnsw`], rescoring the candidates of as many queries at a time as keep them within
/// `sweep_pairs` (at least one query).
fn search_hnsw_in_sweeps(
    queries: &[f32],
    dim: usize,
    graph: &HnswShard,
    shard: &Vectors,
    (depth, multiplier): (usize, f64),
    sweep_pairs: usize,
) -> Result<(QueryHits, usize)> {
    check_width(shard, dim)?;
    check_query_rows(queries, dim)?;
    let k = depth.min(graph.rows);
    let m = ((k as f64 * multiplier).ceil() as usize).clamp(k, graph.rows);
    if graph.index.expansion_search() < m {
        graph.index.change_expansion_search(m);
    }
    // Each chunk's candidates are gathered, then rescored in one sweep of the shard.
    let per_sweep = (sweep_pairs / m.max(1)).max(1);
    let mut hits = Vec::with_capacity(queries.len() / dim);
    for chunk in queries.chunks(per_sweep * dim) {
        let candidates = chunk
            .par_chunks(dim)
            .map(|q| -> Result<Vec<u32>> {
                if m == graph.rows {
                    return Ok((0..graph.rows as u32).collect());
                }
                let found = graph
                    .index
                    .search(q, m)
                    .map_err(|e| usearch_err(&graph.graph, "searching the graph", e))?;
                if let Some(bad) = found.keys.iter().find(|&&key| key >= graph.rows as u64) {
                    return Err(Error::Embeddings {
                        path: graph.graph.clone(),
                        what: format!("names row {bad} of a shard of {} rows", graph.rows),
                    });
                }
                let mut rows: Vec<u32> = found.keys.iter().map(|&k| k as u32).collect();
                rows.sort_unstable();
                Ok(rows)
            })
            .collect::<Result<Vec<_>>>()?;
        hits.extend(rescore_candidates(chunk, dim, candidates, shard, k)?);
    }
    Ok((hits, m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::search_shard;
    use crate::vectors::{VecDType, VectorWriter};
    use std::collections::BTreeMap;

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 11) as f64 + 1.0) / 2f64.powi(53)
        };
        (0..n)
            .map(|_| ((-2.0 * next().ln()).sqrt() * (std::f64::consts::TAU * next()).cos()) as f32)
            .collect()
    }

    fn write(dir: &Path, name: &str, rows: &[f32], dim: usize) -> Vectors {
        let path = dir.join(name);
        let ids: Vec<String> = (0..rows.len() / dim).map(|i| format!("d{i}")).collect();
        let mut w = VectorWriter::create(&path, dim, VecDType::F32, BTreeMap::new()).unwrap();
        w.push(rows, &ids).unwrap();
        w.finish().unwrap();
        Vectors::open(&path).unwrap()
    }

    /// The checksum covers the links and leaves out the vectors, as USearch lays them out (the
    /// row count and bytes a vector, the vectors, then the header and links), for every dtype:
    /// a byte of the vectors changed keeps it, one of the links changes it; a file that does
    /// not start so is hashed whole.
    #[test]
    fn the_checksum_covers_the_links_not_the_vectors() {
        let (n, dim) = (200, 8);
        for dtype in GraphDtype::ALL {
            let dir = tempfile::tempdir().unwrap();
            let v = write(dir.path(), "c.safetensors", &gaussian(n * dim, 3), dim);
            let opts = HnswOptions { dtype, ..HnswOptions::default() };
            let (graph, _) = build(dir.path(), &v, &opts).unwrap();
            let bpv = dim * dtype.bytes();
            let sum = |bytes: &[u8]| {
                std::fs::write(&graph, bytes).unwrap();
                graph_checksum(&graph, n, bpv).unwrap()
            };
            let whole = std::fs::read(&graph).unwrap();
            let lead: Vec<u32> =
                whole[..8].chunks(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect();
            assert_eq!(lead, [n as u32, bpv as u32], "{}", dtype.name());
            let base = sum(&whole);
            let mut vector = whole.clone();
            vector[8 + n * bpv / 2] ^= 1;
            assert_eq!(sum(&vector), base, "{}: a vector byte", dtype.name());
            let mut link = whole.clone();
            let end = link.len() - 1;
            link[end] ^= 1;
            assert_ne!(sum(&link), base, "{}: a link byte", dtype.name());
            let mut count = whole.clone();
            count[0] ^= 1;
            assert_ne!(sum(&count), base, "{}: the row count", dtype.name());
        }
    }

    /// The mapped graph's candidates, rescored, find nearly all of exact search's top 10, with
    /// exact search's scores; a deeper candidate list finds more. So with the graph's vectors
    /// in bf16, f16 and i8 (unit vectors, as i8 ranks by cosine), each graph smaller.
    #[test]
    fn graph_search_recalls_exact_search() {
        let (n, nq, dim, depth) = (3000, 30, 32, 10);
        let unit = |mut x: Vec<f32>| {
            for row in x.chunks_exact_mut(dim) {
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                row.iter_mut().for_each(|v| *v /= norm);
            }
            x
        };
        let q = unit(gaussian(nq * dim, 2));
        let mut f32_bytes = 0;
        for dtype in GraphDtype::ALL {
            let dir = tempfile::tempdir().unwrap();
            let v = write(dir.path(), "c.safetensors", &unit(gaussian(n * dim, 1)), dim);
            let opts =
                HnswOptions { connectivity: 16, expansion_add: 64, expansion_search: 16, dtype };
            let (graph, json) = build(dir.path(), &v, &opts).unwrap();
            let description = std::fs::read_to_string(&json).unwrap();
            assert!(
                description.contains(&format!("\"dtype\":\"{}\"", dtype.name())),
                "{description}"
            );
            let bytes = std::fs::metadata(&graph).unwrap().len();
            // The graph's copy of the vectors shrinks by the scalars' bytes; its links stay.
            let scalar = dtype.bytes();
            if dtype == GraphDtype::F32 {
                f32_bytes = bytes;
            }
            // (Within 1% of the F32 graph: the links differ a little from build to build, as
            // the threads insert in another order.)
            let saved = f32_bytes as i64 - bytes as i64;
            let want = (n * dim * (4 - scalar)) as i64;
            assert!(
                (saved - want).abs() * 100 <= f32_bytes as i64,
                "{}: {saved} bytes",
                dtype.name()
            );
            recalls_exact_search(&q, &v, &json, depth);
        }
    }

    fn recalls_exact_search(q: &[f32], v: &Vectors, json: &Path, depth: usize) {
        let (dim, nq) = (v.dim(), q.len() / v.dim());
        let exact = search_shard(q, dim, v, depth, 0).unwrap();
        let graph = HnswShard::open(json, v, 16).unwrap();
        let recall = |multiplier| {
            let (got, m) = search_hnsw(q, dim, &graph, v, depth, multiplier).unwrap();
            assert_eq!(m, (depth as f64 * multiplier) as usize);
            let mut found = 0;
            for (g, e) in got.iter().zip(&exact) {
                assert_eq!(g.len(), depth);
                for (score, row) in g {
                    if let Some(x) = e.iter().find(|x| x.1 == *row) {
                        assert!((x.0 - score).abs() < 1e-4, "exact scores");
                        found += 1;
                    }
                }
            }
            found as f64 / (nq * depth) as f64
        };
        let (shallow, deep) = (recall(1.0), recall(8.0));
        assert!(
            deep >= 0.97 && deep >= shallow,
            "{json:?}: recall@10 {shallow} at x1, {deep} at x8"
        );
        // Rescored a query per sweep (the graph's own search is the same), the same hits.
        let (all, _) = search_hnsw(q, dim, &graph, v, depth, 8.0).unwrap();
        let one_by_one = search_hnsw_in_sweeps(q, dim, &graph, v, (depth, 8.0), 1).unwrap();
        assert_eq!(one_by_one.0, all);
    }

    #[test]
    fn graph_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.safetensors", &gaussian(200 * 8, 3), 8);
        let b = write(dir.path(), "b.safetensors", &gaussian(200 * 8, 4), 8);
        let (graph, json) = build(dir.path(), &a, &HnswOptions::default()).unwrap();
        let shard = HnswShard::open(&json, &a, 64).unwrap();
        // A query buffer that is not whole rows is refused, not cut to `len / dim` rows.
        let e = search_hnsw(&gaussian(12, 6), 8, &shard, &a, 5, 1.0).err().unwrap().to_string();
        assert!(e.contains("12 query values are not whole rows of 8"), "{e}");
        let e = HnswShard::open(&json, &b, 64).err().unwrap().to_string();
        assert!(e.contains("was made from other vectors than"), "{e}");
        let text = std::fs::read_to_string(&json).unwrap();
        std::fs::write(&json, text.replace(FORMAT, "tevatron-hnsw-v0")).unwrap();
        let e = HnswShard::open(&json, &a, 64).err().unwrap().to_string();
        assert!(e.contains("\"tevatron-hnsw-v0\" is not \"tevatron-hnsw-v1\""), "{e}");
        // A description from before the dtype field holds F32; an unknown dtype is refused.
        assert!(text.contains("\"dtype\":\"f32\""), "{text}");
        let old = text.replace(",\"dtype\":\"f32\"", "");
        assert!(!old.contains("dtype"), "{old}");
        std::fs::write(&json, old).unwrap();
        assert!(HnswShard::open(&json, &a, 64).is_ok());
        // A description whose dtype is not the graph file's is refused.
        std::fs::write(&json, text.replace("\"dtype\":\"f32\"", "\"dtype\":\"bf16\"")).unwrap();
        let e = HnswShard::open(&json, &a, 64).err().unwrap().to_string();
        assert!(
            e.contains("says its graph holds bf16 vectors, but") && e.contains("holds f32"),
            "{e}"
        );
        std::fs::write(&json, text.replace("\"dtype\":\"f32\"", "\"dtype\":\"f8\"")).unwrap();
        let e = HnswShard::open(&json, &a, 64).err().unwrap().to_string();
        assert!(e.contains("dtype \"f8\" is none of f32, bf16, f16, i8"), "{e}");
        std::fs::write(&json, text).unwrap();
        let bytes = std::fs::read(&graph).unwrap();
        std::fs::write(&graph, &bytes[..bytes.len() / 2]).unwrap();
        let e = HnswShard::open(&json, &a, 64).err().unwrap().to_string();
        assert!(e.contains("where its description says") && e.contains("a.hnsw.usearch"), "{e}");
        let mut rows = gaussian(10 * 8, 5);
        rows[3 * 8 + 2] = f32::NAN;
        let nan = write(dir.path(), "nan.safetensors", &rows, 8);
        let e = build(dir.path(), &nan, &HnswOptions::default()).err().unwrap().to_string();
        assert!(e.ends_with("row 3 holds a NaN or infinite value"), "{e}");
        assert!(!dir.path().join("nan.hnsw.usearch").exists());
    }
}
