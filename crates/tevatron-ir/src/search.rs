//! Exact inner-product top-k search over memory-mapped embeddings files.
//!
//! Scores are computed block by block with the `gemm` crate (the matrix kernel candle uses) and
//! fed straight into a per-query top-k buffer, so the full score matrix never exists. Corpus
//! blocks are spread over rayon threads (or, for passes of many queries, the queries are);
//! F16/BF16 rows are widened one block at a time, never the whole corpus. Ties are broken as trec_eval orders them: score descending, then doc id
//! descending, so results do not depend on thread count, block size or shard order.

use std::cmp::Ordering;

use rayon::prelude::*;

use crate::vectors::{Ids, Vectors};
use crate::{Error, Result};

/// Rows per corpus block: the unit the matrix kernel packs, once per product (so once per pass
/// and thread that scores the block), and scores against up to [`QUERY_BLOCK`] queries. A multiple of the `gemm` crate's tile height on every CPU (16
/// rows with AVX2, 64 with AVX-512), so no block ends in a partial tile.
const DOC_BLOCK: usize = 384;

/// Queries scored per matrix product: a whole pass of up to 1,024 queries, so that each corpus
/// block is packed once per pass (at 256 queries a product, the four packings of each block for
/// 1,000 queries were 8% of a search's time on an AMD Zen 3). With [`DOC_BLOCK`], a score buffer
/// of 1.5 MiB per thread.
const QUERY_BLOCK: usize = 1024;

/// Queries per thread from which a pass splits its queries among the threads, each scanning the
/// whole corpus, rather than its corpus blocks. Each query's top-k then sees the whole corpus in
/// one buffer, so it takes fewer candidates (about `k (1 + ln(n / k))` rather than `threads`
/// times `k (1 + ln(n / (threads k)))`) and needs no merge; the price is every thread packing
/// every block, which products of at least this many queries keep under a tenth of their work
/// (8% measured at 256 queries a product). At 100k x 384, depth 1,000, 1,000 queries on two
/// threads of an AMD Zen 3: from 0.84 s (corpus split) to 0.72 s (query split) at the median of
/// eight alternating runs, the same ranking; level at depth 100 and at 1M.
const SPLIT_QUERIES_FROM: usize = 256;

/// Whether a pass of `queries` on `threads` threads splits its queries among them (each thread
/// over the whole corpus) rather than its corpus blocks: see [`SPLIT_QUERIES_FROM`].
fn splits_queries(queries: usize, threads: usize) -> bool {
    queries >= threads.max(1) * SPLIT_QUERIES_FROM
}

/// One retrieved document: its score and where it lives (shard and row), 12 bytes, so that a
/// million hits do not cost a million strings; [`Ranking::docid`] gives its id.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    /// Inner product with the query.
    pub score: f32,
    /// Index of the shard in search order.
    pub shard: u32,
    /// Row within the shard.
    pub row: u32,
}

/// The result of a search: each query's hits, best first, and the ids to name them.
#[derive(Clone, Debug, Default)]
pub struct Ranking {
    /// Hits per query, in query order, best first.
    pub hits: Vec<Vec<Hit>>,
    shard_ids: Vec<std::sync::Arc<Ids>>,
}

impl Ranking {
    /// The document id of a hit.
    pub fn docid(&self, hit: &Hit) -> &str {
        self.shard_ids[hit.shard as usize].get(hit.row as usize)
    }
}

/// The best `k` of the items offered, kept by selection rather than a heap: items gather in a
/// buffer, and when it holds [`Selection::cap`] of them, `select_nth_unstable_by` keeps the best
/// `k` and the worst of those becomes the caller's floor, below which it offers nothing more.
/// Each item costs O(1) amortised, where a binary heap paid a sift of `log k` mispredicted
/// branches (at depth 1,000, a third of an exact search's time). The one home of the idea: the
/// exact search's hits ([`TopK`], which orders ties at the boundary by doc id before it drops
/// any) and the compact scan's candidates (`compact.rs`) use it.
pub(crate) struct Selection<T> {
    k: usize,
    kept: Vec<T>,
}

impl<T> Selection<T> {
    pub(crate) fn new(k: usize) -> Self {
        Self { k, kept: Vec::with_capacity(Self::cap(k).min(1 << 16)) }
    }

    /// Buffer length at which the best `k` are selected: twice `k`, and at least `k + 16` so
    /// that a small `k` does not select at every few items.
    pub(crate) fn cap(k: usize) -> usize {
        k.saturating_add(k.max(16))
    }

    /// Appends `item` (nothing with `k` = 0); when that fills the buffer, selects, and returns
    /// the worst item kept: the new floor.
    #[inline]
    pub(crate) fn push(
        &mut self,
        item: T,
        better_first: impl FnMut(&T, &T) -> Ordering,
    ) -> Option<&T> {
        if self.k == 0 {
            return None;
        }
        self.kept.push(item);
        if self.kept.len() >= Self::cap(self.k) {
            self.select(better_first)
        } else {
            None
        }
    }

