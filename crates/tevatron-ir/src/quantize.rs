//! Compact codes of embeddings and the integer kernels that score them.
//!
//! Two precisions, as sentence-transformers' `quantize_embeddings` and faiss' quantizers offer:
//!
//! - **int8**: each dimension `d` of a passage is stored as `round(x_d / scale_d)` clamped to
//!   `[-127, 127]`, with `scale_d = max |x_d| / 127` calibrated on the corpus. A query is
//!   folded into the scales (`q_d * scale_d`) and quantized per query to `[-63, 63]`; the
//!   approximate score is the integer dot product of the two codes, which orders a query's
//!   passages as the dequantized inner product does, up to the rounding.
//! - **binary**: the sign bits (`x_d > 0`), packed eight to a byte most significant bit first,
//!   as numpy's `packbits` and sentence-transformers' `ubinary`; the approximate score is minus
//!   the Hamming distance between the query's bits and the passage's.
//!
//! Both are meant for a first pass whose best candidates are rescored with the full-precision
//! vectors ([`crate::compact`]). The kernels return exact integers, so every implementation
//! (portable, AVX2, AVX-512 VNNI and VPOPCNTDQ, AMX-INT8) gives the same scores bit for bit, and a
//! ranking does not depend on the CPU it ran on. The one used is picked at run time by CPU
//! feature.
//!
//! The int8 kernels multiply an unsigned byte by a signed one, as the CPU's instructions do
//! (`vpdpbusd`, `vpmaddubsw`): the query code is stored offset by 64 (`q + 64`, in `[1, 127]`)
//! and the offset is taken back with each row's code sum (`sum_d (q_d + 64) c_d - 64 sum_d c_d`).
//! Why queries use 7 bits: AVX2 has no 8-bit product with 32-bit sums; `vpmaddubsw` adds pairs
//! of products into saturating 16-bit lanes, and `127 x 128 x 2 = 32,512` stays below
//! `i16::MAX` where a full byte would not. The passage side keeps 8 bits, where the corpus'
//! precision matters; the rescoring pass makes up the rest.

use crate::amx;
use crate::{Error, Result};

/// The largest query code: see the module docs.
pub const QUERY_CODE_MAX: f32 = 63.0;

/// The largest passage code (symmetric, so that negation is exact).
pub const PASSAGE_CODE_MAX: f32 = 127.0;

/// The compact forms a corpus can be stored and scanned in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// One signed byte per dimension, with per-dimension scales.
    Int8,
    /// One bit per dimension (the sign).
    Binary,
}

impl Precision {
    /// The name used in flags and file headers.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Int8 => "int8",
            Precision::Binary => "binary",
        }
    }

    /// Parses [`Precision::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "int8" => Some(Precision::Int8),
            "binary" => Some(Precision::Binary),
            _ => None,
        }
    }

    /// Bytes of one row's code at width `dim`.
    pub fn row_bytes(self, dim: usize) -> usize {
        match self {
            Precision::Int8 => dim,
            Precision::Binary => dim.div_ceil(8),
        }
    }
}

/// Per-dimension largest magnitudes, gathered over a corpus to calibrate int8 scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    max_abs: Vec<f32>,
}

impl Calibration {
    /// A calibration of `dim` dimensions that has seen nothing yet.
    pub fn new(dim: usize) -> Self {
        Self { max_abs: vec![0.0; dim] }
    }

    /// Takes rows (`n x dim`, row-major) into account.
    pub fn observe(&mut self, rows: &[f32]) {
        for row in rows.chunks_exact(self.max_abs.len()) {
            for (m, &x) in self.max_abs.iter_mut().zip(row) {
                *m = m.max(x.abs());
            }
        }
    }

    /// Folds in a calibration made over other rows.
    pub fn merge(&mut self, other: &Calibration) {
        for (m, &x) in self.max_abs.iter_mut().zip(&other.max_abs) {
            *m = m.max(x);
        }
    }

    /// The int8 scales: `max |x_d| / 127`, or 1 for a dimension that is always 0.
    pub fn scales(&self) -> Vec<f32> {
        self.max_abs.iter().map(|&m| if m > 0.0 { m / PASSAGE_CODE_MAX } else { 1.0 }).collect()
    }
}

/// A passage row's int8 code (`out.len() == row.len()`).
pub fn encode_int8(row: &[f32], scales: &[f32], out: &mut [i8]) {
    for ((o, &x), &s) in out.iter_mut().zip(row).zip(scales) {
        *o = (x / s).round().clamp(-PASSAGE_CODE_MAX, PASSAGE_CODE_MAX) as i8;
    }
}

/// A row's sign bits, packed most significant bit first (`out.len() == row.len().div_ceil(8)`).
pub fn encode_binary(row: &[f32], out: &mut [u8]) {
    out.fill(0);
    for (i, &x) in row.iter().enumerate() {
        if x > 0.0 {
            out[i / 8] |= 0x80 >> (i % 8);
        }
    }
}

/// The offset added to query codes so that they are unsigned (module docs).
pub const QUERY_OFFSET: i32 = 64;

/// A query's int8 code against passages quantized with `scales`: the query folded into the
/// scales, quantized to `[-63, 63]` with one scale of its own (the only one a ranking needs,
/// so it is not returned), and stored offset by [`QUERY_OFFSET`].
pub fn encode_query_int8(query: &[f32], scales: &[f32], out: &mut [u8]) {
    let folded: Vec<f32> = query.iter().zip(scales).map(|(q, s)| q * s).collect();
    let max = folded.iter().fold(0f32, |m, x| m.max(x.abs()));
    let step = if max > 0.0 { max / QUERY_CODE_MAX } else { 1.0 };
    for (o, x) in out.iter_mut().zip(folded) {
        let code = (x / step).round().clamp(-QUERY_CODE_MAX, QUERY_CODE_MAX) as i32;
        *o = (code + QUERY_OFFSET) as u8;
    }
}

/// Each row's code sum, which takes the query offset back out of a score.
pub fn code_sums(codes: &[i8], dim: usize, out: &mut [i32]) {
    for (o, row) in out.iter_mut().zip(codes.chunks_exact(dim.max(1))) {
        *o = row.iter().map(|&c| c as i32).sum();
    }
}

/// The kernel sets, by the instructions they need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Set {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 for both: `vpmaddubsw` for int8, `vpshufb` nibble counts for binary.
    Avx2,
    /// AVX-512 VNNI (`vpdpbusd`) for int8; for binary, `vpopcntq` where the CPU also has
    /// AVX-512 VPOPCNTDQ, else the AVX2 set's.
    Avx512Vnni,
    /// The AVX-512 VNNI set with AMX's `tdpbssd` for the int8 scan (Xeon from Sapphire
    /// Rapids): sixteen queries by sixteen rows by 64 bytes an instruction.
    Amx,
}

/// The kernels of one CPU. Only [`Kernels::detect`], [`Kernels::from_env`] and
/// [`Kernels::available`] make one, so a value always names instructions this CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels(Set);

impl Set {
    fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Set::Portable => true,
                Set::Avx2 => has!("avx2") && has!("popcnt"),
                Set::Avx512Vnni => {
                    has!("avx512f")
                        && has!("avx512bw")
                        && has!("avx512vnni")
                        && has!("avx2")
                        && has!("popcnt")
                }
                Set::Amx => Set::Avx512Vnni.runs_here() && amx::usable(amx::Product::Int8),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Set::Portable
        }
    }
}

impl Kernels {
    /// The fastest kernels this CPU runs.
    pub fn detect() -> Self {
        *Self::available().last().expect("the portable set runs everywhere")
    }

    /// The kernels `TEVATRON_KERNELS` names (`portable`, `avx2`, `avx512` or `amx`, which this
    /// CPU must run), else the fastest: a user can check that a slower path gives the same
    /// ranking (every set returns exact integers), or search as a CPU without the instructions
    /// would.
    pub fn from_env() -> Result<Self> {
        let name = std::env::var_os("TEVATRON_KERNELS").unwrap_or_default();
        let name = name.to_string_lossy().trim().to_lowercase();
        if name.is_empty() {
            return Ok(Self::detect());
        }
        let set = match name.as_str() {
            "portable" => Set::Portable,
            "avx2" => Set::Avx2,
            "avx512" => Set::Avx512Vnni,
            "amx" => Set::Amx,
            _ => {
                return Err(Error::Invalid(format!(
                    "TEVATRON_KERNELS={name}: give portable, avx2, avx512 or amx"
                )))
            }
        };
        if !set.runs_here() {
            let here: Vec<_> = Self::available().into_iter().map(Self::name).collect();
            return Err(Error::Invalid(format!(
                "TEVATRON_KERNELS={name}: this CPU does not run them (it runs: {})",
                here.join(", ")
            )));
        }
        Ok(Kernels(set))
    }

    /// Every kernel set this CPU can run, the portable one first (for tests).
    pub fn available() -> Vec<Self> {
        [Set::Portable, Set::Avx2, Set::Avx512Vnni, Set::Amx]
            .into_iter()
            .filter(|s| s.runs_here())
            .map(Kernels)
            .collect()
    }

