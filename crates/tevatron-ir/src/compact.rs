//! Compact corpora: int8 or binary codes of an embeddings shard ([`crate::quantize`]), scanned
//! with integer kernels, whose best `depth x multiplier` candidates per query are rescored with
//! the shard's full-precision vectors (read through the memory map, only the candidates' rows).
//!
//! The compact file is safetensors, readable from numpy:
//! ```python
//! from safetensors.numpy import load_file
//! t = load_file("corpus.0.int8.safetensors")
//! codes = t["codes"]        # int8 [N, D], or uint8 [N, ceil(D / 8)] for binary (np.packbits)
//! scales = t["scales"]      # float32 [D], int8 only: x ~ codes * scales
//! ```
//! Compact files are paired with their shards by name and by the fingerprint below.
//! `__metadata__` holds `format` (`tevatron-compact-v1`), `precision`, `dim`, `rows`, `source`
//! (the embeddings file it was made from) and `source_fingerprint`, a hash of that file's
//! shape, dtype, ids and a sample of its rows: a compact file is only used beside the vectors it
//! was made from.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::atomic::AtomicFile;
use crate::fxhash::FxHasher;
use crate::quantize::{
    encode_binary, encode_int8, encode_query_int8, BinaryBlock, Calibration, Int8Block,
    Int8Queries, Kernels, Precision,
};
use crate::search::{best_first, check_finite, check_query_rows, check_width, Selection, TopK};
use crate::vectors::{Rows, Vectors};
use crate::{Error, Result};

/// The `format` a compact file's header names; any other is refused.
pub const FORMAT: &str = "tevatron-compact-v1";

/// Rows scanned per block: the block's codes and a chunk's scores stay in cache.
const SCAN_BLOCK: usize = 256;

/// Queries scored against a block at a time: the block's codes and their laid-out copy (up to
/// 192 KB each at 768 dimensions), the chunk's scores (128 KB) and its query codes (up to 96 KB,
/// and as much again where the kernel copies them) stay within a core's second-level cache.
const SCORED_QUERIES: usize = 128;

/// How many distinct candidate rows ahead rescoring asks for a row's cache lines (rows come in
/// ascending order, each with every query that wants it): enough rows in flight
/// to cover a memory access with a page walk (a few hundred nanoseconds, more on a busy or
/// remote memory) with the scoring of the rows before it (tens of nanoseconds a row at 384
/// dimensions), few enough that the lines (8 rows of 768 F32 dimensions: 24 KB) are still in
/// the first-level cache when their turn comes. On Zen 5, 4 and 8 rows measured alike (8 a
/// little faster) when rescoring went query by query; without the prefetch, it was 20-25%
/// slower.
const PREFETCH_ROWS: usize = 8;

/// The widest int8 codes scored: `127 x 128 x 65,536` is far from `i32::MAX` (the kernels'
/// sums overflow beyond 132,104 dimensions).
pub const MAX_INT8_DIM: usize = 65_536;

/// Rows quantized per parallel task when a compact form is built.
const ENCODE_BLOCK: usize = 4096;

/// A hash of what identifies an embeddings file: shape, dtype, every id and a sample of about a
/// thousand rows (reading them all would cost as much as the search it guards).
pub fn fingerprint(v: &Vectors) -> String {
    let mut h = FxHasher::default();
    h.write_u64(v.len() as u64);
    h.write_u64(v.dim() as u64);
    h.write(v.dtype().name().as_bytes());
    for id in v.ids().iter() {
        h.write(id.as_bytes());
        h.write_u8(b'\n');
    }
    let stride = (v.len() / 1024).max(1);
    let dim = v.dim();
    for row in (0..v.len()).step_by(stride) {
        let range = row * dim..(row + 1) * dim;
        let bytes: &[u8] = match v.rows() {
            Rows::F32(x) => bytemuck::cast_slice(&x[range]),
            Rows::F16(x) => bytemuck::cast_slice(&x[range]),
            Rows::BF16(x) => bytemuck::cast_slice(&x[range]),
        };
        h.write(bytes);
    }
    format!("{:016x}", h.finish())
}

/// Per-dimension int8 scales calibrated over several shards (one pass over each), so that
/// every shard of a corpus is quantized alike.
pub fn calibrate(shards: &[Vectors]) -> Result<Vec<f32>> {
    let dim = shards.first().map_or(0, Vectors::dim);
    let mut total = Calibration::new(dim);
    for shard in shards {
        check_width(shard, dim)?;
        let part = blocks(shard.len(), ENCODE_BLOCK)
            .into_par_iter()
            .map_init(Vec::new, |scratch, (start, end)| {
                let rows = shard.rows().block(dim, start, end, scratch);
                check_finite(rows, dim, start, shard.path())?;
                let mut c = Calibration::new(dim);
                c.observe(rows);
                Ok(c)
            })
            .try_reduce(
                || Calibration::new(dim),
                |mut a, b| {
                    a.merge(&b);
                    Ok(a)
                },
            )?;
        total.merge(&part);
    }
    Ok(total.scales())
}

fn blocks(n: usize, size: usize) -> Vec<(usize, usize)> {
    (0..n).step_by(size).map(|s| (s, (s + size).min(n))).collect()
}

enum Codes {
    Mapped { map: memmap2::Mmap, start: usize, len: usize },
    Owned(Vec<u8>),
}

/// A shard's compact codes, mapped from a file or built in memory.
pub struct CompactShard {
    precision: Precision,
    dim: usize,
    rows: usize,
    scales: Vec<f32>,
    codes: Codes,
}

impl CompactShard {
    /// The codes the scan compares with this shard's for `queries` (whole rows of `dim`):
    /// int8 against the shard's scales, or sign bits.
    fn query_codes(&self, queries: &[f32], dim: usize) -> Vec<u8> {
        let width = self.precision.row_bytes(dim);
        queries
            .chunks_exact(dim)
            .flat_map(|q| {
                let mut code = vec![0u8; width];
                match self.precision {
                    Precision::Int8 => encode_query_int8(q, &self.scales, &mut code),
                    Precision::Binary => encode_binary(q, &mut code),
                }
                code
            })
            .collect()
    }