    /// Keeps the best `k` by `better_first` (best first); returns the worst of them when a
    /// selection ran.
    pub(crate) fn select(&mut self, better_first: impl FnMut(&T, &T) -> Ordering) -> Option<&T> {
        let k = self.k;
        if self.kept.len() <= k || k == 0 {
            return None;
        }
        self.kept.select_nth_unstable_by(k - 1, better_first);
        self.kept.truncate(k);
        self.kept.last()
    }

    /// How many best items it keeps.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// How many items it holds: at least `k` once `k` have been offered.
    pub(crate) fn len(&self) -> usize {
        self.kept.len()
    }

    /// Everything still held, in no order: the best `k` after [`Selection::select`], else
    /// possibly more (which a merge into another selection can take as they are).
    pub(crate) fn into_items(self) -> Vec<T> {
        self.kept
    }
}

/// The `k` best `(score, row)` pairs offered, by score and then doc id descending (trec_eval's
/// order), in a [`Selection`] behind a score floor. NaN scores never enter.
///
/// The pairs are kept as `u64` keys (the score's bits in an order-preserving form, then the row
/// reversed), so that the selection compares integers: comparing `(f32, u32)` pairs through the
/// tie rule's closure was a fifth of an exact search at depth 1,000. The keys order equal
/// scores by row, not by doc id; a selection whose boundary score is tied on both sides of it
/// orders those tied pairs by the full rule ([`better_first`]) before it drops any.
pub(crate) struct TopK {
    best: Selection<u64>,
    /// No candidate below this can be among the best `k` (NEG_INFINITY until `k` are kept).
    floor: f32,
}

/// A score's bits as an unsigned integer in the score's order (NaN never comes here; `-0.0`
/// is taken as `0.0`, to which it compares equal, so a hit scored `-0.0` is reported as `0`).
#[inline]
fn ordered_bits(score: f32) -> u32 {
    let bits = (score + 0.0).to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// The score [`ordered_bits`] came from.
#[inline]
fn from_ordered_bits(bits: u32) -> f32 {
    f32::from_bits(if bits >> 31 == 1 { bits & 0x7fff_ffff } else { !bits })
}

/// A pair's key in [`TopK`]: larger is better, equal scores by the lower row.
#[inline]
fn key(score: f32, row: u32) -> u64 {
    (ordered_bits(score) as u64) << 32 | (u32::MAX - row) as u64
}

/// The pair a [`key`] holds.
#[inline]
fn pair(key: u64) -> (f32, u32) {
    (from_ordered_bits((key >> 32) as u32), u32::MAX - key as u32)
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        Self { best: Selection::new(k), floor: f32::NEG_INFINITY }
    }

    #[inline]
    pub(crate) fn push(&mut self, score: f32, row: u32, ids: &Ids) {
        // Equal to the floor may still enter: on a score tie the larger doc id ranks first.
        if score.is_nan() || score < self.floor || self.best.k == 0 {
            return;
        }
        self.best.kept.push(key(score, row));
        if self.best.kept.len() >= Selection::<u64>::cap(self.best.k) {
            self.select(ids);
        }
    }

    /// Keeps the best `k` pairs and raises the floor to the worst of them (when more than `k`
    /// are held).
    fn select(&mut self, ids: &Ids) {
        let (k, kept) = (self.best.k, &mut self.best.kept);
        if kept.len() <= k || k == 0 {
            return;
        }
        kept.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        let boundary = kept[k - 1] >> 32;
        if kept[k..].iter().any(|&x| x >> 32 == boundary) {
            // The keys chose among the pairs tied at the boundary by row; the rule chooses by
            // doc id. Sort the tied pairs by it and give the kept slots the best of them.
            let mut tied: Vec<u64> =
                kept.iter().copied().filter(|&x| x >> 32 == boundary).collect();
            tied.sort_unstable_by(|&a, &b| better_first(pair(a), pair(b), ids));
            let slots = kept[..k].iter_mut().filter(|x| **x >> 32 == boundary);
            for (slot, best) in slots.zip(tied) {
                *slot = best;
            }
        }
        kept.truncate(k);
        self.floor = from_ordered_bits(boundary as u32);
    }

    /// Offers one query's scores of rows `start..start + row.len()`, skipping every score
    /// below the current floor: sixteen at a time, the test has no branch per score and
    /// vectorizes.
    ///
    /// Within a chunk, the scores at or above the floor are found as a mask, so only those are
    /// visited one by one (`push` tests each against the floor again, as it may have risen).
    #[inline]
    fn push_row(&mut self, row: &[f32], start: usize, ids: &Ids) {
        for (c, chunk) in row.chunks(16).enumerate() {
            let floor = self.floor;
            let mut above =
                chunk.iter().enumerate().fold(0u32, |m, (i, &s)| m | (u32::from(s >= floor) << i));
            while above != 0 {
                let k = above.trailing_zeros() as usize;
                self.push(chunk[k], (start + c * 16 + k) as u32, ids);
                above &= above - 1;
            }
        }
    }

    /// The keys of the best `k` (or fewer, if fewer were offered), in no particular order.
    fn into_kept_keys(mut self, ids: &Ids) -> Vec<u64> {
        self.select(ids);
        self.best.into_items()
    }

    /// Offers every pair `other` holds (the merge of two threads' top-k of one query).
    fn merge(&mut self, other: TopK, ids: &Ids) {
        for (s, r) in other.best.into_items().into_iter().map(pair) {
            self.push(s, r, ids);
        }
    }
}