    /// A name for logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            Set::Portable => "portable",
            Set::Avx2 => "AVX2",
            Set::Avx512Vnni => "AVX-512 VNNI",
            Set::Amx => "AMX-INT8",
        }
    }

    /// A name for logs of the instructions that scan codes of `precision`: the set's own for
    /// int8, what [`Kernels::binary_scores`] counts bits with for binary.
    pub fn name_for(self, precision: Precision) -> &'static str {
        match (precision, self.0) {
            (Precision::Int8, _) | (Precision::Binary, Set::Portable) => self.name(),
            (Precision::Binary, Set::Avx512Vnni | Set::Amx) if has_vpopcntdq() => {
                "AVX-512 VPOPCNTDQ"
            }
            (Precision::Binary, _) => "AVX2",
        }
    }

    /// `out[q * rows + j] = sum_d queries[q][d] * codes[j][d]` (unsigned query bytes times
    /// signed code bytes) for `nq` queries of `dim` bytes and `rows` code rows; with the query
    /// offset taken back ([`code_sums`]) this is the signed dot product of the codes.
    pub fn int8_scores(self, dim: usize, queries: &[u8], codes: &[i8], out: &mut [i32]) {
        self.int8_block(dim, codes).scores(&self.int8_queries(dim, queries), out)
    }

    /// Query codes (rows of `dim` bytes) laid out for these kernels' int8 scan, to be scored
    /// against any number of blocks ([`Int8Block::scores`]): AMX reads them as tile rows,
    /// padded to whole tiles and starting on a cache line, which a scan makes once per pass
    /// rather than once per block; the other sets read them as they are.
    pub fn int8_queries(self, dim: usize, queries: &[u8]) -> Int8Queries<'_> {
        let tiles = match self.0 {
            #[cfg(target_arch = "x86_64")]
            Set::Amx => Some(pad_query_rows(dim, queries)),
            _ => None,
        };
        Int8Queries { kernels: self, dim, queries, tiles }
    }

    /// `codes` (rows of `dim` bytes) laid out for these kernels' int8 scan, to be scored
    /// against any number of queries ([`Int8Block::scores`]): a scan lays each block of rows
    /// out once per pass rather than once per batch of queries.
    pub fn int8_block(self, dim: usize, codes: &[i8]) -> Int8Block<'_> {
        let rows = codes.len() / dim.max(1);
        let mut offsets = vec![0i32; rows];
        let layout = match self.0 {
            #[cfg(target_arch = "x86_64")]
            Set::Avx512Vnni => {
                let packed = x86::pack16(dim, codes);
                // The interleaved rows' sums over their first `4 x (dim / 4)` bytes, then the
                // bytes the interleaving leaves out, and the rows past the last group.
                let covered = dim / 4 * 4;
                let interleaved = packed.len() / covered.max(1);
                // SAFETY: this set has AVX-512 VNNI (`Set::runs_here`).
                unsafe { x86::run_sums(&packed, dim / 4, &mut offsets[..interleaved]) };
                let code_rows = codes.chunks_exact(dim.max(1));
                for (r, (o, row)) in offsets.iter_mut().zip(code_rows).enumerate() {
                    let from = if r < interleaved { covered } else { 0 };
                    *o += row[from..].iter().map(|&c| c as i32).sum::<i32>();
                }
                Layout::Interleaved(packed)
            }
            #[cfg(target_arch = "x86_64")]
            Set::Amx => {
                let packed = pack_code_tiles(dim, codes);
                let runs = dim.next_multiple_of(64) / 4;
                // SAFETY: the AMX set has AVX-512 VNNI (`Set::runs_here`).
                unsafe { x86::run_sums(bytemuck::cast_slice(&packed), runs, &mut offsets) };
                Layout::Tiles(packed)
            }
            #[cfg(target_arch = "x86_64")]
            Set::Avx2 => {
                code_sums(codes, dim, &mut offsets);
                Layout::Interleaved(x86::pack16(dim, codes))
            }
            _ => {
                code_sums(codes, dim, &mut offsets);
                Layout::Rows
            }
        };
        offsets.iter_mut().for_each(|o| *o *= QUERY_OFFSET);
        Int8Block { kernels: self, dim, codes, layout, offsets }
    }

    /// `out[q * rows + j] = -hamming(queries[q], codes[j])` for `nq` queries of `width` bytes
    /// and `rows` code rows.
    pub fn binary_scores(self, width: usize, queries: &[u8], codes: &[u8], out: &mut [i32]) {
        self.binary_block(width, codes).scores(queries, out)
    }

    /// `codes` (rows of `width` bytes) laid out for these kernels' binary scan, to be scored
    /// against any number of queries ([`BinaryBlock::scores`]): as [`Kernels::int8_block`], a
    /// scan lays each block out once per pass rather than once per chunk of queries.
    pub fn binary_block(self, width: usize, codes: &[u8]) -> BinaryBlock<'_> {
        let packed = match self.0 {
            #[cfg(target_arch = "x86_64")]
            Set::Avx2 | Set::Avx512Vnni | Set::Amx => x86::pack8_words(width, codes),
            _ => Vec::new(),
        };
        BinaryBlock { kernels: self, width, codes, packed }
    }

    /// The indices `i` of the scores with `scores[i] - taken[i] > floor` (`taken` empty: none
    /// taken), ascending, into `hits` (cleared first): a scan's test of which rows may enter
    /// a query's candidates. Most rows may not, so the test runs on whole vectors of scores and
    /// only the rare hits are handled one by one (in plain Rust it ran four scores at a time
    /// and took a fifth of a binary search).
    pub fn above(self, scores: &[i32], taken: &[i32], floor: i32, hits: &mut Vec<u32>) {
        assert!(taken.is_empty() || taken.len() == scores.len(), "scores and offsets disagree");
        hits.clear();
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the AVX-512 sets have AVX-512F (`Set::runs_here`).
            Set::Avx512Vnni | Set::Amx => unsafe { x86::above_avx512(scores, taken, floor, hits) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the AVX2 set has AVX2.
            Set::Avx2 => unsafe { x86::above_avx2(scores, taken, floor, hits) },
            _ => above_portable(scores, taken, floor, 0, hits),
        }
    }
}

/// [`Kernels::above`] from index `from` on, one score at a time: the reference, and the
/// vector kernels' tail.
fn above_portable(scores: &[i32], taken: &[i32], floor: i32, from: usize, hits: &mut Vec<u32>) {
    for (i, &s) in scores.iter().enumerate().skip(from) {
        if s - taken.get(i).copied().unwrap_or(0) > floor {
            hits.push(i as u32);
        }
    }
}

/// Whether this CPU has AVX-512 VPOPCNTDQ (`vpopcntq`), which the AVX-512 set's binary scan
/// uses when present.
fn has_vpopcntdq() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vpopcntdq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The int8 scan on AMX tiles `T` (the CPU's, or the tests' emulation), through the loop the
/// model's AMX products share ([`amx::products`]): the queries are the tiles' rows and the code
/// rows their channels. A query byte is at most 127, so `tdpbssd`'s signed product of the two
/// bytes is the unsigned-by-signed one of the other kernels. Both operands are laid out for the
/// tiles, each row padded with zeros to whole 64 bytes (which add nothing): the queries row by
/// row (`x`, [`pad_query_rows`], `nq` real rows), the codes by groups of sixteen rows whose
/// four-byte runs sit side by side (`packed`, [`pack_code_tiles`]), each once per pass.
///
/// # Safety
/// The CPU runs `T`'s operations ([`amx::usable`] said so).
#[cfg(any(test, target_arch = "x86_64"))]
unsafe fn int8_tiles<T: amx::Tiles>(
    dim: usize,
    (x, nq): (&[u8], usize),
    codes: &[i8],
    packed: &[u32],
    out: &mut [i32],
) {
    let rows = codes.len() / dim.max(1);
    if nq == 0 || rows == 0 {
        return;
    }
    let width = dim.next_multiple_of(64);
    assert_eq!(x.len(), nq.next_multiple_of(16) * width, "pad_query_rows' layout");
    assert_eq!(packed.len(), rows.next_multiple_of(32) * width / 4, "pack_code_tiles' layout");
    // Whole tiles are stored straight into `out` (`amx::products`' contract).
    assert_eq!(out.len(), nq * rows, "codes and scores disagree");
    // Weight tile `j` of the 32 rows from `c0`, for the row bytes from `at`: group
    // `c0 / 16 + j`, its four-byte runs from `at / 4`, one run of sixteen rows a tile row.
    let runs = width / 4;
    let base = packed.as_ptr().cast::<u8>();
    let weights = |c0: usize, j: usize, at: usize| base.add(((c0 / 16 + j) * runs + at / 4) * 64);
    let (sums_out, len) = (out.as_mut_ptr(), out.len());
    let sums = amx::Sums { start: None, out: Some(sums_out.cast()) };
    amx::products::<T, i32>((x, width, nq), rows, (weights, 64), sums, |r0, c0, sums| {
        // SAFETY: `out`'s values, which `products` writes only between calls of this.
        let out = std::slice::from_raw_parts_mut(sums_out, len);
        for (i, sums) in sums.iter().enumerate().take((nq - r0).min(32)) {
            let at = (r0 + i) * rows + c0;
            let n = (rows - c0).min(32);
            out[at..at + n].copy_from_slice(&sums[..n]);
        }
    });
}

/// `queries` (rows of `dim` bytes) as AMX tile rows: each padded with zeros to whole 64 bytes,
/// the rows padded with zero rows to a whole tile of 16, the first on a cache line.
#[cfg(any(test, target_arch = "x86_64"))]
fn pad_query_rows(dim: usize, queries: &[u8]) -> amx::Aligned<u8> {
    let (nq, width) = (queries.len() / dim.max(1), dim.next_multiple_of(64));
    let mut x = amx::Aligned::<u8>::zeroed(nq.next_multiple_of(16) * width);
    for (padded, query) in x.chunks_exact_mut(width).zip(queries.chunks_exact(dim.max(1))) {
        padded[..dim].copy_from_slice(query);
    }
    x
}