    /// Quantizes `source` in memory; int8 uses `scales` when given, else calibrates on the shard.
    pub fn build(source: &Vectors, precision: Precision, scales: Option<Vec<f32>>) -> Result<Self> {
        let scales = match (precision, scales) {
            (Precision::Binary, _) => Vec::new(),
            (Precision::Int8, Some(s)) => s,
            (Precision::Int8, None) => calibrate(std::slice::from_ref(source))?,
        };
        let mut codes = Vec::with_capacity(source.len() * precision.row_bytes(source.dim()));
        encode_shard(source, precision, &scales, |part| {
            codes.extend_from_slice(part);
            Ok(())
        })?;
        Ok(Self {
            precision,
            dim: source.dim(),
            rows: source.len(),
            scales,
            codes: Codes::Owned(codes),
        })
    }

    /// Opens a compact file written by [`write()`] and checks it was made from `source`.
    pub fn open(path: &Path, source: &Vectors) -> Result<Self> {
        let bad = |what: String| Error::Embeddings { path: path.to_path_buf(), what };
        let (map, data_start, meta) =
            crate::safetensors_check::map(path, "compact file").map_err(|e| match e {
                Error::Embeddings { path, what } => Error::Embeddings {
                    path,
                    what: format!("{what}: rebuild it with `tevatron index`"),
                },
                other => other,
            })?;
        let md: BTreeMap<String, String> =
            meta.metadata().clone().unwrap_or_default().into_iter().collect();
        let field = |k: &str| md.get(k).cloned().unwrap_or_default();
        if field("format") != FORMAT {
            return Err(bad(format!(
                "format {:?} is not {FORMAT:?}: rebuild it with this version's `tevatron index`",
                field("format")
            )));
        }
        let precision = Precision::from_name(&field("precision"))
            .ok_or_else(|| bad(format!("unknown precision {:?}", field("precision"))))?;
        let (dim, rows) = (source.dim(), source.len());
        let made_from = field("source_fingerprint");
        if made_from != fingerprint(source) {
            return Err(bad(format!(
                "was made from other vectors than {} (built from {}): rebuild it with `tevatron index`",
                source.path().display(),
                field("source")
            )));
        }
        let codes = meta.info("codes").ok_or_else(|| bad("no `codes` tensor".into()))?;
        let width = precision.row_bytes(dim);
        let want_dtype = if precision == Precision::Int8 { "I8" } else { "U8" };
        if format!("{:?}", codes.dtype) != want_dtype || codes.shape != [rows, width] {
            return Err(bad(format!(
                "`codes` is {:?} {:?}, expected {want_dtype} [{rows}, {width}]",
                codes.dtype, codes.shape
            )));
        }
        let scales = if precision == Precision::Int8 {
            let s = meta.info("scales").ok_or_else(|| bad("no `scales` tensor".into()))?;
            if format!("{:?}", s.dtype) != "F32" || s.shape != [dim] {
                return Err(bad(format!(
                    "`scales` is {:?} {:?}, expected F32 [{dim}]",
                    s.dtype, s.shape
                )));
            }
            let bytes = &map[data_start + s.data_offsets.0..data_start + s.data_offsets.1];
            let scales: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            if scales.iter().any(|s| !s.is_finite() || *s <= 0.0) {
                return Err(bad("`scales` holds a value that is not a positive number".into()));
            }
            scales
        } else {
            Vec::new()
        };
        let (start, len) =
            (data_start + codes.data_offsets.0, codes.data_offsets.1 - codes.data_offsets.0);
        Ok(Self { precision, dim, rows, scales, codes: Codes::Mapped { map, start, len } })
    }

    /// The precision of the codes.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    fn bytes(&self) -> &[u8] {
        match &self.codes {
            Codes::Mapped { map, start, len } => &map[*start..*start + *len],
            Codes::Owned(v) => v,
        }
    }
}

/// Quantizes a shard block by block (in parallel, in order), handing each block's codes to `sink`.
fn encode_shard(
    source: &Vectors,
    precision: Precision,
    scales: &[f32],
    mut sink: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let dim = source.dim();
    let width = precision.row_bytes(dim);
    let all = blocks(source.len(), ENCODE_BLOCK);
    let per_round = rayon::current_num_threads().max(1) * 4;
    for round in all.chunks(per_round) {
        let parts: Vec<Vec<u8>> = round
            .par_iter()
            .map_init(Vec::new, |scratch, &(start, end)| {
                let rows = source.rows().block(dim, start, end, scratch);
                check_finite(rows, dim, start, source.path())?;
                let mut out = vec![0u8; (end - start) * width];
                for (row, code) in rows.chunks_exact(dim).zip(out.chunks_exact_mut(width)) {
                    match precision {
                        Precision::Int8 => encode_int8(row, scales, bytemuck::cast_slice_mut(code)),
                        Precision::Binary => encode_binary(row, code),
                    }
                }
                Ok(out)
            })
            .collect::<Result<_>>()?;
        for part in &parts {
            sink(part)?;
        }
    }
    Ok(())
}

/// Writes `source`'s compact form to `path` (through a temporary file): int8 with `scales`
/// (from [`calibrate`]), binary without.
pub fn write(path: &Path, source: &Vectors, precision: Precision, scales: &[f32]) -> Result<()> {
    let (rows, dim) = (source.len(), source.dim());
    if precision == Precision::Int8 && scales.len() != dim {
        return Err(Error::Invalid(format!(
            "{} int8 scales for vectors of {dim} dimensions ({})",
            scales.len(),
            source.path().display()
        )));
    }
    let codes_len = rows * precision.row_bytes(dim);
    let mut meta = BTreeMap::new();
    meta.insert("format", FORMAT.to_string());
    meta.insert("precision", precision.name().to_string());
    meta.insert("dim", dim.to_string());
    meta.insert("rows", rows.to_string());
    meta.insert("source", source.path().display().to_string());
    meta.insert("source_fingerprint", fingerprint(source));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(meta));
    // `scales` first, so that both tensors start 4-byte aligned after the padded header.
    let codes_at = if precision == Precision::Int8 {
        header.insert(
            "scales".into(),
            serde_json::json!({"dtype": "F32", "shape": [dim], "data_offsets": [0, 4 * dim]}),
        );
        4 * dim
    } else {
        0
    };
    let (dtype, shape) = match precision {
        Precision::Int8 => ("I8", [rows, dim]),
        Precision::Binary => ("U8", [rows, dim.div_ceil(8)]),
    };
    header.insert(
        "codes".into(),
        serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [codes_at, codes_at + codes_len]}),
    );
    let mut text = serde_json::Value::Object(header).to_string();
    text.extend(std::iter::repeat_n(' ', (8 - text.len() % 8) % 8));
    let mut file = AtomicFile::create(path)?;
    let put = |file: &mut AtomicFile, bytes: &[u8]| {
        file.writer().write_all(bytes).map_err(|e| file.err(e))
    };
    put(&mut file, &(text.len() as u64).to_le_bytes())?;
    put(&mut file, text.as_bytes())?;
    if precision == Precision::Int8 {
        put(&mut file, bytemuck::cast_slice(scales))?;
    }
    encode_shard(source, precision, scales, |part| put(&mut file, part))?;
    file.commit()
}