/// The order of [`rank_cmp`] (score descending, then doc id descending) made total for the
/// selection: equal scores and equal ids (a duplicated id) fall back to the earlier row, which
/// is the one a bounded heap kept. Scores here are never NaN ([`TopK::push`] drops them).
fn better_first(a: (f32, u32), b: (f32, u32), ids: &Ids) -> Ordering {
    if a.0 > b.0 {
        Ordering::Less
    } else if a.0 < b.0 {
        Ordering::Greater
    } else {
        ids[b.1 as usize].cmp(&ids[a.1 as usize]).then(a.1.cmp(&b.1))
    }
}

/// Queries scored per pass for a `--batch_size` of `batch_size` (0: all of them) over `nq`
/// queries. A batch beyond the query count is all of them, which also keeps its length in
/// values (`batch x width`) from overflowing.
pub fn queries_per_batch(batch_size: usize, nq: usize) -> usize {
    match batch_size {
        0 => nq.max(1),
        b => b.min(nq.max(1)),
    }
}

/// Top-k buffers one pass over the corpus may hold, all threads together.
const PASS_STATE_BYTES: usize = 256 << 20;

/// Queries the exact CPU search scores per pass over the corpus: the `--batch_size` batch
/// (from [`queries_per_batch`]) widened to as many queries as whose top-`k` buffers (about `2k`
/// pairs of 8 bytes per query and thread) fit in 256 MiB, so that the corpus is read, and
/// packed for the matrix kernel, as few times as memory allows. The results do not depend on
/// it; at 1M x 384 and depth 1,000, eight passes of 128 queries took 8.9 s against 4.8 s for
/// one pass of 1,000.
pub fn queries_per_pass(batch: usize, nq: usize, k: usize, threads: usize) -> usize {
    let per_query =
        Selection::<(f32, u32)>::cap(k).saturating_mul(8).saturating_mul(threads.max(1));
    let fit = PASS_STATE_BYTES / per_query.max(1);
    batch.max(fit).min(nq).max(1)
}

/// Checks that every value is finite; names the file and row otherwise.
pub fn check_finite(
    values: &[f32],
    dim: usize,
    first_row: usize,
    what: &std::path::Path,
) -> Result<()> {
    // A branch-free pass first (it vectorizes; `position` stops to test each value, which was 3%
    // of an exact search); the row is looked for only when some value failed.
    if values.chunks(64).all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite())) {
        return Ok(());
    }
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Embeddings {
            path: what.to_path_buf(),
            what: format!("row {} holds a NaN or infinite value", first_row + i / dim),
        }),
    }
}

/// Scores `queries` (`nq x dim`, row-major f32) against one shard and returns each query's
/// best `depth` `(score, row)` pairs, best first. `batch_size` queries are scored per pass over the shard.
pub fn search_shard(
    queries: &[f32],
    dim: usize,
    shard: &Vectors,
    depth: usize,
    batch_size: usize,
) -> Result<Vec<Vec<(f32, u32)>>> {
    let pass = pass_for(batch_size, queries.len() / dim.max(1), depth.min(shard.len()));
    scan_shard(queries, dim, shard, depth, pass, true)
}

/// [`search_shard`] for a shard already passed by [`check_shard_finite`]: a caller that
/// searches the same shard for many chunks of queries (mining) checks its vectors once, where
/// each call of [`search_shard`] would read every vector again for NaN.
pub fn search_checked_shard(
    queries: &[f32],
    dim: usize,
    shard: &Vectors,
    depth: usize,
    batch_size: usize,
) -> Result<Vec<Vec<(f32, u32)>>> {
    let pass = pass_for(batch_size, queries.len() / dim.max(1), depth.min(shard.len()));
    scan_shard(queries, dim, shard, depth, pass, false)
}

/// [`queries_per_pass`] for a `--batch_size` (0: all) on this machine's threads.
pub fn pass_for(batch_size: usize, nq: usize, k: usize) -> usize {
    queries_per_pass(queries_per_batch(batch_size, nq), nq, k, rayon::current_num_threads())
}

/// Checks that every vector of a shard is finite; the error names the file and row.
pub fn check_shard_finite(shard: &Vectors) -> Result<()> {
    let (dim, n) = (shard.dim(), shard.len());
    let blocks: Vec<usize> = (0..n).step_by(DOC_BLOCK).collect();
    blocks.par_iter().try_for_each_init(Vec::new, |widened, &start| {
        let end = (start + DOC_BLOCK).min(n);
        check_finite(shard.rows().block(dim, start, end, widened), dim, start, shard.path())
    })
}

/// The shape in which `mq` queries are scored against `nb` rows of `dim` values: theirs, or
/// larger (the queries and rows padded with zeros, whose scores are dropped) where the `gemm`
/// crate would take a path whose sums round otherwise than its blocked kernel does: a
/// matrix-vector product for one query or one row, its small-matrix kernel for 256 scores or
/// fewer (x86 with FMA or AVX-512), another split of the sums of more than 512 values for at
/// most 64 by 64 (widths of 1 or 2 take one path, `gevv`, in every shape not small). So on one
/// machine a query's scores do not depend, to the bit, on how many queries are searched with it
/// (one query alone differed in the last bits, about 1e-7), nor a row's on the size of the
/// block it ends. A one-query search pays for it: each block is scored as a product of two
/// queries by the blocked kernel, not a matrix-vector product.
fn product_shape(mq: usize, nb: usize, dim: usize) -> (usize, usize) {
    let (mut m, n) = (mq.max(2), nb.max(2));
    if m * n <= 256 {
        m = m.max(257usize.div_ceil(n));
    }
    if dim > 512 && m <= 64 && n <= 64 {
        m = 65;
    }
    (m, n)
}