/// `codes` (rows of `dim` bytes) as AMX weight tiles: groups of sixteen rows (as many groups
/// as whole pairs of them need, the missing rows zero), each group `width / 4` runs of 64
/// bytes (`width`: `dim` rounded up to 64), run `t` holding bytes `4t .. 4t + 4` of the
/// group's sixteen rows side by side (zeros past `dim`).
#[cfg(any(test, target_arch = "x86_64"))]
fn pack_code_tiles(dim: usize, codes: &[i8]) -> amx::Aligned<u32> {
    let rows = codes.len() / dim.max(1);
    let (runs, whole) = (dim.next_multiple_of(64) / 4, dim / 4);
    // One u32 holds a row's four bytes of a run: run `t` of group `g` is the sixteen values
    // from `(g * runs + t) * 16`.
    let mut packed = amx::Aligned::<u32>::zeroed(rows.next_multiple_of(32) * runs);
    for (r, row) in codes.chunks_exact(dim.max(1)).enumerate() {
        let group = &mut packed[(r / 16) * runs * 16..][..runs * 16];
        let lane = r % 16;
        for (t, four) in row.chunks_exact(4).enumerate() {
            group[t * 16 + lane] =
                u32::from_ne_bytes([four[0] as u8, four[1] as u8, four[2] as u8, four[3] as u8]);
        }
        if whole * 4 < dim {
            let mut four = [0u8; 4];
            for (f, &c) in four.iter_mut().zip(&row[whole * 4..]) {
                *f = c as u8;
            }
            group[whole * 16 + lane] = u32::from_ne_bytes(four);
        }
    }
    packed
}

/// The reference every other int8 kernel equals bit for bit.
fn int8_portable(dim: usize, queries: &[u8], codes: &[i8], out: &mut [i32]) {
    let rows = codes.len() / dim.max(1);
    for (query, out) in queries.chunks_exact(dim.max(1)).zip(out.chunks_mut(rows.max(1))) {
        for (o, row) in out.iter_mut().zip(codes.chunks_exact(dim.max(1))) {
            *o = row.iter().zip(query).map(|(&c, &q)| c as i32 * q as i32).sum();
        }
    }
}

/// int8 code rows laid out for one kernel set's scan ([`Kernels::int8_block`]).
pub struct Int8Block<'a> {
    kernels: Kernels,
    dim: usize,
    codes: &'a [i8],
    layout: Layout,
    offsets: Vec<i32>,
}

/// How an [`Int8Block`]'s kernels read its rows.
enum Layout {
    /// As they are, row by row (portable).
    Rows,
    /// [`x86::pack16`]'s groups of sixteen rows (AVX2, AVX-512 VNNI).
    #[cfg(target_arch = "x86_64")]
    Interleaved(Vec<i8>),
    /// [`pack_code_tiles`]' weight tiles (AMX).
    #[cfg(target_arch = "x86_64")]
    Tiles(amx::Aligned<u32>),
}

/// int8 query codes laid out for one kernel set's scan ([`Kernels::int8_queries`]).
pub struct Int8Queries<'a> {
    kernels: Kernels,
    dim: usize,
    queries: &'a [u8],
    /// The AMX set's rows ([`pad_query_rows`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    tiles: Option<amx::Aligned<u8>>,
}