/// The `m` largest keys seen, a key being `(score, -row)` packed in a `u64` so that candidates
/// compare in one instruction and ties go to the lower row, whatever the threads: a
/// [`Selection`] behind a key floor.
struct Candidates {
    best: Selection<u64>,
    floor: u64,
}

impl Candidates {
    fn new(m: usize) -> Self {
        Self::behind(m, 0)
    }

    /// Keeps the best `m` keys above `floor`.
    fn behind(m: usize, floor: u64) -> Self {
        Self { best: Selection::new(m), floor }
    }

    /// A floor that lets in only scores at or above the worst kept key's (the `m`-th best,
    /// where at least `m` were offered), whatever their rows; 0 (no floor) with fewer than `m`.
    fn starting_floor(mut self) -> u64 {
        let m = self.best.k();
        self.best.select(|a, b| b.cmp(a));
        let kept = self.best.into_items();
        match kept.iter().min() {
            // The highest key of the score below: every key of the worst's score is above it.
            Some(&worst) if m > 0 && kept.len() >= m => {
                Self::key(Self::score_of(worst).saturating_sub(1), 0)
            }
            _ => 0,
        }
    }

    #[inline]
    fn key(score: i32, row: u32) -> u64 {
        (((score as u32) ^ 0x8000_0000) as u64) << 32 | (u32::MAX - row) as u64
    }

    #[inline]
    fn push(&mut self, key: u64) {
        if key > self.floor {
            if let Some(&worst) = self.best.push(key, |a, b| b.cmp(a)) {
                self.floor = worst;
            }
        }
    }

    /// The score of the floor's key: a score below it cannot enter (one equal to it may, on a
    /// lower row).
    #[inline]
    fn floor_score(&self) -> i32 {
        Self::score_of(self.floor)
    }

    #[inline]
    fn score_of(key: u64) -> i32 {
        (((key >> 32) as u32) ^ 0x8000_0000) as i32
    }

    fn rows(mut self) -> Vec<u32> {
        self.best.select(|a, b| b.cmp(a));
        let keys = self.best.into_items();
        let mut rows: Vec<u32> = keys.into_iter().map(|k| u32::MAX - k as u32).collect();
        rows.sort_unstable();
        rows
    }
}

/// Each query's best `(score, row)` pairs of a shard, best first.
pub type QueryHits = Vec<Vec<(f32, u32)>>;

/// How a compact search ran, for the log.
#[derive(Clone, Copy, Debug)]
pub struct ScanReport {
    /// Candidates rescored per query (the last shard's).
    pub candidates: usize,
    /// The kernels the scan used.
    pub kernels: Kernels,
    /// Queries of this shard scanned a second time because the floor sampled from their
    /// part's blocks proved too high (rare on data whose best rows are spread out).
    pub rescanned: usize,
}

/// Each query's best `depth` `(score, row)` of `shard`, best first, with exact scores: the
/// compact codes pick `ceil(depth x multiplier)` candidates (at least `depth`, at most the
/// shard), which are rescored with the full-precision vectors and ranked by the same tie rule
/// as exact search. With every row a candidate, the result is exact search's.
#[allow(clippy::too_many_arguments)]
pub fn search_compact(
    queries: &[f32],
    dim: usize,
    compact: &CompactShard,
    shard: &Vectors,
    depth: usize,
    batch_size: usize,
    multiplier: f64,
    kernels: Kernels,
) -> Result<(QueryHits, ScanReport)> {
    check_width(shard, dim)?;
    check_query_rows(queries, dim)?;
    if compact.dim != dim || compact.rows != shard.len() {
        return Err(Error::Invalid(format!(
            "compact codes of {} x {} do not fit {} ({} x {})",
            compact.rows,
            compact.dim,
            shard.path().display(),
            shard.len(),
            shard.dim()
        )));
    }
    if compact.precision == Precision::Int8 && dim > MAX_INT8_DIM {
        return Err(Error::Invalid(format!(
            "int8 codes of {dim} dimensions: sums of more than {MAX_INT8_DIM} could overflow"
        )));
    }
    let nq = queries.len() / dim;
    let n = shard.len();
    let k = depth.min(n);
    let m = ((k as f64 * multiplier).ceil() as usize).clamp(k, n);
    let report = ScanReport { candidates: m, kernels, rescanned: 0 };
    if k == 0 {
        return Ok((vec![Vec::new(); nq], report));
    }
    // The batch widened to as many queries per pass as keep the threads' candidate lists (up
    // to 2m keys of 8 bytes a query and thread) within exact search's pass budget, as exact
    // search widens its passes: each pass reads the codes, and lays each block out for the
    // kernels, once. The result does not depend on it.
    let parts = rayon::current_num_threads().max(1);
    let pass = crate::search::queries_per_pass(
        crate::search::queries_per_batch(batch_size, nq),
        nq,
        m,
        parts,
    );
    let (hits, rescanned) = scan_in_passes(queries, dim, compact, shard, (k, m), pass, kernels)?;
    Ok((hits, ScanReport { rescanned, ..report }))
}