/// `values`, or a copy of them padded with zeros to `len` in `scratch` when they are shorter.
fn padded<'a>(values: &'a [f32], len: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
    if values.len() >= len {
        return values;
    }
    scratch.clear();
    scratch.extend_from_slice(values);
    scratch.resize(len, 0.0);
    scratch
}

/// The search of one shard in passes of `batch_size` queries (0: all) over the corpus.
fn scan_shard(
    queries: &[f32],
    dim: usize,
    shard: &Vectors,
    depth: usize,
    batch_size: usize,
    check_passages: bool,
) -> Result<Vec<Vec<(f32, u32)>>> {
    check_width(shard, dim)?;
    check_query_rows(queries, dim)?;
    let nq = queries.len() / dim;
    let ids = shard.ids();
    let rows = shard.rows();
    let n = shard.len();
    let k = depth.min(n);
    let mut out = Vec::with_capacity(nq);
    let blocks: Vec<usize> = (0..n).step_by(DOC_BLOCK).collect();
    // Either each thread takes its share of the pass's queries over the whole corpus (when the
    // shares are large, [`SPLIT_QUERIES_FROM`]), or one contiguous run of blocks for all of them:
    // then each keeps one top-k per query, so there are only as many top-k sets to merge as
    // threads (many small tasks would each fill `depth` entries).
    let parts = rayon::current_num_threads().max(1);
    let batch_size = queries_per_batch(batch_size, nq);
    let per_part = blocks.len().div_ceil(parts).max(1);
    // The best `k` of `qs`' queries among the rows of `part`'s blocks.
    let score = |part: &[usize], qs: &[f32], check: bool| -> Result<Vec<TopK>> {
        let share = qs.len() / dim;
        let mut tops: Vec<TopK> = (0..share).map(|_| TopK::new(k)).collect();
        let mut scores = Vec::<f32>::new();
        let mut widened = Vec::<f32>::new();
        // Zero-padded copies of the queries and rows of a product too small for its shape.
        let (mut padded_queries, mut padded_rows) = (Vec::<f32>::new(), Vec::<f32>::new());
        for &start in part {
            let end = (start + DOC_BLOCK).min(n);
            let nb = end - start;
            let block = rows.block(dim, start, end, &mut widened);
            if check {
                check_finite(block, dim, start, shard.path())?;
            }
            // Queries in sub-blocks keep the score buffer at QUERY_BLOCK x DOC_BLOCK
            // (1.5 MiB) whatever the batch size.
            for q0 in (0..share).step_by(QUERY_BLOCK) {
                let mq = QUERY_BLOCK.min(share - q0);
                let (pm, pn) = product_shape(mq, nb, dim);
                let lhs = padded(&qs[q0 * dim..(q0 + mq) * dim], pm * dim, &mut padded_queries);
                let rhs = padded(block, pn * dim, &mut padded_rows);
                scores.resize(pm * pn, 0.0);
                // SAFETY: dst is pm x pn row-major, lhs pm x dim row-major, rhs is pn rows
                // viewed as dim x pn column-major; all slices have those lengths.
                unsafe {
                    gemm::gemm(
                        pm,
                        pn,
                        dim,
                        scores.as_mut_ptr(),
                        1,
                        pn as isize,
                        false,
                        lhs.as_ptr(),
                        1,
                        dim as isize,
                        rhs.as_ptr(),
                        dim as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for (q, top) in tops[q0..q0 + mq].iter_mut().enumerate() {
                    top.push_row(&scores[q * pn..q * pn + nb], start, ids);
                }
            }
        }
        Ok(tops)
    };
    for (batch_index, qb) in queries.chunks(batch_size * dim).enumerate() {
        let bq = qb.len() / dim;
        let check = check_passages && batch_index == 0;
        let tops = if splits_queries(bq, parts) {
            let per_thread = bq.div_ceil(parts);
            // The first share checks every row for NaN; the others' results are dropped with
            // its error.
            let shares: Vec<Vec<TopK>> = qb
                .par_chunks(per_thread * dim)
                .enumerate()
                .map(|(i, qs)| score(&blocks, qs, check && i == 0))
                .collect::<Result<_>>()?;
            shares.into_iter().flatten().collect()
        } else {
            blocks.par_chunks(per_part).map(|part| score(part, qb, check)).try_reduce(
                Vec::new,
                |mut a, b| {
                    if a.is_empty() {
                        return Ok(b);
                    }
                    for (ha, hb) in a.iter_mut().zip(b) {
                        ha.merge(hb, ids);
                    }
                    Ok(a)
                },
            )?
        };
        if tops.is_empty() {
            out.extend((0..bq).map(|_| Vec::new()));
            continue;
        }
        // Each query's final sort on its own thread: serial, the sorts of 1,000 queries at depth
        // 1,000 were a tenth of a 100k-passage search's wall time on two threads.
        out.par_extend(tops.into_par_iter().map(|top| best_first(top, ids)));
    }
    Ok(out)
}

pub(crate) fn best_first(top: TopK, ids: &Ids) -> Vec<(f32, u32)> {
    let mut keys = top.into_kept_keys(ids);
    // By key (score, then row) as integers; then each run of equal scores, rare in real
    // scores, by doc id (a stable sort, so equal ids stay in row order).
    keys.sort_unstable_by(|a, b| b.cmp(a));
    let mut hits: Vec<(f32, u32)> = keys.into_iter().map(pair).collect();
    let mut from = 0;
    while from < hits.len() {
        let score = hits[from].0;
        let to = from + hits[from..].iter().take_while(|h| h.0 == score).count();
        if to - from > 1 {
            hits[from..to]
                .sort_by(|a, b| rank_cmp(a.0, || &ids[a.1 as usize], b.0, || &ids[b.1 as usize]));
        }
        from = to;
    }
    hits
}

/// Scores of `queries x rows start..start + len`, row-major, computed elsewhere (on a GPU).
pub struct ScoreBlock {
    /// First row of the shard the block covers.
    pub start: usize,
    /// Rows covered.
    pub len: usize,
    /// `queries x len` scores, row-major.
    pub scores: Vec<f32>,
}

/// Each of `nq` queries' best `depth` `(score, row)` pairs of a shard whose ids are `ids`,
/// best first, from score blocks computed elsewhere: the top-k half of [`search_shard`] with
/// the same tie rule, so a device that computes the scores gets the same ranking. Queries
/// are spread over rayon threads.
pub fn top_k_of_blocks(
    ids: &Ids,
    nq: usize,
    depth: usize,
    blocks: impl IntoIterator<Item = Result<ScoreBlock>>,
) -> Result<Vec<Vec<(f32, u32)>>> {
    let k = depth.min(ids.len());
    let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
    for block in blocks {
        let ScoreBlock { start, len, scores } = block?;
        if scores.len() != nq * len {
            return Err(Error::Invalid(format!(
                "a score block of {} values for {nq} queries x {len} rows",
                scores.len()
            )));
        }
        tops.par_iter_mut()
            .zip(scores.par_chunks(len.max(1)))
            .for_each(|(top, row)| top.push_row(row, start, ids));
    }
    Ok(tops.into_iter().map(|top| best_first(top, ids)).collect())
}

/// Ordering that puts better hits first; ids are fetched only on exact score ties.
fn rank_cmp<'a>(
    sa: f32,
    ia: impl FnOnce() -> &'a str,
    sb: f32,
    ib: impl FnOnce() -> &'a str,
) -> Ordering {
    sb.partial_cmp(&sa).unwrap_or(Ordering::Equal).then_with(|| ib().cmp(ia()))
}

/// Searches several shards in turn, merging as it goes; memory holds one shard's map, the
/// running top-k and each shard's ids. Shards are taken one at a time from the iterator, so a
/// caller can open them lazily. Ties across shards are broken by doc id like everything else.
pub fn search_shards<S: std::borrow::Borrow<Vectors>>(
    queries: &[f32],
    dim: usize,
    shards: impl IntoIterator<Item = Result<S>>,
    depth: usize,
    batch_size: usize,
) -> Result<Ranking> {
    check_query_rows(queries, dim)?;
    merge_shards(queries.len() / dim, shards, depth, |shard| {
        search_shard(queries, dim, shard, depth, batch_size)
    })
}

/// [`search_shards`] with the search of one shard supplied by the caller (a GPU search):
/// `search` gives each of the `nq` queries' best `(score, row)` pairs of a shard, best first.
pub fn merge_shards<S: std::borrow::Borrow<Vectors>>(
    nq: usize,
    shards: impl IntoIterator<Item = Result<S>>,
    depth: usize,
    mut search: impl FnMut(&Vectors) -> Result<Vec<Vec<(f32, u32)>>>,
) -> Result<Ranking> {
    let mut ranking = Ranking { hits: vec![Vec::new(); nq], shard_ids: Vec::new() };
    for (index, shard) in shards.into_iter().enumerate() {
        let shard = shard?;
        let shard: &Vectors = shard.borrow();
        let found = search(shard)?;
        ranking.shard_ids.push(shard.shared_ids());
        let Ranking { hits, shard_ids } = &mut ranking;
        let id = |h: &Hit| shard_ids[h.shard as usize].get(h.row as usize);
        hits.par_iter_mut().zip(found).for_each(|(acc, rows)| {
            acc.extend(rows.into_iter().map(|(score, row)| Hit {
                score,
                shard: index as u32,
                row,
            }));
            acc.sort_by(|x, y| rank_cmp(x.score, || id(x), y.score, || id(y)));
            acc.truncate(depth);
        });
    }
    Ok(ranking)
}

/// Checks that a query buffer holds whole rows of `dim` values, so that no search takes
/// `len / dim` rows and silently drops the rest (or divides by a width of 0).
pub fn check_query_rows(queries: &[f32], dim: usize) -> Result<()> {
    if dim > 0 && queries.len().is_multiple_of(dim) {
        return Ok(());
    }
    Err(Error::Invalid(format!("{} query values are not whole rows of {dim}", queries.len())))
}

/// Checks that a passage shard has the queries' width `dim` (queries given as rows, not a
/// file); the error names the shard.
pub fn check_width(shard: &Vectors, dim: usize) -> Result<()> {
    if shard.dim() == dim {
        return Ok(());
    }
    Err(Error::DimMismatch {
        queries: None,
        passages: shard.path().to_path_buf(),
        expected: shard.dim(),
        got: dim,
    })
}

/// Checks that a passage shard has the query file's dimension; the error names both files.
pub fn check_dims(queries: &Vectors, shard: &Vectors) -> Result<()> {
    if shard.dim() == queries.dim() {
        return Ok(());
    }
    Err(Error::DimMismatch {
        queries: Some(queries.path().to_path_buf()),
        passages: shard.path().to_path_buf(),
        expected: shard.dim(),
        got: queries.dim(),
    })
}

/// Validates query vectors before any search work.
pub fn check_queries(queries: &Vectors) -> Result<Vec<f32>> {
    if queries.is_empty() {
        return Err(Error::Embeddings {
            path: queries.path().into(),
            what: "holds no query".into(),
        });
    }
    let q = queries.to_f32();
    check_finite(&q, queries.dim(), 0, queries.path())?;
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vectors::{Rows, VecDType, VectorWriter};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn write(
        dir: &std::path::Path,
        name: &str,
        rows: &[f32],
        ids: &[String],
        dim: usize,
        dt: VecDType,
    ) -> Vectors {
        let path = dir.join(name);
        let mut w = VectorWriter::create(&path, dim, dt, BTreeMap::new()).unwrap();
        w.push(rows, ids).unwrap();
        w.finish().unwrap();
        Vectors::open(&path).unwrap()
    }

    /// A hit named by its id, for comparing results.
    #[derive(Clone, Debug, PartialEq)]
    struct Named {
        score: f32,
        docid: String,
    }

    fn named_rows(rows: Vec<Vec<(f32, u32)>>, v: &Vectors) -> Vec<Vec<Named>> {
        rows.into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|(score, row)| Named { score, docid: v.ids()[row as usize].to_string() })
                    .collect()
            })
            .collect()
    }

    fn named(r: &Ranking) -> Vec<Vec<Named>> {
        r.hits
            .iter()
            .map(|hs| {
                hs.iter().map(|h| Named { score: h.score, docid: r.docid(h).to_string() }).collect()
            })
            .collect()
    }

    /// The documented order written out independently of `rank_cmp`: ascending by score, then
    /// by doc id, reversed, which is score descending and, on a tie, doc id descending. A tie
    /// is numeric equality, so 0 and -0 tie (`total_cmp` would order them).
    fn documented_order(all: &mut [Named]) {
        let score = |x: &Named, y: &Named| x.score.partial_cmp(&y.score).expect("finite scores");
        all.sort_by(|x, y| score(x, y).then_with(|| x.docid.cmp(&y.docid)));
        all.reverse();
    }

    fn brute(q: &[f32], docs: &[f32], ids: &[String], dim: usize, depth: usize) -> Vec<Vec<Named>> {
        q.chunks(dim)
            .map(|qv| {
                let mut all: Vec<Named> = docs
                    .chunks(dim)
                    .zip(ids)
                    .map(|(d, id)| Named {
                        score: qv.iter().zip(d).map(|(a, b)| a * b).sum(),
                        docid: id.clone(),
                    })
                    .collect();
                documented_order(&mut all);
                all.truncate(depth);
                all
            })
            .collect()
    }

    fn same(a: &[Vec<Named>], b: &[Vec<Named>]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            let xi: Vec<&str> = x.iter().map(|h| h.docid.as_str()).collect();
            let yi: Vec<&str> = y.iter().map(|h| h.docid.as_str()).collect();
            assert_eq!(xi, yi);
            for (h, g) in x.iter().zip(y) {
                assert!((h.score - g.score).abs() <= 1e-4 * (1.0 + g.score.abs()));
            }
        }
    }

    #[test]
    fn passes_widen_to_what_the_top_k_memory_allows() {
        // 1,000 queries at depth 1,000 on 2 threads: 32 KiB each, one pass.
        assert_eq!(queries_per_pass(128, 1000, 1000, 2), 1000);
        // Depth 10M: 160 MB a query and thread, so the batch stays as asked.
        assert_eq!(queries_per_pass(128, 1000, 10_000_000, 2), 128);
        // In between: as many as fit in 256 MiB (2 x 400,000 x 8 x 2 = 12.8 MB a query).
        assert_eq!(queries_per_pass(1, 1000, 400_000, 2), (256 << 20) / 12_800_000);
        assert_eq!(queries_per_pass(1, 0, 5, 1), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Small integer-valued vectors make exact ties common, so the tie rule is exercised.
        #[test]
        fn topk_matches_full_sort(
            n in 1usize..2500, nq in 1usize..5, dim in 1usize..6, depth in 1usize..40,
            batch in 0usize..4, seed in 0u64..1000,
        ) {
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let mut next = || { x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((x >> 33) % 5) as f32 - 2.0 };
            let docs: Vec<f32> = (0..n * dim).map(|_| next()).collect();
            let q: Vec<f32> = (0..nq * dim).map(|_| next()).collect();
            let ids: Vec<String> = (0..n).map(|i| format!("d{}", (i * 7919) % 10007)).collect();
            let dir = tempfile::tempdir().unwrap();
            let v = write(dir.path(), "c", &docs, &ids, dim, VecDType::F32);
            let got = named_rows(search_shard(&q, dim, &v, depth, batch).unwrap(), &v);
            same(&got, &brute(&q, &docs, &ids, dim, depth));
            // Passes of `batch` queries, as a top-k too large to widen them would run.
            let passes = scan_shard(&q, dim, &v, depth, batch.max(1), true).unwrap();
            same(&named_rows(passes, &v), &got);
            // Sharded in either order equals unsharded.
            let cut = n / 2;
            let a = write(dir.path(), "a", &docs[..cut * dim], &ids[..cut], dim, VecDType::F32);
            let b = write(dir.path(), "b", &docs[cut * dim..], &ids[cut..], dim, VecDType::F32);
            for order in [[&a, &b], [&b, &a]] {
                let merged = search_shards(&q, dim, order.map(Ok), depth, batch).unwrap();
                same(&named(&merged), &got);
            }
        }
    }

    /// The tie rule by example, against the module's words rather than any code: equal scores
    /// (0 and -0 included) rank by doc id descending (as strings), in the search, the sharded
    /// merge, and the brute-force reference the property test trusts.
    #[test]
    fn ties_rank_by_doc_id_descending() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = ["b", "d10", "a", "e", "d9", "f", "c"].map(String::from).to_vec();
        let docs = [1.0f32, 1.0, 2.0, 0.0, 1.0, -0.0, 1.0];
        let v = write(dir.path(), "c", &docs, &ids, 1, VecDType::F32);
        let want = ["a", "d9", "d10", "c", "b", "f", "e"];
        let docids = |hits: &[Named]| hits.iter().map(|h| h.docid.clone()).collect::<Vec<_>>();
        assert_eq!(docids(&brute(&[1.0], &docs, &ids, 1, 7)[0]), want);
        assert_eq!(docids(&named_rows(search_shard(&[1.0], 1, &v, 7, 0).unwrap(), &v)[0]), want);
        // Depth 6 cuts through the 0 / -0 tie: the kept one is "f" by doc id, not "e" by row.
        for depth in [3, 6] {
            assert_eq!(
                docids(&named_rows(search_shard(&[1.0], 1, &v, depth, 0).unwrap(), &v)[0]),
                want[..depth]
            );
        }
        let a = write(dir.path(), "a", &docs[..4], &ids[..4], 1, VecDType::F32);
        let b = write(dir.path(), "b", &docs[4..], &ids[4..], 1, VecDType::F32);
        for order in [[&a, &b], [&b, &a]] {
            for depth in [4, 6, 7] {
                let merged = search_shards(&[1.0], 1, order.map(Ok), depth, 0).unwrap();
                assert_eq!(docids(&named(&merged)[0]), want[..depth]);
            }
        }
    }

    #[test]
    fn many_queries_span_several_query_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (n, nq, dim) = (3000, QUERY_BLOCK + 76, 8);
        let docs: Vec<f32> = (0..n * dim).map(|i| ((i * 7919 % 97) as f32 - 48.0) / 16.0).collect();
        let q: Vec<f32> =
            (0..nq * dim).map(|i| ((i * 104_729 % 89) as f32 - 44.0) / 16.0).collect();
        let ids: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
        let v = write(dir.path(), "c", &docs, &ids, dim, VecDType::F32);
        let want = brute(&q, &docs, &ids, dim, 20);
        // Two and three threads split the queries among them, eight split the corpus.
        for threads in [1, 2, 3, 8] {
            assert_eq!(splits_queries(nq, threads), threads < 8);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for batch in [0, 300, 1000, 1100] {
                let got = pool.install(|| search_shard(&q, dim, &v, 20, batch)).unwrap();
                same(&named_rows(got, &v), &want);
            }
        }
    }

    /// F16 and BF16 files stay in half precision (mapped, not widened on open; the search widens
    /// one block at a time) and score as their f32 values would, over several blocks.
    #[test]
    fn half_precision_rows_stay_half_and_score_as_their_f32_values() {
        let dir = tempfile::tempdir().unwrap();
        let docs: Vec<f32> = (0..3000 * 4).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
        let ids: Vec<String> = (0..3000).map(|i| i.to_string()).collect();
        let q = [0.5f32, -0.25, 1.0, 0.125];
        let want = brute(&q, &docs, &ids, 4, 10);
        for dt in [VecDType::F16, VecDType::BF16] {
            let v = write(dir.path(), dt.name(), &docs, &ids, 4, dt);
            let half = match (dt, v.rows()) {
                (VecDType::F16, Rows::F16(x)) => x.len(),
                (VecDType::BF16, Rows::BF16(x)) => x.len(),
                _ => 0,
            };
            assert_eq!(half, docs.len(), "{} rows were widened on open", dt.name());
            assert!(docs.len() / 4 > 2 * DOC_BLOCK, "several blocks");
            // values are exact in both half formats (multiples of 1/64 below 1)
            same(&named_rows(search_shard(&q, 4, &v, 10, 128).unwrap(), &v), &want);
        }
    }

    #[test]
    fn bad_vectors_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v = write(dir.path(), "c", &[1.0, f32::NAN], &["a".into()], 2, VecDType::F32);
        let e = search_shard(&[1.0, 1.0], 2, &v, 5, 1).unwrap_err().to_string();
        assert!(e.ends_with("row 0 holds a NaN or infinite value"), "{e}");
        // The once-per-shard check finds it too (in a later row, in half precision); the
        // search that trusts it does not look.
        let mut rows = vec![0.5f32; 2 * (DOC_BLOCK + 3)];
        rows[2 * (DOC_BLOCK + 1) + 1] = f32::INFINITY;
        let ids: Vec<String> = (0..DOC_BLOCK + 3).map(|i| i.to_string()).collect();
        let h = write(dir.path(), "h", &rows, &ids, 2, VecDType::F16);
        let e = check_shard_finite(&h).unwrap_err().to_string();
        assert!(
            e.ends_with(&format!("row {} holds a NaN or infinite value", DOC_BLOCK + 1)),
            "{e}"
        );
        assert!(search_checked_shard(&[1.0, 1.0], 2, &h, 5, 0).is_ok());
        // So does a search whose threads split the queries among them.
        let many = vec![1.0f32; 2 * 2 * SPLIT_QUERIES_FROM];
        assert!(splits_queries(many.len() / 2, 2));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let e = pool.install(|| search_shard(&many, 2, &h, 5, 0)).unwrap_err().to_string();
        assert!(
            e.ends_with(&format!("row {} holds a NaN or infinite value", DOC_BLOCK + 1)),
            "{e}"
        );
        let e = search_shard(&[1.0, 1.0, 1.0], 3, &v, 5, 1).unwrap_err().to_string();
        assert!(e.starts_with("query dimension 3 does not match passage dimension 2 of "), "{e}");
        assert!(e.ends_with(&dir.path().join("c").display().to_string()), "{e}");
        // depth beyond the corpus returns what exists
        let v = write(
            dir.path(),
            "d",
            &[1.0, 0.0, 0.0, 1.0],
            &["a".into(), "b".into()],
            2,
            VecDType::F32,
        );
        assert_eq!(search_shard(&[1.0, 2.0], 2, &v, 1000, 0).unwrap()[0].len(), 2);
    }

    /// A query's scores, to the bit, do not depend on how many queries are searched with it:
    /// real-valued vectors (whose sums round), one query alone against the same query among
    /// others (1, 2, 3 and 70 queries), shards whose last block is 1 to 100 rows, widths under
    /// and over 512; nor a row's on whether it ends a shard's last, short block.
    #[test]
    fn a_query_alone_scores_the_same_bits_as_among_others() {
        let mut x = 9u64;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let dir = tempfile::tempdir().unwrap();
        for (dim, last) in
            [(40, 1), (40, 5), (40, 100), (600, 1), (600, 40), (3, 7), (1, 7), (2, 7)]
        {
            let n = 2 * DOC_BLOCK + last;
            let docs: Vec<f32> = (0..n * dim).map(|_| next()).collect();
            // 70 queries: together more than 64, alone 1 (the shapes whose paths differ).
            let q: Vec<f32> = (0..70 * dim).map(|_| next()).collect();
            let shard = |name: &str, docs: &[f32]| {
                let ids: Vec<String> = (0..docs.len() / dim).map(|i| format!("d{i}")).collect();
                write(dir.path(), &format!("{name}{dim}-{last}"), docs, &ids, dim, VecDType::F32)
            };
            let v = shard("c", &docs);
            let depth = n;
            let bits = |hits: &[(f32, u32)]| -> Vec<(u32, u32)> {
                hits.iter().map(|&(s, r)| (s.to_bits(), r)).collect()
            };
            let together = search_shard(&q, dim, &v, depth, 0).unwrap();
            for i in [0, 1, 2, 69] {
                let want = &together[i];
                for group in [&q[i * dim..(i + 1) * dim], &q[..(i + 1) * dim]] {
                    let got = search_shard(group, dim, &v, depth, 0).unwrap();
                    assert_eq!(
                        bits(got.last().unwrap()),
                        bits(want),
                        "dim {dim}, last block {last}, query {i}"
                    );
                }
            }
            // The same rows followed by 300 more: the last block's rows now sit in a full block.
            let mut longer = docs.clone();
            longer.extend((0..300 * dim).map(|_| next()));
            let scores = |v: &Vectors| -> Vec<Vec<u32>> {
                search_shard(&q, dim, v, v.len(), 0)
                    .unwrap()
                    .into_iter()
                    .map(|hits| {
                        let mut by_row = vec![0u32; n];
                        for (s, r) in hits.into_iter().filter(|&(_, r)| (r as usize) < n) {
                            by_row[r as usize] = s.to_bits();
                        }
                        by_row
                    })
                    .collect()
            };
            assert_eq!(scores(&v), scores(&shard("l", &longer)), "dim {dim}, last block {last}");
        }
    }
}