impl Int8Block<'_> {
    /// Each row's code sum times [`QUERY_OFFSET`]: what a row's scores carry from the query
    /// offset, to be taken back out of them (the module docs).
    pub fn offsets(&self) -> &[i32] {
        &self.offsets
    }

    /// [`Kernels::int8_scores`] of `queries` against the block's rows. Both come from the
    /// same kernels, laid out for the same width.
    pub fn scores(&self, laid_out: &Int8Queries, out: &mut [i32]) {
        assert!(
            laid_out.kernels == self.kernels && laid_out.dim == self.dim,
            "queries and codes laid out for different scans"
        );
        let (dim, codes, queries) = (self.dim, self.codes, laid_out.queries);
        let (nq, rows) = (queries.len() / dim.max(1), codes.len() / dim.max(1));
        assert_eq!(out.len(), nq * rows, "codes and scores disagree");
        // Above 127 `vpmaddubsw` could saturate (module docs).
        debug_assert!(queries.iter().all(|&q| q <= 127), "query codes come from encode_query_int8");
        match (self.kernels.0, &self.layout) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Kernels` names only a set this CPU runs (`Set::runs_here`); the layout
            // is the one `int8_block` made for this set.
            (Set::Avx2, Layout::Interleaved(packed)) => unsafe {
                x86::int8_avx2(dim, queries, codes, packed, out)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            (Set::Avx512Vnni, Layout::Interleaved(packed)) => unsafe {
                x86::int8_vnni(dim, queries, codes, packed, out)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above; the AMX set is only named where `amx::usable` said so.
            (Set::Amx, Layout::Tiles(packed)) => unsafe {
                let rows = laid_out.tiles.as_deref().expect("laid out by the AMX set");
                int8_tiles::<amx::Int8Tiles>(dim, (rows, nq), codes, packed, out)
            },
            _ => int8_portable(dim, queries, codes, out),
        }
    }
}

/// Binary code rows laid out for one kernel set's scan ([`Kernels::binary_block`]).
pub struct BinaryBlock<'a> {
    kernels: Kernels,
    width: usize,
    codes: &'a [u8],
    /// [`x86::pack8_words`]' interleaving for the SIMD sets; empty for the portable one.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    packed: Vec<u64>,
}

impl BinaryBlock<'_> {
    /// [`Kernels::binary_scores`] of `queries` (rows of the block's width) against the block's
    /// rows.
    pub fn scores(&self, queries: &[u8], out: &mut [i32]) {
        let (width, codes) = (self.width, self.codes);
        let (nq, rows) = (queries.len() / width.max(1), codes.len() / width.max(1));
        assert_eq!(out.len(), nq * rows, "codes and scores disagree");
        match self.kernels.0 {
            Set::Portable => binary_portable(width, queries, codes, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and POPCNT are part of every SIMD set, and a `Kernels` names a set
            // this CPU runs; the AVX-512 sets have AVX-512F, and VPOPCNTDQ is checked here. The
            // layout is the one `binary_block` made for this set.
            Set::Avx2 | Set::Avx512Vnni | Set::Amx => unsafe {
                let packed = &self.packed;
                if self.kernels.0 != Set::Avx2 && has_vpopcntdq() {
                    x86::binary_vpopcnt(width, queries, codes, packed, out)
                } else {
                    x86::binary_avx2(width, queries, codes, packed, out)
                }
            },
            #[cfg(not(target_arch = "x86_64"))]
            _ => binary_portable(width, queries, codes, out),
        }
    }
}

impl BinaryBlock<'_> {
    /// The rows of the block that may enter each query's candidates: for each query `n` of
    /// `queries`, `hits[n]` (cleared first) gets, ascending, every row whose score is above
    /// `floors[n]` (and on some kernels a few that are not), and `out` (laid out as in
    /// [`BinaryBlock::scores`]) the scores of those rows; other scores may be left unwritten.
    /// Where the CPU has `vpopcntq` and the codes are a whole number of words, the scan tests
    /// each group of scores as it makes them; elsewhere every score is made, then tested.
    pub fn scores_above(
        &self,
        queries: &[u8],
        floors: &[i32],
        out: &mut [i32],
        hits: &mut [Vec<u32>],
    ) {
        let (width, codes) = (self.width, self.codes);
        let (nq, rows) = (queries.len() / width.max(1), codes.len() / width.max(1));
        assert!(
            out.len() == nq * rows && floors.len() == nq && hits.len() == nq,
            "codes, floors and scores disagree"
        );
        #[cfg(target_arch = "x86_64")]
        if matches!(self.kernels.0, Set::Avx512Vnni | Set::Amx) && has_vpopcntdq() {
            // SAFETY: the AVX-512 sets have AVX-512F (`Set::runs_here`), VPOPCNTDQ is checked
            // here, and `binary_block` laid the codes out for this set.
            let scanned = unsafe {
                x86::binary_vpopcnt_above(width, queries, rows, &self.packed, (floors, hits), out)
            };
            if scanned {
                // The rows past the last group of eight, one at a time.
                for j in rows / 8 * 8..rows {
                    let row = &codes[j * width..(j + 1) * width];
                    for (n, query) in queries.chunks_exact(width).enumerate() {
                        let score = &mut out[n * rows + j..n * rows + j + 1];
                        binary_portable(width, query, row, score);
                        if score[0] > floors[n] {
                            hits[n].push(j as u32);
                        }
                    }
                }
                return;
            }
        }
        self.scores(queries, out);
        for (n, (hits, &floor)) in hits.iter_mut().zip(floors).enumerate() {
            self.kernels.above(&out[n * rows..(n + 1) * rows], &[], floor, hits);
        }
    }
}

/// The reference every other binary kernel equals bit for bit.
fn binary_portable(width: usize, queries: &[u8], codes: &[u8], out: &mut [i32]) {
    let rows = codes.len() / width.max(1);
    for (query, out) in queries.chunks_exact(width.max(1)).zip(out.chunks_mut(rows.max(1))) {
        for (o, row) in out.iter_mut().zip(codes.chunks_exact(width.max(1))) {
            *o = -(row.iter().zip(query).map(|(&c, &q)| (c ^ q).count_ones() as i32).sum::<i32>());
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::Kernels::above`], sixteen scores a compare; the hits' indices are compressed
    /// into a register and stored whole (a compressing store to memory is slow on some CPUs),
    /// so `hits` keeps sixteen spare slots.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn above_avx512(scores: &[i32], taken: &[i32], floor: i32, hits: &mut Vec<u32>) {
        debug_assert!(hits.is_empty(), "the hits are written from index 0");
        let n = scores.len();
        hits.reserve(n + 16);
        let (out, mut len) = (hits.as_mut_ptr(), 0usize);
        let f = _mm512_set1_epi32(floor);
        let step = _mm512_set1_epi32(16);
        let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut i = 0;
        while i + 16 <= n {
            let mut s = _mm512_loadu_si512(scores.as_ptr().add(i) as *const _);
            if !taken.is_empty() {
                s = _mm512_sub_epi32(s, _mm512_loadu_si512(taken.as_ptr().add(i) as *const _));
            }
            let m = _mm512_cmpgt_epi32_mask(s, f);
            if m != 0 {
                _mm512_storeu_si512(out.add(len) as *mut _, _mm512_maskz_compress_epi32(m, idx));
                len += m.count_ones() as usize;
            }
            idx = _mm512_add_epi32(idx, step);
            i += 16;
        }
        hits.set_len(len);
        super::above_portable(scores, taken, floor, i, hits);
    }

    /// [`super::Kernels::above`], eight scores a compare, the hits taken bit by bit; 32 scores
    /// are compared before any is looked at, since most runs of 32 hold no hit.
    #[target_feature(enable = "avx2")]
    pub unsafe fn above_avx2(scores: &[i32], taken: &[i32], floor: i32, hits: &mut Vec<u32>) {
        let n = scores.len();
        let f = _mm256_set1_epi32(floor);
        // Lanes of the eight scores from `i` above the floor.
        let above = |i: usize| {
            let mut s = _mm256_loadu_si256(scores.as_ptr().add(i) as *const __m256i);
            if !taken.is_empty() {
                let t = _mm256_loadu_si256(taken.as_ptr().add(i) as *const __m256i);
                s = _mm256_sub_epi32(s, t);
            }
            _mm256_cmpgt_epi32(s, f)
        };
        let take = |hits: &mut Vec<u32>, i: usize, lanes: __m256i| {
            let mut m = _mm256_movemask_ps(_mm256_castsi256_ps(lanes)) as u32;
            while m != 0 {
                hits.push((i + m.trailing_zeros() as usize) as u32);
                m &= m - 1;
            }
        };
        let mut i = 0;
        while i + 32 <= n {
            let lanes = [above(i), above(i + 8), above(i + 16), above(i + 24)];
            let any = _mm256_or_si256(
                _mm256_or_si256(lanes[0], lanes[1]),
                _mm256_or_si256(lanes[2], lanes[3]),
            );
            if _mm256_testz_si256(any, any) == 0 {
                for (k, l) in lanes.into_iter().enumerate() {
                    take(hits, i + 8 * k, l);
                }
            }
            i += 32;
        }
        while i + 8 <= n {
            take(hits, i, above(i));
            i += 8;
        }
        super::above_portable(scores, taken, floor, i, hits);
    }

    /// The scalar tail of a row past the last full vector.
    #[inline(always)]
    fn int8_tail(query: &[u8], row: &[i8], from: usize) -> i32 {
        row[from..].iter().zip(&query[from..]).map(|(&c, &q)| c as i32 * q as i32).sum()
    }

    /// The Hamming distance of a row's bytes past the last whole word (`from` on).
    #[inline(always)]
    fn binary_tail(query: &[u8], row: &[u8], from: usize) -> u32 {
        row[from..].iter().zip(&query[from..]).map(|(&c, &q)| (c ^ q).count_ones()).sum()
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// Calls `rows_kernel::<4>` on each group of four queries and `rows_kernel::<1>` on the
    /// rest: a code row is loaded once for four queries.
    macro_rules! by_query_groups {
        ($kernel:ident, $dim:expr, $queries:expr, $codes:expr, $out:expr) => {{
            let (dim, queries, codes, out) = ($dim, $queries, $codes, $out);
            let rows = codes.len() / dim;
            let mut q = 0;
            let nq = queries.len() / dim;
            while q + 4 <= nq {
                $kernel::<4>(
                    dim,
                    &queries[q * dim..(q + 4) * dim],
                    codes,
                    &mut out[q * rows..(q + 4) * rows],
                );
                q += 4;
            }
            while q < nq {
                $kernel::<1>(
                    dim,
                    &queries[q * dim..(q + 1) * dim],
                    codes,
                    &mut out[q * rows..(q + 1) * rows],
                );
                q += 1;
            }
        }};
    }

    /// Calls a packed kernel `kernel::<N>` on each group of `N` queries and `kernel::<1>` on
    /// the rest: query `q` starts at `queries[q * len]` (`len` bytes each) and its scores at
    /// `out[q * rows]`.
    macro_rules! packed_query_groups {
        ($kernel:ident::<$n:literal>($len:expr, $inner:expr, $queries:expr, $packed:expr, $groups:expr, $rows:expr, $out:expr)) => {{
            let (len, queries, rows, out) = ($len, $queries, $rows, &mut *$out);
            let nq = queries.len() / len;
            let mut q = 0;
            while q + $n <= nq {
                $kernel::<$n>(
                    len,
                    $inner,
                    &queries[q * len..],
                    $packed,
                    $groups,
                    rows,
                    &mut out[q * rows..],
                );
                q += $n;
            }
            while q < nq {
                $kernel::<1>(
                    len,
                    $inner,
                    &queries[q * len..],
                    $packed,
                    $groups,
                    rows,
                    &mut out[q * rows..],
                );
                q += 1;
            }
        }};
    }

    /// The scores of the rows past the first `packed_rows` (those a packed kernel leaves):
    /// `score` fills an `nq x rest` scratch, copied into each query's part of `out`.
    fn rest_rows(
        out: &mut [i32],
        nq: usize,
        rows: usize,
        packed_rows: usize,
        score: impl FnOnce(&mut [i32]),
    ) {
        let rest = rows - packed_rows;
        if rest == 0 {
            return;
        }
        let mut tail = vec![0i32; nq * rest];
        score(&mut tail);
        for n in 0..nq {
            out[n * rows + packed_rows..(n + 1) * rows]
                .copy_from_slice(&tail[n * rest..(n + 1) * rest]);
        }
    }

    /// The int8 scan over [`pack16`]'s groups of sixteen rows (`packed`, made once for any
    /// number of queries), shared by the sets that read that layout: `$packed::<N>` scores
    /// groups of `N` queries against every group, `$rows` the rows past the last group, and
    /// the dimensions past the last whole four are added from the rows as they are.
    macro_rules! interleaved_int8 {
        ($packed:ident::<$n:literal>, $rows:ident, $dim:expr, $queries:expr, $codes:expr, $laid:expr, $out:expr) => {{
            let (dim, queries, codes, packed, out): (usize, &[u8], &[i8], &[i8], &mut [i32]) =
                ($dim, $queries, $codes, $laid, $out);
            if dim == 0 {
                return out.fill(0);
            }
            let rows = codes.len() / dim;
            let nq = queries.len() / dim;
            let (groups, quads) = (rows / 16, dim / 4);
            let packed_rows = if quads > 0 { groups * 16 } else { 0 };
            if packed_rows > 0 {
                assert_eq!(packed.len(), groups * quads * 64, "pack16's layout of the codes");
                packed_query_groups!($packed::<$n>(dim, quads, queries, packed, groups, rows, out));
                if quads * 4 < dim {
                    for n in 0..nq {
                        let query = &queries[n * dim..(n + 1) * dim];
                        for j in 0..packed_rows {
                            out[n * rows + j] +=
                                int8_tail(query, &codes[j * dim..(j + 1) * dim], quads * 4);
                        }
                    }
                }
            }
            rest_rows(out, nq, rows, packed_rows, |tail| {
                by_query_groups!($rows, dim, queries, &codes[packed_rows * dim..], tail)
            });
        }};
    }

    /// `vpmaddubsw` (query u8 x code i8, pairs into i16; exact: module docs) widened and summed
    /// by `vpmaddwd` into 32-bit lanes, over [`pack16`]'s groups: a query's four bytes
    /// broadcast against eight rows' four bytes a vector, so that each lane sums one row and
    /// no horizontal sums are needed (row by row, with a horizontal sum at each row's end, the
    /// scan ran at about three fifths of the speed on a Zen 3).
    #[target_feature(enable = "avx2")]
    pub unsafe fn int8_avx2(
        dim: usize,
        queries: &[u8],
        codes: &[i8],
        packed: &[i8],
        out: &mut [i32],
    ) {
        interleaved_int8!(avx2_packed::<4>, avx2_rows, dim, queries, codes, packed, out)
    }

    /// `N` queries against every packed group: sixteen row sums per query and group (two
    /// vectors of eight), written to `out[n * rows + 16 g ..]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2_packed<const N: usize>(
        dim: usize,
        quads: usize,
        queries: &[u8],
        packed: &[i8],
        groups: usize,
        rows: usize,
        out: &mut [i32],
    ) {
        debug_assert!(
            queries.len() >= (N - 1) * dim + quads * 4 && out.len() >= (N - 1) * rows + groups * 16
        );
        let q = queries.as_ptr();
        let ones = _mm256_set1_epi16(1);
        for g in 0..groups {
            let p = packed.as_ptr().add(g * quads * 64);
            let mut lo = [_mm256_setzero_si256(); N];
            let mut hi = [_mm256_setzero_si256(); N];
            for t in 0..quads {
                let c0 = _mm256_loadu_si256(p.add(t * 64) as *const __m256i);
                let c1 = _mm256_loadu_si256(p.add(t * 64 + 32) as *const __m256i);
                for n in 0..N {
                    let four =
                        _mm256_set1_epi32((q.add(n * dim + t * 4) as *const i32).read_unaligned());
                    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(four, c0), ones);
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(four, c1), ones);
                    lo[n] = _mm256_add_epi32(lo[n], p0);
                    hi[n] = _mm256_add_epi32(hi[n], p1);
                }
            }
            for n in 0..N {
                let o = out.as_mut_ptr().add(n * rows + g * 16);
                _mm256_storeu_si256(o as *mut __m256i, lo[n]);
                _mm256_storeu_si256(o.add(8) as *mut __m256i, hi[n]);
            }
        }
    }

    /// One code row at a time against `N` queries (each row's lanes summed at its end): the
    /// rows [`int8_avx2`] leaves past its last group of sixteen.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2_rows<const N: usize>(dim: usize, queries: &[u8], codes: &[i8], out: &mut [i32]) {
        let rows = codes.len() / dim;
        let full = dim / 32 * 32;
        let ones = _mm256_set1_epi16(1);
        for (j, row) in codes.chunks_exact(dim).enumerate() {
            let mut acc = [_mm256_setzero_si256(); N];
            let mut i = 0;
            while i < full {
                let c = _mm256_loadu_si256(row.as_ptr().add(i) as *const __m256i);
                for (n, a) in acc.iter_mut().enumerate() {
                    let q = _mm256_loadu_si256(queries.as_ptr().add(n * dim + i) as *const __m256i);
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(_mm256_maddubs_epi16(q, c), ones));
                }
                i += 32;
            }
            for (n, a) in acc.iter().enumerate() {
                out[n * rows + j] =
                    hsum256(*a) + int8_tail(&queries[n * dim..(n + 1) * dim], row, full);
            }
        }
    }

    /// `vpdpbusd`: query u8 x code i8 summed into 32-bit lanes, no saturation. Rows in groups
    /// of 16 are first interleaved four bytes at a time ([`pack16`]), so that one instruction
    /// adds four dimensions of sixteen rows into sixteen lanes, a query's four bytes broadcast:
    /// no horizontal sums at all. Rows past the last group take [`vnni_rows`].
    ///
    /// `packed` is [`pack16`]'s layout of `codes`, made once for any number of queries.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn int8_vnni(
        dim: usize,
        queries: &[u8],
        codes: &[i8],
        packed: &[i8],
        out: &mut [i32],
    ) {
        interleaved_int8!(vnni_packed::<8>, vnni_rows, dim, queries, codes, packed, out)
    }

    /// The first `groups x 16` rows of `codes` (`groups = rows / 16`), interleaved: for each
    /// group of 16 rows and each of the `quads = dim / 4` runs of four dimensions, the 16 rows'
    /// four bytes side by side (64 bytes, one vector). Dimensions past `4 x quads` are left
    /// out (the `interleaved_int8!` kernels add them). A run is one AVX-512 vector, or two of
    /// AVX2's.
    pub fn pack16(dim: usize, codes: &[i8]) -> Vec<i8> {
        let (groups, quads) = (codes.len() / dim.max(1) / 16, dim / 4);
        if quads == 0 {
            return Vec::new();
        }
        let mut packed = vec![0i8; groups * quads * 64];
        for (g, out) in packed.chunks_exact_mut(quads * 64).enumerate() {
            for r in 0..16 {
                let row = &codes[(g * 16 + r) * dim..][..quads * 4];
                for (t, four) in row.chunks_exact(4).enumerate() {
                    out[t * 64 + r * 4..t * 64 + r * 4 + 4].copy_from_slice(four);
                }
            }
        }
        packed
    }

    /// The code sums of interleaved groups of sixteen rows ([`pack16`]'s and
    /// [`super::pack_code_tiles`]' layouts: `runs` vectors of the sixteen rows' four bytes a
    /// group), into `out` (as many rows as it holds): one `vpdpbusd` by a vector of ones adds a
    /// run of all sixteen rows, with no horizontal sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn run_sums(packed: &[i8], runs: usize, out: &mut [i32]) {
        assert!(packed.len() >= out.len().div_ceil(16) * runs * 64, "interleaved groups of 16");
        let ones = _mm512_set1_epi8(1);
        for (g, out) in out.chunks_mut(16).enumerate() {
            let p = packed.as_ptr().add(g * runs * 64);
            let mut acc = _mm512_setzero_si512();
            for t in 0..runs {
                acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(p.add(t * 64) as *const _));
            }
            let mut sums = [0i32; 16];
            _mm512_storeu_si512(sums.as_mut_ptr() as *mut _, acc);
            out.copy_from_slice(&sums[..out.len()]);
        }
    }

    /// `N` queries (at the start of `queries`, `dim` bytes each) against every packed group:
    /// sixteen row sums per query and group, written to `out[n * rows + 16 g ..]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn vnni_packed<const N: usize>(
        dim: usize,
        quads: usize,
        queries: &[u8],
        packed: &[i8],
        groups: usize,
        rows: usize,
        out: &mut [i32],
    ) {
        debug_assert!(
            queries.len() >= (N - 1) * dim + quads * 4 && out.len() >= (N - 1) * rows + groups * 16
        );
        let q = queries.as_ptr();
        // Two groups at a time: each query's broadcast four bytes feed two products, and 2N
        // independent sums hide the instruction's latency (one group at a time, the broadcasts
        // and their address arithmetic outnumbered the products).
        let mut g = 0;
        while g + 2 <= groups {
            let p0 = packed.as_ptr().add(g * quads * 64);
            let p1 = p0.add(quads * 64);
            let mut acc0 = [_mm512_setzero_si512(); N];
            let mut acc1 = [_mm512_setzero_si512(); N];
            for t in 0..quads {
                let c0 = _mm512_loadu_si512(p0.add(t * 64) as *const _);
                let c1 = _mm512_loadu_si512(p1.add(t * 64) as *const _);
                for n in 0..N {
                    let four =
                        _mm512_set1_epi32((q.add(n * dim + t * 4) as *const i32).read_unaligned());
                    acc0[n] = _mm512_dpbusd_epi32(acc0[n], four, c0);
                    acc1[n] = _mm512_dpbusd_epi32(acc1[n], four, c1);
                }
            }
            for n in 0..N {
                let o = out.as_mut_ptr().add(n * rows + g * 16);
                _mm512_storeu_si512(o as *mut _, acc0[n]);
                _mm512_storeu_si512(o.add(16) as *mut _, acc1[n]);
            }
            g += 2;
        }
        for g in g..groups {
            let p = packed.as_ptr().add(g * quads * 64);
            let mut acc = [_mm512_setzero_si512(); N];
            for t in 0..quads {
                let c = _mm512_loadu_si512(p.add(t * 64) as *const _);
                for (n, a) in acc.iter_mut().enumerate() {
                    let four = (q.add(n * dim + t * 4) as *const i32).read_unaligned();
                    *a = _mm512_dpbusd_epi32(*a, _mm512_set1_epi32(four), c);
                }
            }
            for (n, a) in acc.iter().enumerate() {
                _mm512_storeu_si512(out.as_mut_ptr().add(n * rows + g * 16) as *mut _, *a);
            }
        }
    }

    /// One code row at a time against `N` queries (each row's lanes summed at its end): the
    /// rows [`int8_vnni`] leaves past its last group of sixteen.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn vnni_rows<const N: usize>(dim: usize, queries: &[u8], codes: &[i8], out: &mut [i32]) {
        let rows = codes.len() / dim;
        let full = dim / 64 * 64;
        for (j, row) in codes.chunks_exact(dim).enumerate() {
            let mut acc = [_mm512_setzero_si512(); N];
            let mut i = 0;
            while i < full {
                let c = _mm512_loadu_si512(row.as_ptr().add(i) as *const _);
                for (n, a) in acc.iter_mut().enumerate() {
                    let q = _mm512_loadu_si512(queries.as_ptr().add(n * dim + i) as *const _);
                    *a = _mm512_dpbusd_epi32(*a, q, c);
                }
                i += 64;
            }
            for (n, a) in acc.iter().enumerate() {
                out[n * rows + j] = _mm512_reduce_add_epi32(*a)
                    + int8_tail(&queries[n * dim..(n + 1) * dim], row, full);
            }
        }
    }

    /// A binary scan of every interleaved group: `(width, words, queries, packed, groups, rows,
    /// out)`, as [`vpopcnt_packed`]'s arguments.
    type GroupScan = unsafe fn(usize, usize, &[u8], &[u64], usize, usize, &mut [i32]);

    /// A [`GroupScan`] `$name` compiled for `$features`: `$kernel::<N>` on each group of `N`
    /// queries, `$kernel::<1>` on the rest.
    macro_rules! group_scan {
        ($name:ident, $features:literal, $kernel:ident::<$n:literal>) => {
            #[target_feature(enable = $features)]
            unsafe fn $name(
                width: usize,
                words: usize,
                queries: &[u8],
                packed: &[u64],
                groups: usize,
                rows: usize,
                out: &mut [i32],
            ) {
                packed_query_groups!($kernel::<$n>(
                    width, words, queries, packed, groups, rows, out
                ))
            }
        };
    }

    /// The first `groups x 8` rows of `codes` (`groups = rows / 8`, rows of `width` bytes),
    /// interleaved by 8-byte word: for each group of eight rows and each of the `width / 8`
    /// whole words, the eight rows' words side by side (64 bytes), so that one XOR and one
    /// population count cover a word of several rows against a query's broadcast word. Bytes
    /// past the last whole word are left out ([`interleaved_binary`] adds them).
    pub fn pack8_words(width: usize, codes: &[u8]) -> Vec<u64> {
        let (groups, words) = (codes.len() / width.max(1) / 8, width / 8);
        let mut packed = vec![0u64; groups * words * 8];
        if words == 0 {
            return packed;
        }
        for (g, out) in packed.chunks_exact_mut(words * 8).enumerate() {
            for r in 0..8 {
                let row = &codes[(g * 8 + r) * width..];
                for w in 0..words {
                    out[w * 8 + r] =
                        u64::from_le_bytes(row[w * 8..w * 8 + 8].try_into().expect("8 bytes"));
                }
            }
        }
        packed
    }

    /// The binary scan over [`pack8_words`]' layout of `codes` (`packed`, made once for any
    /// number of queries): `scan` scores every group (queries as [`binary_scores`]); rows past
    /// the last group, and bytes past the last whole word, are added as [`binary_popcnt`] does.
    ///
    /// # Safety
    /// The CPU runs `scan` and POPCNT.
    ///
    /// [`binary_scores`]: super::Kernels::binary_scores
    #[inline]
    unsafe fn interleaved_binary(
        width: usize,
        queries: &[u8],
        codes: &[u8],
        packed: &[u64],
        out: &mut [i32],
        scan: GroupScan,
    ) {
        if width == 0 {
            return out.fill(0);
        }
        let rows = codes.len() / width;
        let nq = queries.len() / width;
        let (groups, words) = (rows / 8, width / 8);
        let packed_rows = if words > 0 { groups * 8 } else { 0 };
        if packed_rows > 0 {
            assert_eq!(packed.len(), groups * words * 8, "pack8_words' layout of the codes");
            scan(width, words, queries, packed, groups, rows, out);
            if words * 8 < width {
                for n in 0..nq {
                    let query = &queries[n * width..(n + 1) * width];
                    for j in 0..packed_rows {
                        let row = &codes[j * width..(j + 1) * width];
                        out[n * rows + j] -= binary_tail(query, row, words * 8) as i32;
                    }
                }
            }
        }
        rest_rows(out, nq, rows, packed_rows, |tail| {
            binary_popcnt(width, queries, &codes[packed_rows * width..], tail)
        });
    }

    /// `vpopcntq` (AVX-512 VPOPCNTDQ, where the AVX-512 set's CPU has it) over
    /// [`pack8_words`]' layout: eight rows' words a vector, four queries sharing each.
    #[target_feature(enable = "avx512f,avx512vpopcntdq,popcnt")]
    pub unsafe fn binary_vpopcnt(
        width: usize,
        queries: &[u8],
        codes: &[u8],
        packed: &[u64],
        out: &mut [i32],
    ) {
        interleaved_binary(width, queries, codes, packed, out, vpopcnt_scan)
    }

    /// The `vpopcntq` [`GroupScan`]: [`vpopcnt_fixed_scan`] at the widths it takes, else
    /// [`vpopcnt_packed`], which broadcasts the query words for each group.
    #[target_feature(enable = "avx512f,avx512vpopcntdq")]
    unsafe fn vpopcnt_scan(
        width: usize,
        words: usize,
        queries: &[u8],
        packed: &[u64],
        groups: usize,
        rows: usize,
        out: &mut [i32],
    ) {
        let args = (width, queries, packed, groups, rows);
        if !vpopcnt_fixed_scan(words, args, out, None) {
            vpopcnt_packed_scan(width, words, queries, packed, groups, rows, out)
        }
    }

    group_scan!(vpopcnt_packed_scan, "avx512f,avx512vpopcntdq", vpopcnt_packed::<4>);

    /// The queries' rows that may score above their floors, the scan and the test in one pass
    /// (see [`super::BinaryBlock::scores_above`]): for each query `n`, `hits[n]` (cleared
    /// first) gets every row of the packed groups whose score is above `floors[n]`, ascending,
    /// and `out` those rows' scores (and the rest of their groups'). Rows past the last group
    /// are left to the caller. False, with no score written (the hits may have been cleared),
    /// where the codes are not of a width [`vpopcnt_fixed_scan`] takes in whole words.
    ///
    /// # Safety
    /// The CPU runs AVX-512F and VPOPCNTDQ; `packed` is [`pack8_words`]' layout of the codes.
    #[target_feature(enable = "avx512f,avx512vpopcntdq")]
    pub unsafe fn binary_vpopcnt_above(
        width: usize,
        queries: &[u8],
        rows: usize,
        packed: &[u64],
        (floors, hits): (&[i32], &mut [Vec<u32>]),
        out: &mut [i32],
    ) -> bool {
        let words = width / 8;
        if !width.is_multiple_of(8) || rows < 8 {
            return false;
        }
        assert_eq!(packed.len(), rows / 8 * words * 8, "pack8_words' layout of the codes");
        hits.iter_mut().for_each(Vec::clear);
        vpopcnt_fixed_scan(
            words,
            (width, queries, packed, rows / 8, rows),
            out,
            Some((floors, hits)),
        )
    }

    /// A scan's arguments: `(width, queries, packed, groups, rows)`, as [`vpopcnt_packed`]'s.
    type FixedArgs<'a> = (usize, &'a [u8], &'a [u64], usize, usize);

    /// Each query's floor and the rows found above it, where a scan tests its scores.
    type Floors<'a> = Option<(&'a [i32], &'a mut [Vec<u32>])>;

    /// [`vpopcnt_fixed`] at the word counts of common embeddings (128 to 1,024 dimensions),
    /// queries in groups whose broadcast words fill at most 24 of the 32 registers (the rest
    /// hold the sums, a word of codes and a floor); false, with nothing done, at other counts.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vpopcntdq")]
    unsafe fn vpopcnt_fixed_scan(
        words: usize,
        args: FixedArgs,
        out: &mut [i32],
        floors: Floors,
    ) -> bool {
        match words {
            2 => vpopcnt_fixed_groups::<4, 2>(args, out, floors),
            4 => vpopcnt_fixed_groups::<4, 4>(args, out, floors),
            6 => vpopcnt_fixed_groups::<4, 6>(args, out, floors),
            8 => vpopcnt_fixed_groups::<3, 8>(args, out, floors),
            12 => vpopcnt_fixed_groups::<2, 12>(args, out, floors),
            16 => vpopcnt_fixed_groups::<1, 16>(args, out, floors),
            _ => return false,
        }
        true
    }

    /// [`vpopcnt_fixed`] on each group of `N` queries, one query at a time on the rest.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vpopcntdq")]
    unsafe fn vpopcnt_fixed_groups<const N: usize, const W: usize>(
        (width, queries, packed, groups, rows): FixedArgs,
        out: &mut [i32],
        mut floors: Floors,
    ) {
        let nq = queries.len() / width;
        let mut q = 0;
        while q < nq {
            let args = (width, &queries[q * width..], packed, groups, rows);
            let out = &mut out[q * rows..];
            let floors = floors.as_mut().map(|(f, h)| (&f[q..], &mut h[q..]));
            if q + N <= nq {
                vpopcnt_fixed::<N, W>(args, out, floors);
                q += N;
            } else {
                vpopcnt_fixed::<1, W>(args, out, floors);
                q += 1;
            }
        }
    }

    /// [`vpopcnt_packed`] for codes of exactly `W` whole words: the `N x W` broadcast query
    /// words are made once and stay in registers across the groups, so each group costs a
    /// load, XOR, count and add a word and query. With `floors`, a group's scores are
    /// compared with each query's floor as they are made and stored only where one is above
    /// it, those rows pushed to the query's hits: a separate test of every stored score
    /// ([`above_avx512`]) had taken a seventh of a binary search at 1M rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vpopcntdq")]
    unsafe fn vpopcnt_fixed<const N: usize, const W: usize>(
        (width, queries, packed, groups, rows): FixedArgs,
        out: &mut [i32],
        mut floors: Floors,
    ) {
        debug_assert!(
            queries.len() >= (N - 1) * width + W * 8
                && packed.len() >= groups * W * 8
                && out.len() >= (N - 1) * rows + groups * 8
        );
        let q = queries.as_ptr();
        let mut query = [[_mm512_setzero_si512(); W]; N];
        for (n, words) in query.iter_mut().enumerate() {
            for (w, word) in words.iter_mut().enumerate() {
                *word =
                    _mm512_set1_epi64((q.add(n * width + w * 8) as *const i64).read_unaligned());
            }
        }
        // A score above the floor is a distance below minus the floor; without floors every
        // distance is. Hits are written through pointers into room made here: a call in the
        // loop (a vector growing) would have the query words kept in memory instead.
        let mut limits = [i64::MAX; N];
        let mut found = [std::ptr::null_mut::<u32>(); N];
        let mut count = [0usize; N];
        if let Some((floors, hits)) = &mut floors {
            for n in 0..N {
                limits[n] = -(floors[n] as i64);
                hits[n].reserve(groups * 8);
                count[n] = hits[n].len();
                found[n] = hits[n].as_mut_ptr();
            }
        }
        for g in 0..groups {
            let p = packed.as_ptr().add(g * W * 8);
            let mut acc = [_mm512_setzero_si512(); N];
            for w in 0..W {
                let c = _mm512_loadu_si512(p.add(w * 8) as *const _);
                for (a, words) in acc.iter_mut().zip(&query) {
                    *a = _mm512_add_epi64(*a, _mm512_popcnt_epi64(_mm512_xor_si512(c, words[w])));
                }
            }
            for (n, a) in acc.iter().enumerate() {
                let mut below = _mm512_cmplt_epi64_mask(*a, _mm512_set1_epi64(limits[n]));
                if below != 0 {
                    let minus = _mm256_sub_epi32(_mm256_setzero_si256(), _mm512_cvtepi64_epi32(*a));
                    let at = out.as_mut_ptr().add(n * rows + g * 8);
                    _mm256_storeu_si256(at as *mut __m256i, minus);
                    if !found[n].is_null() {
                        while below != 0 {
                            *found[n].add(count[n]) = (g * 8) as u32 + below.trailing_zeros();
                            count[n] += 1;
                            below &= below - 1;
                        }
                    }
                }
            }
        }
        if let Some((_, hits)) = &mut floors {
            for n in 0..N {
                // SAFETY: the first `count[n]` are the ones there before and those written
                // above, within the room reserved (a group's rows at most, once each).
                hits[n].set_len(count[n]);
            }
        }
    }

    /// AVX2 (no population count of its own) over [`pack8_words`]' layout: the XOR of
    /// four rows' words with a query's broadcast word, counted a nibble at a time by `vpshufb`
    /// from a table of sixteen counts (Mula, Kurz and Lemire, 2018), the byte counts summed
    /// by `vpsadbw`. The scalar POPCNT loop it replaced ran at well under half the speed on a
    /// Zen 3 (one XOR, count and add per word, and per query).
    #[target_feature(enable = "avx2,popcnt")]
    pub unsafe fn binary_avx2(
        width: usize,
        queries: &[u8],
        codes: &[u8],
        packed: &[u64],
        out: &mut [i32],
    ) {
        interleaved_binary(width, queries, codes, packed, out, avx2_binary_scan)
    }

    group_scan!(avx2_binary_scan, "avx2", nibble_packed::<4>);

    /// `N` queries against every packed group: minus the Hamming distance over the whole
    /// words, eight rows per group, written to `out[n * rows + 8 g ..]`. Byte counts (at most 8
    /// a word) are summed in bytes for up to 31 words at a time, then widened.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibble_packed<const N: usize>(
        width: usize,
        words: usize,
        queries: &[u8],
        packed: &[u64],
        groups: usize,
        rows: usize,
        out: &mut [i32],
    ) {
        debug_assert!(
            queries.len() >= (N - 1) * width + words * 8
                && out.len() >= (N - 1) * rows + groups * 8
        );
        /// Words whose byte counts (at most 8 each) fit a byte: 31 x 8 = 248.
        const BYTE_WORDS: usize = 31;
        let q = queries.as_ptr();
        let zero = _mm256_setzero_si256();
        let low = _mm256_set1_epi8(0x0f);
        #[rustfmt::skip]
        let table = _mm256_setr_epi8(
            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
        );
        let count = |x: __m256i| {
            let lo = _mm256_shuffle_epi8(table, _mm256_and_si256(x, low));
            let hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16::<4>(x), low));
            _mm256_add_epi8(lo, hi)
        };
        // The lanes of `vpsadbw`'s sums (one row each, as 64-bit values), as 32-bit values
        // in the low half.
        let evens = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        for g in 0..groups {
            let p = packed.as_ptr().add(g * words * 8);
            let mut sums = [[zero; 2]; N];
            let mut w0 = 0;
            while w0 < words {
                let end = (w0 + BYTE_WORDS).min(words);
                let mut bytes = [[zero; 2]; N];
                for w in w0..end {
                    let c0 = _mm256_loadu_si256(p.add(w * 8) as *const __m256i);
                    let c1 = _mm256_loadu_si256(p.add(w * 8 + 4) as *const __m256i);
                    for (n, b) in bytes.iter_mut().enumerate() {
                        let word = (q.add(n * width + w * 8) as *const i64).read_unaligned();
                        let word = _mm256_set1_epi64x(word);
                        b[0] = _mm256_add_epi8(b[0], count(_mm256_xor_si256(c0, word)));
                        b[1] = _mm256_add_epi8(b[1], count(_mm256_xor_si256(c1, word)));
                    }
                }
                for (s, b) in sums.iter_mut().zip(&bytes) {
                    s[0] = _mm256_add_epi64(s[0], _mm256_sad_epu8(b[0], zero));
                    s[1] = _mm256_add_epi64(s[1], _mm256_sad_epu8(b[1], zero));
                }
                w0 = end;
            }
            for (n, s) in sums.iter().enumerate() {
                let a = _mm256_permutevar8x32_epi32(s[0], evens);
                let b = _mm256_permutevar8x32_epi32(s[1], evens);
                let d = _mm256_permute2x128_si256::<0x20>(a, b);
                let minus = _mm256_sub_epi32(zero, d);
                _mm256_storeu_si256(out.as_mut_ptr().add(n * rows + g * 8) as *mut __m256i, minus);
            }
        }
    }

    /// `N` queries (at the start of `queries`, `width` bytes each) against every packed group:
    /// minus the Hamming distance over the whole words, eight rows per group, written to
    /// `out[n * rows + 8 g ..]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vpopcntdq")]
    unsafe fn vpopcnt_packed<const N: usize>(
        width: usize,
        words: usize,
        queries: &[u8],
        packed: &[u64],
        groups: usize,
        rows: usize,
        out: &mut [i32],
    ) {
        debug_assert!(
            queries.len() >= (N - 1) * width + words * 8
                && out.len() >= (N - 1) * rows + groups * 8
        );
        let q = queries.as_ptr();
        for g in 0..groups {
            let p = packed.as_ptr().add(g * words * 8);
            let mut acc = [_mm512_setzero_si512(); N];
            for w in 0..words {
                let c = _mm512_loadu_si512(p.add(w * 8) as *const _);
                for (n, a) in acc.iter_mut().enumerate() {
                    let word = (q.add(n * width + w * 8) as *const i64).read_unaligned();
                    let x = _mm512_xor_si512(c, _mm512_set1_epi64(word));
                    *a = _mm512_add_epi64(*a, _mm512_popcnt_epi64(x));
                }
            }
            for (n, a) in acc.iter().enumerate() {
                let d = _mm512_cvtepi64_epi32(*a);
                let minus = _mm256_sub_epi32(_mm256_setzero_si256(), d);
                _mm256_storeu_si256(out.as_mut_ptr().add(n * rows + g * 8) as *mut __m256i, minus);
            }
        }
    }

    /// XOR and POPCNT over 8-byte words, then bytes.
    #[target_feature(enable = "popcnt")]
    pub unsafe fn binary_popcnt(width: usize, queries: &[u8], codes: &[u8], out: &mut [i32]) {
        if width == 0 {
            return out.fill(0);
        }
        by_query_groups!(popcnt_rows, width, queries, codes, out)
    }

    #[inline]
    #[target_feature(enable = "popcnt")]
    unsafe fn popcnt_rows<const N: usize>(
        width: usize,
        queries: &[u8],
        codes: &[u8],
        out: &mut [i32],
    ) {
        let rows = codes.len() / width;
        let words = width / 8;
        let word = |p: *const u8, i: usize| (p.add(i * 8) as *const u64).read_unaligned();
        for (j, row) in codes.chunks_exact(width).enumerate() {
            let mut d = [0u32; N];
            for w in 0..words {
                let c = word(row.as_ptr(), w);
                for (n, d) in d.iter_mut().enumerate() {
                    *d += (c ^ word(queries.as_ptr().add(n * width), w)).count_ones();
                }
            }
            for (n, d) in d.iter().enumerate() {
                let q = &queries[n * width..(n + 1) * width];
                out[n * rows + j] = -((d + binary_tail(q, row, words * 8)) as i32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The log names what scans each precision: the set's own name for int8, and for binary
    /// what `binary_scores` counts bits with (vpopcntq only where the CPU has it, else AVX2).
    #[test]
    fn kernels_name_what_scans_each_precision() {
        for k in Kernels::available() {
            assert_eq!(k.name_for(Precision::Int8), k.name());
            let binary = k.name_for(Precision::Binary);
            let want = match k.0 {
                Set::Portable => "portable",
                Set::Avx512Vnni | Set::Amx if has_vpopcntdq() => "AVX-512 VPOPCNTDQ",
                _ => "AVX2",
            };
            assert_eq!(binary, want, "{}", k.name());
            assert!(!binary.contains("VNNI"), "{binary}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every kernel this CPU runs equals the portable reference bit for bit, at widths that
        /// leave tails after the vector loops and with the extreme codes.
        #[test]
        fn kernels_equal_the_portable_reference(
            dim in 1usize..200, rows in 1usize..80, seed in 0u64..1000, extreme in any::<bool>(),
        ) {
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let mut next = || { x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (x >> 33) as u32 };
            let codes: Vec<i8> = (0..rows * dim)
                .map(|_| if extreme { [-127i8, 127, -128][next() as usize % 3] } else { next() as i8 })
                .collect();
            let nq = 1 + next() as usize % 40;
            let queries: Vec<u8> = (0..nq * dim)
                .map(|_| if extreme { [1u8, 127][next() as usize % 2] } else { 1 + (next() % 127) as u8 })
                .collect();
            let mut want = vec![0; nq * rows];
            int8_portable(dim, &queries, &codes, &mut want);
            let width = dim.div_ceil(8);
            let bits: Vec<u8> = (0..rows * width).map(|_| next() as u8).collect();
            let qbits: Vec<u8> = (0..nq * width).map(|_| next() as u8).collect();
            let mut want_bits = vec![0; nq * rows];
            binary_portable(width, &qbits, &bits, &mut want_bits);
            let mut sums = vec![0; rows];
            code_sums(&codes, dim, &mut sums);
            let offsets: Vec<i32> = sums.iter().map(|s| s * QUERY_OFFSET).collect();
            for k in Kernels::available() {
                // Each call starts from values no kernel writes, so a score left unwritten fails.
                let mut got = vec![i32::MIN; nq * rows];
                let block = k.int8_block(dim, &codes);
                block.scores(&k.int8_queries(dim, &queries), &mut got);
                prop_assert_eq!(&got, &want, "{}", k.name());
                prop_assert_eq!(block.offsets(), &offsets[..], "{}", k.name());
                // A block is laid out once and scored again, against other queries.
                let (half, mut again) = (nq / 2 * dim, vec![i32::MIN; nq / 2 * rows]);
                block.scores(&k.int8_queries(dim, &queries[..half]), &mut again);
                prop_assert_eq!(&again[..], &want[..nq / 2 * rows], "{}", k.name());
                got.fill(i32::MIN);
                k.int8_scores(dim, &queries, &codes, &mut got);
                prop_assert_eq!(&got, &want, "{}", k.name());
                got.fill(i32::MIN);
                k.binary_scores(width, &qbits, &bits, &mut got);
                prop_assert_eq!(&got, &want_bits, "{}", k.name());
                // A binary block too is laid out once and scored against other queries.
                let bits_block = k.binary_block(width, &bits);
                let mut again = vec![i32::MIN; nq / 2 * rows];
                bits_block.scores(&qbits[..nq / 2 * width], &mut again);
                prop_assert_eq!(&again[..], &want_bits[..nq / 2 * rows], "{}", k.name());
            }
        }
    }

    /// The widths of common embeddings (whose `vpopcntq` scan holds the query words in
    /// registers) and their neighbours: every kernel's scores equal the reference, and the
    /// rows it finds above each query's floor hold every row whose reference score is above
    /// it, ascending, with that score; at row counts that leave rows past the last group of
    /// eight, and query counts that leave queries past the last group.
    #[test]
    fn binary_scans_at_embedding_widths_find_the_rows_above_each_floor() {
        let mut x = 5u64;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u32
        };
        for width in [8, 16, 17, 24, 32, 40, 48, 49, 64, 96, 100, 128, 136] {
            for (rows, nq) in [(5, 3), (8, 4), (37, 7), (256, 9), (64, 1)] {
                let codes: Vec<u8> = (0..rows * width).map(|_| next() as u8).collect();
                let queries: Vec<u8> = (0..nq * width).map(|_| next() as u8).collect();
                let mut want = vec![0; nq * rows];
                binary_portable(width, &queries, &codes, &mut want);
                // Floors around each query's median score, one below every score, one above.
                let floors: Vec<i32> = (0..nq)
                    .map(|n| match n % 4 {
                        0 => i32::MIN,
                        1 => 1,
                        _ => want[n * rows + next() as usize % rows] - (next() % 3) as i32,
                    })
                    .collect();
                for k in Kernels::available() {
                    let block = k.binary_block(width, &codes);
                    let mut got = vec![i32::MIN; nq * rows];
                    block.scores(&queries, &mut got);
                    assert_eq!(got, want, "{} width {width} rows {rows}", k.name());
                    let mut scores = vec![1; nq * rows];
                    // Stale hits from an earlier block are cleared.
                    let mut hits = vec![vec![u32::MAX]; nq];
                    block.scores_above(&queries, &floors, &mut scores, &mut hits);
                    for (n, hits) in hits.iter().enumerate() {
                        let above: Vec<u32> = (0..rows as u32)
                            .filter(|&j| want[n * rows + j as usize] > floors[n])
                            .collect();
                        assert!(hits.is_sorted_by(|a, b| a < b), "{} {hits:?}", k.name());
                        assert!(
                            above.iter().all(|j| hits.contains(j)),
                            "{} width {width} rows {rows} query {n}: {hits:?} misses some of {above:?}",
                            k.name()
                        );
                        for &j in hits {
                            let j = n * rows + j as usize;
                            assert_eq!(scores[j], want[j], "{} width {width}", k.name());
                        }
                    }
                }
            }
        }
    }

    /// Binary codes wider than the AVX2 kernel's byte counters hold (31 words): every bit
    /// different, the most each byte can count, and random bits, against the reference.
    #[test]
    fn wide_binary_codes_equal_the_reference() {
        let (width, rows, nq) = (8 * 70 + 3, 19, 5);
        let mut x = 11u64;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8
        };
        let random: Vec<u8> = (0..rows * width).map(|_| next()).collect();
        let mut queries = vec![0u8; nq * width];
        queries[width..].iter_mut().for_each(|b| *b = next());
        for (all_set, codes) in [(true, vec![0xffu8; rows * width]), (false, random)] {
            let mut want = vec![0; nq * rows];
            binary_portable(width, &queries, &codes, &mut want);
            if all_set {
                assert_eq!(want[0], -8 * width as i32, "query 0 is all zeros");
            }
            for k in Kernels::available() {
                let mut got = vec![1; nq * rows];
                k.binary_scores(width, &queries, &codes, &mut got);
                assert_eq!(got, want, "{}", k.name());
            }
        }
    }

    /// The AMX scan on the emulated instruction at shapes chosen rather than drawn: widths of
    /// whole tiles (64, 384) and not, query and row counts of whole tile pairs, whose sums are
    /// stored straight into the scores, and of part tiles.
    #[test]
    fn the_amx_scan_on_whole_and_part_tiles() {
        for (dim, rows, nq) in [(64, 64, 32), (128, 32, 16), (384, 40, 20), (3, 33, 17)] {
            let codes: Vec<i8> = (0..rows * dim).map(|i| (i * 37 % 255) as u8 as i8).collect();
            let queries: Vec<u8> = (0..nq * dim).map(|i| 1 + (i * 53 % 127) as u8).collect();
            let mut want = vec![0; nq * rows];
            int8_portable(dim, &queries, &codes, &mut want);
            let mut got = vec![-1; nq * rows];
            let packed = pack_code_tiles(dim, &codes);
            // SAFETY: the emulation runs on any CPU.
            let padded = pad_query_rows(dim, &queries);
            unsafe {
                int8_tiles::<amx::emulation::Emulated<amx::emulation::Tdpbssd>>(
                    dim,
                    (&padded, nq),
                    &codes,
                    &packed,
                    &mut got,
                )
            };
            assert_eq!(got, want, "{dim} x {rows}, {nq} queries");
        }
    }

    /// The code sums taken from the AMX layout (`run_sums` by ones over the tiles), on any CPU
    /// with AVX-512 VNNI: the AMX set's offsets without needing AMX.
    #[test]
    fn code_sums_from_the_tile_layout() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            for (dim, rows) in [(3, 5), (64, 32), (100, 47), (384, 70)] {
                let codes: Vec<i8> = (0..rows * dim).map(|i| (i * 91 % 255) as u8 as i8).collect();
                let mut want = vec![0; rows];
                code_sums(&codes, dim, &mut want);
                let packed = pack_code_tiles(dim, &codes);
                let mut got = vec![0; rows];
                // SAFETY: AVX-512 VNNI and BW checked above.
                unsafe {
                    x86::run_sums(
                        bytemuck::cast_slice(&packed),
                        dim.next_multiple_of(64) / 4,
                        &mut got,
                    )
                };
                assert_eq!(got, want, "{dim} x {rows}");
            }
        } else {
            // Said, not passed in silence: this CPU cannot run the kernel under test.
            eprintln!("SKIPPED code_sums_from_the_tile_layout: this CPU lacks AVX-512 VNNI or BW");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// The AMX scan's layout and loop, on the emulated `tdpbssd` (so on any CPU), equal the
        /// portable reference bit for bit: widths off and on whole tiles, query and row counts
        /// that leave part tiles and whole ones (stored straight into the scores).
        #[test]
        fn the_amx_scan_equals_the_portable_reference(
            dim in 1usize..140, rows in 1usize..70, nq in 1usize..40, seed in 0u64..1000,
        ) {
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(3);
            let mut next = || { x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (x >> 33) as u32 };
            let codes: Vec<i8> = (0..rows * dim).map(|_| next() as i8).collect();
            let queries: Vec<u8> = (0..nq * dim).map(|_| 1 + (next() % 127) as u8).collect();
            let mut want = vec![0; nq * rows];
            int8_portable(dim, &queries, &codes, &mut want);
            let mut got = vec![-1; nq * rows];
            // SAFETY: the emulation runs on any CPU.
            let packed = pack_code_tiles(dim, &codes);
            let padded = pad_query_rows(dim, &queries);
            unsafe { int8_tiles::<amx::emulation::Emulated<amx::emulation::Tdpbssd>>(dim, (&padded, nq), &codes, &packed, &mut got) };
            prop_assert_eq!(got, want);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every set's candidate test finds the reference's rows, in order, with and without
        /// offsets taken, at lengths that leave tails and with floors at the extremes.
        #[test]
        fn candidate_tests_equal_the_reference(
            n in 0usize..100, seed in 0u64..1000, with_taken in any::<bool>(), floor_pick in 0u8..4,
        ) {
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(7);
            let mut next = || { x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (x >> 40) as i32 - (1 << 23) };
            let scores: Vec<i32> = (0..n).map(|_| next()).collect();
            let taken: Vec<i32> = if with_taken { (0..n).map(|_| next() / 4).collect() } else { vec![] };
            let floor = [i32::MIN, i32::MAX, 0, next()][floor_pick as usize];
            let mut want = Vec::new();
            above_portable(&scores, &taken, floor, 0, &mut want);
            for k in Kernels::available() {
                let mut got = vec![7u32; 3]; // cleared first
                k.above(&scores, &taken, floor, &mut got);
                prop_assert_eq!(&got, &want, "{}", k.name());
            }
        }
    }

    /// The reference itself, by hand: the offset form and the Hamming count.
    #[test]
    fn reference_scores_by_hand() {
        let mut out = [0];
        int8_portable(2, &[2, 70], &[10, -1], &mut out);
        assert_eq!(out[0], 10 * 2 + -70);
        let mut sums = [0; 2];
        code_sums(&[10, -1, 127, -128], 2, &mut sums);
        assert_eq!(sums, [9, -1]);
        binary_portable(1, &[0b1010_0000], &[0b0110_0001], &mut out);
        assert_eq!(out[0], -3);
        let mut hits = Vec::new();
        above_portable(&[5, 1, 9, 4], &[], 4, 0, &mut hits);
        assert_eq!(hits, [0, 2], "strictly above the floor");
        above_portable(&[5, 1, 9, 4], &[2, 0, 0, -1], 4, 1, &mut hits);
        assert_eq!(hits, [0, 2, 2, 3], "appended from index 1, offsets taken");
    }

    #[test]
    fn codes_follow_the_documented_rules() {
        let mut c = Calibration::new(3);
        c.observe(&[0.5, -2.0, 0.0, -1.0, 1.0, 0.0]);
        let scales = c.scales();
        assert_eq!(scales, [1.0 / 127.0, 2.0 / 127.0, 1.0]);
        let mut code = [0i8; 3];
        encode_int8(&[-1.0, 1.0, 0.3], &scales, &mut code);
        assert_eq!(code, [-127, 64, 0]); // -1 / (1/127), 1 / (2/127) = 63.5 rounds away, 0.3 / 1
        encode_int8(&[5.0, -5.0, 0.0], &scales, &mut code);
        assert_eq!(code, [127, -127, 0], "clamped");
        let mut q = [0u8; 3];
        encode_query_int8(&[63.5, -127.0, 0.0], &scales, &mut q);
        // folded: 0.5, -2, 0; step 2/63: 15.75 rounds to 16; offset by 64
        assert_eq!(q, [16 + 64, 1, 64]);
        let mut bits = [0u8; 2];
        encode_binary(&[1.0, -1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0], &mut bits);
        assert_eq!(bits, [0b1001_0000, 0b1000_0000]);
    }
}