/// A scan block's codes laid out for the kernels, once per pass.
enum LaidOut<'a> {
    Int8(Int8Block<'a>),
    Binary(BinaryBlock<'a>),
}

/// How many of a part's best `m` rows the floor's sample is expected to hold, at least.
///
/// Each part's candidates are kept behind a floor that rises as better rows arrive; scanned in
/// row order, a part of `n` rows offers about `m (1 + ln(n / m))` of them, each tested, pushed
/// and selected. At 1M rows and 1,000 candidates that is seven times `m`, and their handling
/// took about half as long as the binary scan itself. So a sample of the part's blocks is
/// scored first, and each query starts at the score of its sample's best at twice the rank
/// the part's `m`-th best is expected at in the sample ([`sampled_blocks`]): about the part's
/// `2m`-th best, so that about twice `m` rows pass it.
const SAMPLE_EXPECTED: usize = 16;

/// The least rank in the sample whose score is the starting floor: twice [`SAMPLE_EXPECTED`].
/// A floor above the part's `m`-th best (twice as many of the part's best `m` in the sample as
/// expected: a Poisson tail of at most 0.03%, at 16 expected) comes about once in 3,600
/// queries and parts, less often with more expected; such a query's part offers fewer than
/// `m` rows, which is seen, and the query is scanned again from no floor.
const SAMPLE_RANK: usize = 2 * SAMPLE_EXPECTED;

/// Each query's best `m` candidate rows (ascending) among `codes`' rows for the query codes of
/// `batch` (whole rows of the codes' width), the threads each scanning a part of the blocks.
/// With `sample`, each part starts from a floor estimated on a sample of its blocks
/// ([`sampled_blocks`]); a query whose floor turned out too high in some part is scanned again
/// without one, so the candidates are the same either way. Also returns how many queries were
/// scanned again.
fn candidate_rows(
    compact: &CompactShard,
    kernels: Kernels,
    dim: usize,
    batch: &[u8],
    m: usize,
    sample: bool,
) -> (Vec<Vec<u32>>, usize) {
    let width = compact.precision.row_bytes(dim);
    let bq = batch.len() / width;
    let all = blocks(compact.rows, SCAN_BLOCK);
    let parts = rayon::current_num_threads().max(1);
    let per_part = all.len().div_ceil(parts).max(1);
    let scan = Scan {
        codes: compact.bytes(),
        dim,
        width,
        precision: compact.precision,
        kernels,
        batch,
        // The int8 query chunks, laid out once for the kernels and shared by every block.
        int8_queries: match compact.precision {
            Precision::Int8 => {
                batch.chunks(SCORED_QUERIES * width).map(|c| kernels.int8_queries(dim, c)).collect()
            }
            Precision::Binary => Vec::new(),
        },
    };
    let (candidates, missed) = all
        .par_chunks(per_part)
        .map(|part| {
            let mut buffers = ScanBuffers::new(bq);
            let floors = match sample.then(|| sampled_blocks(part, m)).flatten() {
                Some((sampled, rank)) => {
                    let mut best: Vec<Candidates> =
                        (0..bq).map(|_| Candidates::new(rank)).collect();
                    for &block in &sampled {
                        scan.block(block, &mut best, &mut buffers);
                    }
                    best.into_iter().map(Candidates::starting_floor).collect()
                }
                None => vec![0; bq],
            };
            let mut heaps: Vec<Candidates> =
                floors.iter().map(|&floor| Candidates::behind(m, floor)).collect();
            for &block in part {
                scan.block(block, &mut heaps, &mut buffers);
            }
            // Fewer than `m` rows at or above a starting floor: the floor was too high.
            let missed: Vec<bool> =
                heaps.iter().zip(&floors).map(|(h, &f)| f != 0 && h.best.len() < m).collect();
            (heaps, missed)
        })
        .reduce(
            || (Vec::new(), Vec::new()),
            |(mut a, mut ma), (b, mb)| {
                if a.is_empty() {
                    return (b, mb);
                }
                for (ha, hb) in a.iter_mut().zip(b) {
                    for key in hb.best.into_items() {
                        ha.push(key);
                    }
                }
                for (x, y) in ma.iter_mut().zip(mb) {
                    *x |= y;
                }
                (a, ma)
            },
        );
    let mut rows: Vec<Vec<u32>> = candidates.into_par_iter().map(Candidates::rows).collect();
    let again: Vec<usize> = (0..bq).filter(|&q| missed.get(q) == Some(&true)).collect();
    let rescanned = again.len();
    if !again.is_empty() {
        let codes: Vec<u8> =
            again.iter().flat_map(|&q| &batch[q * width..(q + 1) * width]).copied().collect();
        let (found, _) = candidate_rows(compact, kernels, dim, &codes, m, false);
        for (q, found) in again.into_iter().zip(found) {
            rows[q] = found;
        }
    }
    (rows, rescanned)
}

/// The blocks of `part` whose scores set each query's starting floor, and the rank in the
/// sample whose score it is: the blocks evenly spaced, enough rows to hold about
/// [`SAMPLE_EXPECTED`] of the part's best `m` (and at least `4 x` [`SAMPLE_RANK`] rows); the
/// rank twice as many as the whole blocks taken are expected to hold (a single block of a
/// small part can hold far more than 16), and at least [`SAMPLE_RANK`]. None when the sample
/// would be more than an eighth of the part's blocks (which needs `m` of at least about 128,
/// more on parts of few blocks), where the floor rises soon enough by itself, or when it has
/// fewer rows than the rank (no floor would come of it).
fn sampled_blocks(part: &[(usize, usize)], m: usize) -> Option<(Vec<(usize, usize)>, usize)> {
    let rows: usize = part.iter().map(|(s, e)| e - s).sum();
    let wanted = (rows * SAMPLE_EXPECTED).div_ceil(m.max(1)).max(4 * SAMPLE_RANK);
    let count = wanted.div_ceil(SCAN_BLOCK);
    if m >= rows || count * 8 > part.len() {
        return None;
    }
    let blocks: Vec<(usize, usize)> = (0..count).map(|i| part[i * part.len() / count]).collect();
    let sampled: usize = blocks.iter().map(|(s, e)| e - s).sum();
    let rank = (2 * sampled * m).div_ceil(rows).max(SAMPLE_RANK);
    (rank <= sampled).then_some((blocks, rank))
}

/// What every block of a pass's scan shares: the codes, the pass's query codes and their int8
/// layout.
struct Scan<'a> {
    codes: &'a [u8],
    dim: usize,
    width: usize,
    precision: Precision,
    kernels: Kernels,
    batch: &'a [u8],
    int8_queries: Vec<Int8Queries<'a>>,
}

/// A thread's scratch for [`Scan::block`]: a chunk's scores, and its queries' floors and
/// hits.
struct ScanBuffers {
    scores: Vec<i32>,
    floors: Vec<i32>,
    hits: Vec<Vec<u32>>,
}

impl ScanBuffers {
    fn new(queries: usize) -> Self {
        let chunk = queries.min(SCORED_QUERIES);
        Self {
            scores: vec![0i32; SCAN_BLOCK * chunk],
            floors: Vec::with_capacity(chunk),
            hits: (0..chunk).map(|_| Vec::with_capacity(SCAN_BLOCK + 16)).collect(),
        }
    }
}

impl Scan<'_> {
    /// Scores the rows `start..end` for every query of the pass and offers each query's heap
    /// the rows above its floor, in row order.
    fn block(&self, (start, end): (usize, usize), heaps: &mut [Candidates], buf: &mut ScanBuffers) {
        let (width, kernels) = (self.width, self.kernels);
        let nb = end - start;
        let block = &self.codes[start * width..end * width];
        let laid_out = match self.precision {
            Precision::Int8 => {
                LaidOut::Int8(kernels.int8_block(self.dim, bytemuck::cast_slice(block)))
            }
            Precision::Binary => LaidOut::Binary(kernels.binary_block(width, block)),
        };
        // Most scores are below a query's floor: compared as scores (by the kernels, a vector
        // at a time), a key built only for those that may enter. Within a heap's scan rows come
        // in ascending order, so one equal to the floor has a higher row than every kept key
        // and cannot enter either (binary scores tie often); a starting floor lets in only
        // scores above it. The floor rises as keys enter: a hit found against the block's
        // first floor is tested again against the current one. int8 scores carry the query
        // offset, taken back out by each row's offset; binary has none.
        let taken = match &laid_out {
            LaidOut::Int8(b) => b.offsets(),
            LaidOut::Binary(_) => &[],
        };
        let chunks = self.batch.chunks(SCORED_QUERIES * width);
        for (c, (chunk, heaps)) in chunks.zip(heaps.chunks_mut(SCORED_QUERIES)).enumerate() {
            let nq = chunk.len() / width;
            let scores = &mut buf.scores[..nb * nq];
            let hits = &mut buf.hits[..nq];
            buf.floors.clear();
            buf.floors.extend(heaps.iter().map(Candidates::floor_score));
            match &laid_out {
                LaidOut::Int8(b) => {
                    b.scores(&self.int8_queries[c], scores);
                    for ((hits, &floor), scores) in
                        hits.iter_mut().zip(&buf.floors).zip(scores.chunks(nb))
                    {
                        kernels.above(scores, taken, floor, hits);
                    }
                }
                LaidOut::Binary(b) => b.scores_above(chunk, &buf.floors, scores, hits),
            }
            for ((heap, scores), hits) in heaps.iter_mut().zip(scores.chunks(nb)).zip(&*hits) {
                let mut floor = heap.floor_score();
                for &i in hits {
                    let i = i as usize;
                    let s = scores[i] - taken.get(i).copied().unwrap_or(0);
                    if s > floor {
                        heap.push(Candidates::key(s, (start + i) as u32));
                        floor = heap.floor_score();
                    }
                }
            }
        }
    }
}

/// [`search_compact`]'s scan and rescoring, `pass` queries at a time: each query's best `k`
/// of `m` candidates, and how many queries were scanned again ([`candidate_rows`]).
fn scan_in_passes(
    queries: &[f32],
    dim: usize,
    compact: &CompactShard,
    shard: &Vectors,
    (k, m): (usize, usize),
    pass: usize,
    kernels: Kernels,
) -> Result<(QueryHits, usize)> {
    // Whole rows of a width above 0: `search_compact` checked them.
    let width = compact.precision.row_bytes(dim);
    let query_codes = compact.query_codes(queries, dim);
    let batch_size = pass.max(1);
    let (mut out, mut rescanned) = (Vec::with_capacity(queries.len() / dim), 0);
    for (b, batch) in query_codes.chunks(batch_size * width).enumerate() {
        let (rows, again) = candidate_rows(compact, kernels, dim, batch, m, true);
        rescanned += again;
        let first = b * batch_size;
        let pass_queries = &queries[first * dim..(first + batch.len() / width) * dim];
        out.extend(rescore_candidates(pass_queries, dim, rows, shard, k)?);
    }
    Ok((out, rescanned))
}

/// Exact scores of each query's candidate rows (`candidates[q]`, ascending, distinct), each
/// query's best `k` kept by exact search's tie rule, as if it were rescored alone: its rows are
/// pushed in the same ascending order.
///
/// The pairs are scored in row order across all the queries: a row several queries want is
/// read once a call (a pass of the compact search) while it is in cache, and the shard front
/// to back. Rescored query by query, 6,980 queries' 4,000 candidates in each 1M-row shard of
/// 768 dimensions read each row from memory about 28 times (about 86 GB a shard), and took
/// most of an int8 search.
pub(crate) fn rescore_candidates(
    queries: &[f32],
    dim: usize,
    candidates: Vec<Vec<u32>>,
    shard: &Vectors,
    k: usize,
) -> Result<QueryHits> {
    // Where each query's scores start in the query-major order, and their total.
    let mut total = 0;
    let starts: Vec<usize> = candidates
        .iter()
        .map(|rows| {
            let start = total;
            total += rows.len();
            start
        })
        .collect();
    debug_assert!(u32::try_from(candidates.len()).is_ok());
    debug_assert!(candidates.iter().all(|rows| rows.is_sorted_by(|a, b| a < b)));
    let mut pairs: Vec<u64> = Vec::with_capacity(total);
    for (q, rows) in candidates.iter().enumerate() {
        pairs.extend(rows.iter().map(|&row| (row as u64) << 32 | q as u64));
    }
    pairs.par_sort_unstable();
    let all = shard.rows();
    let tasks = rayon::current_num_threads().max(1) * 4;
    let per_task = pairs.len().div_ceil(tasks).max(1);
    let mut scores = vec![0f32; pairs.len()];
    pairs.par_chunks(per_task).zip(scores.par_chunks_mut(per_task)).try_for_each_init(
        || (Vec::new(), Vec::new()),
        |(scratch, run_queries), (pairs, scores)| -> Result<()> {
            // Rows come in runs (every query that wants one): each run is one row against its
            // queries ([`Rows::dots`]), and each row is asked for `PREFETCH_ROWS` runs ahead.
            let runs = || pairs.chunk_by(|a, b| a >> 32 == b >> 32);
            for run in runs().take(PREFETCH_ROWS) {
                all.prefetch(dim, (run[0] >> 32) as usize);
            }
            let mut ahead = runs().skip(PREFETCH_ROWS);
            let mut at = 0;
            for run in runs() {
                if let Some(later) = ahead.next() {
                    all.prefetch(dim, (later[0] >> 32) as usize);
                }
                let r = (run[0] >> 32) as usize;
                run_queries.clear();
                run_queries.extend(run.iter().map(|&p| {
                    let q = p as u32 as usize;
                    &queries[q * dim..(q + 1) * dim]
                }));
                let out = &mut scores[at..at + run.len()];
                all.dots(dim, r, run_queries, out);
                if out.iter().any(|s| !s.is_finite()) {
                    // A NaN or infinity in the row makes the score one; the row check names it.
                    check_finite(all.block(dim, r, r + 1, scratch), dim, r, shard.path())?;
                }
                at += run.len();
            }
            Ok(())
        },
    )?;
    // Back into each query's order: a query's pairs come in ascending rows, as its list.
    let mut by_query = vec![0f32; pairs.len()];
    let mut next = starts.clone();
    for (&pair, &score) in pairs.iter().zip(&scores) {
        let q = pair as u32 as usize;
        by_query[next[q]] = score;
        next[q] += 1;
    }
    drop((pairs, scores));
    let ids = shard.ids();
    Ok(candidates
        .into_par_iter()
        .zip(starts)
        .map(|(rows, start)| {
            let mut top = TopK::new(k);
            for (&row, &score) in rows.iter().zip(&by_query[start..]) {
                top.push(score, row, ids);
            }
            best_first(top, ids)
        })
        .collect())
}

/// Where `tevatron index` writes a shard's compact form: `<dir>/<shard stem>.<precision>.safetensors`.
pub fn compact_path(dir: &Path, shard: &Path, precision: Precision) -> PathBuf {
    dir.join(format!("{}.{}.safetensors", shard_stem(shard), precision.name()))
}

/// A shard's file name without its extension: what `tevatron index` names its outputs after.
pub fn shard_stem(shard: &Path) -> String {
    shard.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::search_shard;
    use crate::vectors::{VecDType, VectorWriter};
    use proptest::prelude::*;

    fn write_vectors(dir: &Path, name: &str, rows: &[f32], dim: usize, dt: VecDType) -> Vectors {
        let path = dir.join(name);
        let ids: Vec<String> =
            (0..rows.len() / dim).map(|i| format!("d{}", (i * 7919) % 10007)).collect();
        let mut w = VectorWriter::create(&path, dim, dt, BTreeMap::new()).unwrap();
        w.push(rows, &ids).unwrap();
        w.finish().unwrap();
        Vectors::open(&path).unwrap()
    }

    fn lcg(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        move || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            x >> 33
        }
    }

    /// Values in {-2, ..., 2}: their products and sums are exact in any order, and ties common.
    fn small_ints(next: &mut impl FnMut() -> u64, len: usize) -> Vec<f32> {
        (0..len).map(|_| (next() % 5) as f32 - 2.0).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// With every row a candidate, a compact search (either precision, in memory or from
        /// its file, any kernels, any batch) is exact search: same ids in the same order, same
        /// scores. Small integer values make sums exact in any order and ties common.
        #[test]
        fn rescoring_the_whole_corpus_is_exact_search(
            n in 1usize..2600, nq in 1usize..4, dim in 1usize..40, depth in 1usize..30,
            batch in 0usize..3, seed in 0u64..1000, half in any::<bool>(),
        ) {
            let mut next = lcg(seed);
            let (docs, q) = (small_ints(&mut next, n * dim), small_ints(&mut next, nq * dim));
            let dir = tempfile::tempdir().unwrap();
            let dt = if half { VecDType::BF16 } else { VecDType::F32 };
            let v = write_vectors(dir.path(), "c", &docs, dim, dt);
            let want = search_shard(&q, dim, &v, depth, 0).unwrap();
            let all = n as f64 / depth as f64 + 1.0;
            for precision in [Precision::Int8, Precision::Binary] {
                let scales = calibrate(std::slice::from_ref(&v)).unwrap();
                let path = dir.path().join(precision.name());
                write(&path, &v, precision, &scales).unwrap();
                let shards = [CompactShard::build(&v, precision, None).unwrap(), CompactShard::open(&path, &v).unwrap()];
                for compact in &shards {
                    for kernels in Kernels::available() {
                        let (got, report) = search_compact(&q, dim, compact, &v, depth, batch, all, kernels).unwrap();
                        prop_assert_eq!(report.candidates, n);
                        prop_assert_eq!(&got, &want, "{} {}", precision.name(), kernels.name());
                        // Passes of `batch` queries, as a depth too large to widen them would run.
                        let k = depth.min(n);
                        let (passes, _) = scan_in_passes(&q, dim, compact, &v, (k, n), batch.max(1), kernels).unwrap();
                        prop_assert_eq!(&passes, &want, "{} {} in passes", precision.name(), kernels.name());
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The candidate lists keep exactly the `m` largest keys, whether the keys come in one
        /// list or in parts merged afterwards (as the threads' lists are).
        #[test]
        fn candidates_keep_the_m_largest_keys(
            n in 1usize..3000, m in 1usize..200, parts in 1usize..4, seed in 0u64..1000,
        ) {
            let mut next = lcg(seed);
            // Few distinct scores, so that ties (broken by the lower row) are common.
            let keys: Vec<u64> = (0..n).map(|row| Candidates::key((next() % 17) as i32 - 8, row as u32)).collect();
            let mut sorted = keys.clone();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            let mut want: Vec<u32> = sorted.iter().take(m).map(|k| u32::MAX - *k as u32).collect();
            want.sort_unstable();
            let mut lists: Vec<Candidates> = (0..parts).map(|_| Candidates::new(m)).collect();
            for (i, &key) in keys.iter().enumerate() {
                lists[i * parts / n].push(key);
            }
            let mut merged = Candidates::new(m);
            for list in lists {
                for key in list.best.into_items() {
                    merged.push(key);
                }
            }
            prop_assert_eq!(merged.rows(), want);
        }
    }

    /// Runs `f` on a pool of `threads` threads, as the scan's parts are made per thread.
    fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// A starting floor from a sample of the blocks changes no candidate list, whatever the
        /// precision, kernels and threads, with the ties of small integer values.
        #[test]
        fn a_sampled_floor_gives_the_same_candidates(
            n in 4096usize..9000, nq in 1usize..5, dim in 8usize..80, more in 0usize..120,
            seed in 0u64..1000,
        ) {
            // Enough candidates for a sample of at most two of the 16 or more blocks.
            let m = n / 32 + 8 + more;
            let mut next = lcg(seed);
            let (docs, q) = (small_ints(&mut next, n * dim), small_ints(&mut next, nq * dim));
            let dir = tempfile::tempdir().unwrap();
            let v = write_vectors(dir.path(), "c", &docs, dim, VecDType::F32);
            // One thread's part is every block: the sample is taken there.
            prop_assert!(sampled_blocks(&blocks(n, SCAN_BLOCK), m).is_some());
            for precision in [Precision::Int8, Precision::Binary] {
                let compact = CompactShard::build(&v, precision, None).unwrap();
                let codes = compact.query_codes(&q, dim);
                for kernels in Kernels::available() {
                    for threads in [1, 2] {
                        let run = |sample| on_threads(threads, || candidate_rows(&compact, kernels, dim, &codes, m, sample));
                        let (want, none) = run(false);
                        prop_assert_eq!(none, 0);
                        prop_assert_eq!(run(true).0, want, "{} {} {} threads", precision.name(), kernels.name(), threads);
                    }
                }
            }
        }
    }

    /// A sample that holds a query's best rows gives a floor too high for the rest of the part:
    /// fewer than `m` rows pass it, and the query is scanned again from no floor, to the same
    /// candidates as without a sample; with two threads only the second part's floor is too
    /// high (the one merged into the first), and the query is still scanned again.
    #[test]
    fn a_floor_set_too_high_by_the_sample_is_scanned_again() {
        let (n, dim, m, planted) = (4096, 64, 200, 60);
        let mut next = lcg(7);
        let query: Vec<f32> = (0..dim).map(|_| (next() % 1000) as f32 - 499.5).collect();
        let mut docs: Vec<f32> = (0..n * dim).map(|_| (next() % 1000) as f32 - 499.5).collect();
        // The first rows of the middle block (sampled by one thread over every block, and by
        // the second of two, whose first block it is) are the query itself (Hamming distance
        // 0): at least the sample's rank, fewer than `m`.
        let all = blocks(n, SCAN_BLOCK);
        let middle = all[all.len() / 2];
        for part in [&all[..], &all[all.len() / 2..]] {
            let (sampled, rank) = sampled_blocks(part, m).unwrap();
            assert!(sampled.contains(&middle) && rank <= planted && planted < m, "{rank}");
        }
        for row in middle.0..middle.0 + planted {
            docs[row * dim..(row + 1) * dim].copy_from_slice(&query);
        }
        let dir = tempfile::tempdir().unwrap();
        let v = write_vectors(dir.path(), "c", &docs, dim, VecDType::F32);
        let compact = CompactShard::build(&v, Precision::Binary, None).unwrap();
        let code = compact.query_codes(&query, dim);
        for kernels in Kernels::available() {
            for threads in [1, 2] {
                let run = |sample| {
                    on_threads(threads, || candidate_rows(&compact, kernels, dim, &code, m, sample))
                };
                let (want, _) = run(false);
                assert_eq!(want[0].len(), m);
                let (got, rescanned) = run(true);
                assert_eq!(rescanned, 1, "{} {threads} threads", kernels.name());
                assert_eq!(got, want, "{} {threads} threads", kernels.name());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Rescoring in one sweep of the rows gives each query what scoring its own candidates
        /// alone gives (the best `k` by score, equal scores by doc id as exact search orders
        /// them), whatever rows the other queries want.
        #[test]
        fn rescoring_in_row_order_keeps_each_querys_best(
            n in 1usize..400, nq in 1usize..6, dim in 1usize..20, k in 1usize..20,
            seed in 0u64..1000, half in any::<bool>(),
        ) {
            let mut next = lcg(seed);
            let (docs, q) = (small_ints(&mut next, n * dim), small_ints(&mut next, nq * dim));
            let dir = tempfile::tempdir().unwrap();
            let dt = if half { VecDType::F16 } else { VecDType::F32 };
            let v = write_vectors(dir.path(), "c", &docs, dim, dt);
            // Each query wants about a third of the rows (or none), overlapping the others'.
            let candidates: Vec<Vec<u32>> =
                (0..nq).map(|_| (0..n as u32).filter(|_| next().is_multiple_of(3)).collect()).collect();
            let got = rescore_candidates(&q, dim, candidates.clone(), &v, k).unwrap();
            prop_assert_eq!(got.len(), nq);
            let ids = v.ids();
            for (i, (rows, got)) in candidates.iter().zip(&got).enumerate() {
                let query = &q[i * dim..(i + 1) * dim];
                let mut want: Vec<(f32, u32)> = rows
                    .iter()
                    .map(|&r| {
                        let row = &docs[r as usize * dim..(r as usize + 1) * dim];
                        (row.iter().zip(query).map(|(a, b)| a * b).sum::<f32>(), r)
                    })
                    .collect();
                want.sort_by(|a, b| {
                    b.0.partial_cmp(&a.0).unwrap().then_with(|| ids[b.1 as usize].cmp(&ids[a.1 as usize]))
                });
                want.truncate(k);
                prop_assert_eq!(got, &want, "query {}", i);
            }
        }
    }

    /// A candidate row holding a NaN or an infinity is an error naming the file and the row,
    /// never a score in a ranking; the same candidates without it rescore.
    #[test]
    fn a_non_finite_candidate_row_is_an_error() {
        let dim = 12;
        let mut docs = vec![0.5f32; 6 * dim];
        docs[3 * dim + 9] = f32::NAN;
        docs[4 * dim] = f32::INFINITY;
        let dir = tempfile::tempdir().unwrap();
        let v = write_vectors(dir.path(), "c", &docs, dim, VecDType::F32);
        let q = vec![1.0f32; 2 * dim];
        for (bad, rows) in [(3, vec![vec![0, 3, 5], vec![1, 2]]), (4, vec![vec![0], vec![2, 4]])] {
            let err = rescore_candidates(&q, dim, rows, &v, 2).unwrap_err().to_string();
            assert!(err.contains(&format!("row {bad} holds a NaN or infinite value")), "{err}");
            assert!(err.contains(&v.path().display().to_string()), "{err}");
        }
        let ok = rescore_candidates(&q, dim, vec![vec![0, 5], vec![1, 2]], &v, 2).unwrap();
        assert_eq!(ok[1], vec![(6.0, 1u32), (6.0, 2)]);
    }

    /// A query buffer that is not whole rows of the width is refused by every search, exact and
    /// compact, instead of searching `len / dim` rows and dropping the rest; so is a width of 0.
    #[test]
    fn query_values_that_are_not_whole_rows_are_refused() {
        let dim = 8;
        let dir = tempfile::tempdir().unwrap();
        let v = write_vectors(dir.path(), "c", &vec![0.25f32; 20 * dim], dim, VecDType::F32);
        let q = vec![1.0f32; 2 * dim + 3];
        let refused = |e: Error| {
            let e = e.to_string();
            assert!(e.contains("19 query values are not whole rows of 8"), "{e}");
        };
        refused(search_shard(&q, dim, &v, 5, 0).unwrap_err());
        for precision in [Precision::Int8, Precision::Binary] {
            let compact = CompactShard::build(&v, precision, None).unwrap();
            let search =
                |q: &[f32]| search_compact(q, dim, &compact, &v, 5, 0, 2.0, Kernels::detect());
            refused(search(&q).unwrap_err());
            assert_eq!(search(&q[..2 * dim]).unwrap().0.len(), 2);
        }
        assert!(check_query_rows(&[], 0).is_err() && check_query_rows(&[], 4).is_ok());
    }

    /// Gaussian vectors, like embeddings without structure: the compact pass must still put
    /// most true neighbours among its candidates, or rescoring cannot find them.
    #[test]
    fn compact_candidates_hold_the_true_neighbours() {
        let (n, nq, dim, depth) = (4000, 20, 64, 10);
        let mut next = lcg(7);
        let mut gauss = || {
            let (u, v) = ((next() as f64 + 1.0) / 2f64.powi(31), next() as f64 / 2f64.powi(31));
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        };
        let docs: Vec<f32> = (0..n * dim).map(|_| gauss()).collect();
        let q: Vec<f32> = (0..nq * dim).map(|_| gauss()).collect();
        let dir = tempfile::tempdir().unwrap();
        let v = write_vectors(dir.path(), "c", &docs, dim, VecDType::F32);
        let exact = search_shard(&q, dim, &v, depth, 0).unwrap();
        let recall = |precision, multiplier| {
            let compact = CompactShard::build(&v, precision, None).unwrap();
            let (got, _) =
                search_compact(&q, dim, &compact, &v, depth, 0, multiplier, Kernels::detect())
                    .unwrap();
            let found: usize = got
                .iter()
                .zip(&exact)
                .map(|(g, e)| g.iter().filter(|h| e.iter().any(|x| x.1 == h.1)).count())
                .sum();
            found as f64 / (nq * depth) as f64
        };
        let (int8, binary, binary_deep) = (
            recall(Precision::Int8, 2.0),
            recall(Precision::Binary, 4.0),
            recall(Precision::Binary, 40.0),
        );
        assert!(int8 >= 0.97, "int8 x2 recall@10 {int8}");
        // Sign bits of 64 dimensions are coarse (0.31 and 0.74 when written); a chance pick of
        // 40 or 400 of 4,000 rows would hold 1% or 10%.
        assert!(
            binary >= 0.2 && binary_deep >= 0.6 && binary_deep > binary,
            "binary {binary} {binary_deep}"
        );
    }

    /// More queries than a chunk scored against a block (so a block's layout serves several
    /// chunks), in one pass and in several: with every row a candidate, exact search.
    #[test]
    fn many_queries_span_several_chunks_and_passes() {
        let (n, nq, dim, depth) = (700, 2 * SCORED_QUERIES + 44, 24, 5);
        let mut next = lcg(11);
        let (docs, q) = (small_ints(&mut next, n * dim), small_ints(&mut next, nq * dim));
        let dir = tempfile::tempdir().unwrap();
        let v = write_vectors(dir.path(), "c", &docs, dim, VecDType::F32);
        let want = search_shard(&q, dim, &v, depth, 0).unwrap();
        for precision in [Precision::Int8, Precision::Binary] {
            let compact = CompactShard::build(&v, precision, None).unwrap();
            for kernels in Kernels::available() {
                for pass in [nq, 100, 7] {
                    let (got, _) =
                        scan_in_passes(&q, dim, &compact, &v, (depth, n), pass, kernels).unwrap();
                    assert_eq!(got, want, "{} {} pass {pass}", precision.name(), kernels.name());
                }
            }
        }
    }

    #[test]
    fn compact_file_is_checked_against_its_vectors_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let a =
            write_vectors(dir.path(), "a", &[1.0, -2.0, 0.5, 0.25, 3.0, -1.0], 2, VecDType::F32);
        let b =
            write_vectors(dir.path(), "b", &[1.0, -2.0, 0.5, 0.25, 3.0, -1.5], 2, VecDType::F32);
        let path = dir.path().join("a.int8.safetensors");
        let scales = calibrate(std::slice::from_ref(&a)).unwrap();
        write(&path, &a, Precision::Int8, &scales).unwrap();
        // What numpy's load_file sees: int8 codes x scales approximate the vectors.
        let bytes = std::fs::read(&path).unwrap();
        let t = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let codes: Vec<i8> = t.tensor("codes").unwrap().data().iter().map(|&c| c as i8).collect();
        assert_eq!(t.tensor("codes").unwrap().shape(), [3, 2]);
        let s: Vec<f32> = t
            .tensor("scales")
            .unwrap()
            .data()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for (i, x) in a.to_f32().iter().enumerate() {
            assert!((codes[i] as f32 * s[i % 2] - x).abs() <= s[i % 2] / 2.0 + 1e-6);
        }
        assert!(CompactShard::open(&path, &a).is_ok());
        let e = CompactShard::open(&path, &b).err().unwrap().to_string();
        assert!(e.contains("was made from other vectors than") && e.contains("b"), "{e}");
        std::fs::write(dir.path().join("cut"), &bytes[..bytes.len() - 2]).unwrap();
        let e = CompactShard::open(&dir.path().join("cut"), &a).err().unwrap().to_string();
        assert!(e.contains("not a readable compact file"), "{e}");
        let at = bytes.windows(FORMAT.len()).position(|w| w == FORMAT.as_bytes()).unwrap();
        let mut old = bytes.clone();
        old[at + FORMAT.len() - 1] = b'0';
        std::fs::write(dir.path().join("old"), &old).unwrap();
        let e = CompactShard::open(&dir.path().join("old"), &a).err().unwrap().to_string();
        assert!(e.contains("\"tevatron-compact-v0\" is not \"tevatron-compact-v1\""), "{e}");
        // A NaN is named by file and row when the compact form is built.
        let nan = write_vectors(dir.path(), "nan", &[1.0, 0.0, f32::NAN, 1.0], 2, VecDType::F32);
        let e = CompactShard::build(&nan, Precision::Binary, None).err().unwrap().to_string();
        assert!(e.ends_with("row 1 holds a NaN or infinite value"), "{e}");
    }
}
