//! The on-disk embeddings format: one safetensors file per shard holding `embeddings` `[N, D]`
//! (F32, F16 or BF16) and `ids`, a U8 tensor with the ids' UTF-8 joined by `\n`.
//! `__metadata__` records the model, pooling, normalization and dtype.
//!
//! Python reads it in three lines:
//! ```python
//! from safetensors.numpy import load_file
//! t = load_file("corpus.0.safetensors")
//! reps, ids = t["embeddings"], bytes(t["ids"]).decode().split("\n")
//! ```
//! [`VectorWriter`] streams rows to disk as they come (only the ids stay in memory) and renames
//! the file into place when done; [`Vectors`] memory-maps a file for search.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::atomic::AtomicFile;
use crate::{Error, Result};

/// The element type of stored embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VecDType {
    /// 32-bit float (the default).
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl VecDType {
    /// The safetensors spelling.
    pub fn name(self) -> &'static str {
        match self {
            VecDType::F32 => "F32",
            VecDType::F16 => "F16",
            VecDType::BF16 => "BF16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            VecDType::F32 => 4,
            VecDType::F16 | VecDType::BF16 => 2,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "F32" => Some(VecDType::F32),
            "F16" => Some(VecDType::F16),
            "BF16" => Some(VecDType::BF16),
            _ => None,
        }
    }
}

/// Writes an embeddings file row by row; see the module docs for the layout.
pub struct VectorWriter {
    file: AtomicFile,
    dim: usize,
    dtype: VecDType,
    rows: usize,
    ids: Vec<u8>,
    metadata: BTreeMap<String, String>,
    header_room: usize,
}

fn header_json(
    rows: u64,
    dim: u64,
    dtype: VecDType,
    ids_len: u64,
    metadata: &BTreeMap<String, String>,
) -> String {
    // Saturating so that the u64::MAX placeholders used to size the header cannot overflow.
    let emb_bytes = rows.saturating_mul(dim).saturating_mul(dtype.size() as u64);
    let header = serde_json::json!({
        "__metadata__": metadata,
        "embeddings": {"dtype": dtype.name(), "shape": [rows, dim], "data_offsets": [0, emb_bytes]},
        "ids": {"dtype": "U8", "shape": [ids_len], "data_offsets": [emb_bytes, emb_bytes.saturating_add(ids_len)]},
    });
    header.to_string()
}

impl VectorWriter {
    /// Opens a temporary file beside `path`; the header is written by [`VectorWriter::finish`].
    pub fn create(
        path: &Path,
        dim: usize,
        dtype: VecDType,
        mut metadata: BTreeMap<String, String>,
    ) -> Result<Self> {
        metadata.insert("format".into(), "tevatron-embeddings-v1".into());
        metadata.insert("dtype".into(), dtype.name().to_lowercase());
        // Room for the largest header these numbers can produce (20 digits each), rounded to 8
        // so the data stays 8-byte aligned; the real header is padded with spaces to fit.
        let max = header_json(u64::MAX, u64::MAX, dtype, u64::MAX, &metadata);
        let header_room = (max.len() + 8).div_ceil(8) * 8;
        let mut file = AtomicFile::create(path)?;
        let zeros = vec![0u8; header_room + 8];
        file.writer()
            .write_all(&zeros)
            .map_err(|e| Error::Write { path: path.into(), source: e })?;
        Ok(Self { file, dim, dtype, rows: 0, ids: Vec::new(), metadata, header_room })
    }

    /// Appends rows (`ids.len()` rows of `dim` values, row-major) converted to the file dtype.
    pub fn push(&mut self, rows: &[f32], ids: &[impl AsRef<str>]) -> Result<()> {
        assert_eq!(rows.len(), ids.len() * self.dim, "rows and ids disagree");
        for id in ids {
            let id = id.as_ref();
            if id.contains('\n') {
                return Err(Error::Invalid(format!(
                    "id {id:?} contains a newline, which the embeddings format cannot store"
                )));
            }
            if self.rows > 0 {
                self.ids.push(b'\n');
            }
            self.ids.extend_from_slice(id.as_bytes());
            self.rows += 1;
        }
        let bytes: Vec<u8> = match self.dtype {
            VecDType::F32 => bytemuck::cast_slice(rows).to_vec(),
            VecDType::F16 => rows.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
            VecDType::BF16 => rows.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        };
        let w = self.file.writer();
        w.write_all(&bytes).map_err(|e| self.file.err(e))
    }

    /// Number of rows written so far.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no row has been written.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Writes the ids and the header, then renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        // A file with rows but only empty ids would be ambiguous with one empty id; the
        // separator-count rule (rows - 1 newlines) keeps it exact.
        let ids = std::mem::take(&mut self.ids);
        let w = self.file.writer();
        w.write_all(&ids).map_err(|e| self.file.err(e))?;
        let mut header = header_json(
            self.rows as u64,
            self.dim as u64,
            self.dtype,
            ids.len() as u64,
            &self.metadata,
        );
        assert!(header.len() <= self.header_room, "header room is an upper bound");
        header.extend(std::iter::repeat_n(' ', self.header_room - header.len()));
        let path = self.file.target().to_path_buf();
        let err = |source| Error::Write { path: path.clone(), source };
        let w = self.file.writer();
        w.flush().map_err(err)?;
        let f = w.get_mut();
        f.seek(SeekFrom::Start(0)).map_err(err)?;
        f.write_all(&(header.len() as u64).to_le_bytes()).map_err(err)?;
        f.write_all(header.as_bytes()).map_err(err)?;
        f.seek(SeekFrom::End(0)).map_err(err)?;
        self.file.commit()
    }
}

/// The embedding rows of a file, borrowed from the memory map.
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a> {
    /// F32 rows.
    F32(&'a [f32]),
    /// F16 rows.
    F16(&'a [f16]),
    /// BF16 rows.
    BF16(&'a [bf16]),
}

impl<'a> Rows<'a> {
    /// Asks the CPU to start fetching row `r`'s cache lines (a hint: nothing is read, nothing
    /// can fault). Rescoring reads candidate rows scattered over a memory map far larger than
    /// the caches; without a hint each row's loads wait on memory in turn (86% of the
    /// rescoring's samples stalled on them in a binary search of 1M x 384).
    #[inline]
    pub fn prefetch(&self, dim: usize, r: usize) {
        let bytes: &[u8] = match self {
            Rows::F32(x) => bytemuck::cast_slice(&x[r * dim..(r + 1) * dim]),
            Rows::F16(x) => bytemuck::cast_slice(&x[r * dim..(r + 1) * dim]),
            Rows::BF16(x) => bytemuck::cast_slice(&x[r * dim..(r + 1) * dim]),
        };
        #[cfg(target_arch = "x86_64")]
        for line in bytes.chunks(64) {
            // SAFETY: a prefetch of an address inside the borrowed row; SSE is part of x86-64.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = bytes;
    }

    /// Rows `start..end` as f32: borrowed when the file holds F32, else widened into
    /// `scratch` (a buffer reused across blocks) and borrowed from there.
    pub fn block<'b>(
        &self,
        dim: usize,
        start: usize,
        end: usize,
        scratch: &'b mut Vec<f32>,
    ) -> &'b [f32]
    where
        'a: 'b,
    {
        match self {
            Rows::F32(x) => &x[start * dim..end * dim],
            _ => {
                self.to_f32(dim, start, end, scratch);
                scratch
            }
        }
    }

    /// Converts rows `start..end` to f32 into `out` (cleared first). Half precision widens a
    /// slice at a time (`half`'s F16C path for F16 where the CPU has it), not value by value:
    /// per value, the run-time dispatch cost more than the conversion (13% of an int8 search
    /// rescoring F16 rows).
    pub fn to_f32(&self, dim: usize, start: usize, end: usize, out: &mut Vec<f32>) {
        out.clear();
        let range = start * dim..end * dim;
        match self {
            Rows::F32(x) => out.extend_from_slice(&x[range]),
            Rows::F16(x) => widen(&x[range], out),
            Rows::BF16(x) => widen(&x[range], out),
        }
    }

    /// The inner product of row `r` with each of `queries` (`dim` values each), into `out`,
    /// each summed in eight independent lanes (each a product added to its lane, the lanes then
    /// summed in order, then the values past the last eight): the same bits whether the row is
    /// stored in F32, F16 or BF16, since widening a half-precision value is exact, and whatever
    /// the other queries. Where the CPU has AVX and F16C, F32 and F16 rows take eight values a
    /// register (F16 widened in registers, not through a scratch row: rescoring an F16 corpus
    /// spent more on that copy than on the products), and four queries at a time: the row is
    /// loaded once for the four, and four sums are in flight where a single sum waits on each
    /// add in turn (rescoring 6,980 queries' candidates one query at a time spent a fifth of an
    /// int8 search in that loop).
    pub fn dots(&self, dim: usize, r: usize, queries: &[&[f32]], out: &mut [f32]) {
        assert!(queries.iter().all(|q| q.len() == dim) && out.len() == queries.len());
        let range = r * dim..(r + 1) * dim;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("f16c")
        {
            match self {
                // SAFETY: AVX and F16C checked just above; every query is as long as the row.
                Rows::F32(x) => return unsafe { x86::dots(&x[range], queries, out) },
                // SAFETY: as above.
                Rows::F16(x) => return unsafe { x86::dots(&x[range], queries, out) },
                Rows::BF16(_) => {}
            }
        }
        for (query, out) in queries.iter().zip(out) {
            *out = match self {
                Rows::F32(x) => dot_lanes(&x[range.clone()], query, |v| v),
                Rows::F16(x) => dot_lanes(&x[range.clone()], query, f16::to_f32),
                Rows::BF16(x) => dot_lanes(&x[range.clone()], query, bf16::to_f32),
            };
        }
    }
}

/// [`Rows::dots`]' order over values widened by `widen`.
#[inline]
fn dot_lanes<T: Copy>(row: &[T], query: &[f32], widen: impl Fn(T) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let (cr, cq) = (row.chunks_exact(8), query.chunks_exact(8));
    let tail: f32 = cr.remainder().iter().zip(cq.remainder()).map(|(&x, y)| widen(x) * y).sum();
    for (x, y) in cr.zip(cq) {
        for i in 0..8 {
            lanes[i] += widen(x[i]) * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// [`dot_lanes`] in AVX registers: a multiply then an add per lane (no fused multiply-add,
/// which would round once where the portable order rounds twice), so the same bits.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Row values that [`dots`] loads eight at a time as F32 lanes.
    pub trait Wide: Copy {
        /// Eight values from `p`, widened.
        ///
        /// # Safety
        /// Eight values are readable at `p`; the CPU has AVX and F16C.
        unsafe fn load8(p: *const Self) -> __m256;
        /// One value, widened (exact).
        fn widen(self) -> f32;
    }

    impl Wide for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        fn widen(self) -> f32 {
            self
        }
    }

    impl Wide for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        }
        #[inline(always)]
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }

    /// `out[i]` = the dot of `row` with `queries[i]`, four queries at a time (the rest together).
    ///
    /// # Safety
    /// The CPU has AVX and F16C; every query is at least as long as `row`.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn dots<T: Wide>(row: &[T], queries: &[&[f32]], out: &mut [f32]) {
        let mut groups = queries.chunks_exact(4);
        let mut outs = out.chunks_exact_mut(4);
        for (group, out) in (&mut groups).zip(&mut outs) {
            lanes::<T, 4>(row, group, out);
        }
        // The one to three left over together, as short runs (a row few queries want) are.
        let (rest, out) = (groups.remainder(), outs.into_remainder());
        match rest.len() {
            3 => lanes::<T, 3>(row, rest, out),
            2 => lanes::<T, 2>(row, rest, out),
            1 => lanes::<T, 1>(row, rest, out),
            _ => {}
        }
    }

    /// `N` queries' sums, each in [`super::dot_lanes`]' order.
    #[inline(always)]
    unsafe fn lanes<T: Wide, const N: usize>(row: &[T], queries: &[&[f32]], out: &mut [f32]) {
        let n = row.len() / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); N];
        for i in (0..n).step_by(8) {
            let x = T::load8(row.as_ptr().add(i));
            for (acc, query) in acc.iter_mut().zip(queries) {
                let y = _mm256_loadu_ps(query.as_ptr().add(i));
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, y));
            }
        }
        for ((acc, query), out) in acc.iter().zip(queries).zip(out) {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
            let tail: f32 = row[n..].iter().zip(&query[n..]).map(|(&x, y)| x.widen() * y).sum();
            *out = lanes.iter().sum::<f32>() + tail;
        }
    }
}

/// `x` widened into `out` (empty) a slice at a time.
fn widen<H>(x: &[H], out: &mut Vec<f32>)
where
    [H]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    out.resize(x.len(), 0.0);
    x.convert_to_f32_slice(out);
}

/// The ids of a file, held compactly: one UTF-8 buffer and the start of each id (a `Vec<String>`
/// would cost ~40 bytes of headers and allocation per row, 40 MB per million passages).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ids {
    text: String,
    starts: Vec<usize>,
}

impl Ids {
    /// Splits `\n`-joined ids; `rows` says how many there are (0 rows is the empty text).
    fn parse(text: &str, rows: usize) -> Self {
        // `rows` comes from the file's header: it may not size an allocation on its own.
        let mut starts = Vec::with_capacity(rows.min(text.len()) + 2);
        if rows > 0 {
            starts.push(0);
            starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        }
        starts.push(text.len() + 1);
        Self { text: text.to_owned(), starts }
    }
    /// Number of ids.
    pub fn len(&self) -> usize {
        self.starts.len() - 1
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `i`-th id.
    pub fn get(&self, i: usize) -> &str {
        let (a, b) = (self.starts[i], self.starts[i + 1] - 1);
        debug_assert!(a <= b && b <= self.text.len());
        // SAFETY: starts are 0, one past each '\n' (ASCII) and len + 1, so every range lies on
        // char boundaries within the text.
        unsafe { self.text.get_unchecked(a..b) }
    }
    /// All ids in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

impl std::ops::Index<usize> for Ids {
    type Output = str;
    fn index(&self, i: usize) -> &str {
        self.get(i)
    }
}

enum Storage {
    Mapped {
        map: memmap2::Mmap,
        start: usize,
        len: usize,
    },
    /// Unaligned file data copied into words, so that it is 4-byte aligned (a `Vec<u8>`,
    /// empty or not, promises no alignment); the length in bytes beside.
    Owned(Vec<u32>, usize),
    Floats(Vec<f32>),
}

/// The first `k` of each `dim`-wide row (row-major), re-normalised to unit length when
/// `renormalize` (as `torch.nn.functional.normalize`: divided by `max(norm, 1e-12)`): a
/// Matryoshka representation cut to `k` dimensions.
pub fn truncate(rows: &[f32], dim: usize, k: usize, renormalize: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() / dim.max(1) * k);
    for row in rows.chunks_exact(dim.max(1)) {
        let cut = &row[..k.min(dim)];
        let scale = if renormalize {
            1.0 / cut.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12)
        } else {
            1.0
        };
        out.extend(cut.iter().map(|x| x * scale));
    }
    out
}

/// A memory-mapped embeddings file.
pub struct Vectors {
    path: PathBuf,
    storage: Storage,
    dtype: VecDType,
    rows: usize,
    dim: usize,
    /// Shared, so a ranking names its hits without copying a shard's ids.
    ids: std::sync::Arc<Ids>,
    metadata: BTreeMap<String, String>,
}

/// The widest embeddings a file may hold: far beyond any model's (a few thousand), low enough
/// that buffers sized by a width always fit in memory.
pub const MAX_DIM: usize = 1 << 20;

impl Vectors {
    /// Opens and validates an embeddings file written by `tevatron encode`.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |what: String| Error::Embeddings { path: path.to_path_buf(), what };
        let (map, data_start, meta) = crate::safetensors_check::map(path, "safetensors file")?;
        let emb = meta.info("embeddings").ok_or_else(|| bad("no `embeddings` tensor".into()))?;
        let dtype = VecDType::from_name(&format!("{:?}", emb.dtype)).ok_or_else(|| {
            bad(format!("embeddings dtype {:?} is not F32, F16 or BF16", emb.dtype))
        })?;
        let [rows, dim] = emb.shape[..] else {
            return Err(bad(format!("embeddings must be 2-D, found shape {:?}", emb.shape)));
        };
        if dim == 0 {
            return Err(bad(format!("embeddings have width 0 (shape {:?})", emb.shape)));
        }
        // A header may claim any width when it holds no rows; buffers sized by it (an int8
        // calibration, a query's scratch) would then fail to allocate.
        if dim > MAX_DIM {
            return Err(bad(format!(
                "embeddings of width {dim}: more than {MAX_DIM} dimensions is not an embeddings file"
            )));
        }
        let ids_info = meta.info("ids").ok_or_else(|| bad("no `ids` tensor".into()))?;
        if format!("{:?}", ids_info.dtype) != "U8" {
            return Err(bad("`ids` must be a U8 tensor".into()));
        }
        let ids_bytes =
            &map[data_start + ids_info.data_offsets.0..data_start + ids_info.data_offsets.1];
        let ids_text =
            std::str::from_utf8(ids_bytes).map_err(|_| bad("`ids` is not valid UTF-8".into()))?;
        let ids = Ids::parse(ids_text, rows);
        if ids.len() != rows {
            return Err(bad(format!("{} ids for {rows} embedding rows", ids.len())));
        }
        let (start, end) = emb.data_offsets;
        let (start, len) = (data_start + start, end - start);
        let aligned = (map.as_ptr() as usize + start).is_multiple_of(4);
        let storage = if aligned {
            Storage::Mapped { map, start, len }
        } else {
            let mut words = vec![0u32; len.div_ceil(4)];
            bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..len]
                .copy_from_slice(&map[start..start + len]);
            Storage::Owned(words, len)
        };
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        let ids = std::sync::Arc::new(ids);
        Ok(Self { path: path.to_path_buf(), storage, dtype, rows, dim, ids, metadata })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows
    }
    /// Whether the file holds no rows.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }
    /// Vector width.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Stored element type.
    pub fn dtype(&self) -> VecDType {
        self.dtype
    }
    /// Row ids in order.
    pub fn ids(&self) -> &Ids {
        &self.ids
    }
    /// The row ids as a shared handle: kept by a ranking (mining keeps one per chunk of queries)
    /// at the cost of a reference count, where a copy would cost the whole id table.
    pub fn shared_ids(&self) -> std::sync::Arc<Ids> {
        std::sync::Arc::clone(&self.ids)
    }
    /// The `__metadata__` map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// These vectors cut to their first `k` dimensions (re-normalised when `renormalize`), held
    /// in memory as F32 with the same ids, path and metadata (`truncate_dim` added).
    pub fn truncated(&self, k: usize, renormalize: bool) -> Result<Vectors> {
        if k == 0 || k > self.dim {
            return Err(Error::Embeddings {
                path: self.path.clone(),
                what: format!("cannot be cut to {k} dimensions: its vectors have {}", self.dim),
            });
        }
        let mut floats = Vec::with_capacity(self.rows * k);
        let mut scratch = Vec::new();
        for start in (0..self.rows).step_by(4096) {
            let end = (start + 4096).min(self.rows);
            let block = self.rows().block(self.dim, start, end, &mut scratch);
            floats.extend(truncate(block, self.dim, k, renormalize));
        }
        let mut metadata = self.metadata.clone();
        metadata.insert("truncate_dim".into(), k.to_string());
        Ok(Vectors {
            path: self.path.clone(),
            storage: Storage::Floats(floats),
            dtype: VecDType::F32,
            rows: self.rows,
            dim: k,
            ids: std::sync::Arc::clone(&self.ids),
            metadata,
        })
    }

    /// The rows, borrowed without copying.
    pub fn rows(&self) -> Rows<'_> {
        let bytes: &[u8] = match &self.storage {
            Storage::Mapped { map, start, len } => &map[*start..*start + *len],
            Storage::Owned(words, len) => &bytemuck::cast_slice::<u32, u8>(words)[..*len],
            Storage::Floats(v) => bytemuck::cast_slice(v),
        };
        match self.dtype {
            VecDType::F32 => Rows::F32(bytemuck::cast_slice(bytes)),
            VecDType::F16 => Rows::F16(bytemuck::cast_slice(bytes)),
            VecDType::BF16 => Rows::BF16(bytemuck::cast_slice(bytes)),
        }
    }

    /// All rows as f32 (a copy; meant for queries and tests, not for corpora).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::new();
        self.rows().to_f32(self.dim, 0, self.rows, &mut out);
        out
    }
}

/// Expands a glob into a sorted list of files, as Tevatron's `sorted(glob.glob(...))`.
pub fn expand_glob(pattern: &str) -> Result<Vec<PathBuf>> {
    let options = GLOB_OPTIONS;
    let paths = glob::glob_with(pattern, options)
        .map_err(|e| Error::Glob(format!("invalid glob {pattern:?}: {e}")))?;
    let mut files = Vec::new();
    for p in paths {
        let p = p.map_err(|e| Error::Glob(format!("reading glob {pattern:?}: {e}")))?;
        // Files only: a pattern such as `data/**/*` matches the folders on the way too.
        if !p.is_dir() {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() && Path::new(pattern).is_dir() {
        let dir = pattern.trim_end_matches('/');
        return Err(Error::Glob(format!(
            "{pattern:?} is a folder: give its files (a quoted glob such as '{dir}/*.jsonl' or \
             '{dir}/*.safetensors')"
        )));
    }
    if files.is_empty() {
        return Err(Error::Glob(format!("no file matches {pattern:?}")));
    }
    Ok(files)
}

/// As a shell (and Hugging Face's data-file patterns): `*` does not match a leading dot, so
/// hidden files stay out.
const GLOB_OPTIONS: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: false,
    require_literal_leading_dot: true,
};

/// Whether [`expand_glob`] would give `path` for `pattern` once the file exists: a command
/// that writes beside its inputs checks that its outputs would not be read back as inputs
/// by the same pattern. False for a pattern that is not a valid glob.
pub fn glob_would_match(pattern: &str, path: &Path) -> bool {
    // `expand_glob` walks the pattern a path component at a time, so `*` never crosses a `/`.
    // Both are compared as real paths from the root: the pattern's leading folders without
    // wildcards, and the path's folder, resolved (symbolic links, `.`; so `--output_dir "$PWD"`
    // and a relative glob name the same files), the resolved part escaped (a folder named
    // `g[1]` is not a wildcard).
    let options = glob::MatchOptions { require_literal_separator: true, ..GLOB_OPTIONS };
    let cwd = std::env::current_dir().unwrap_or_default();
    let real = |p: PathBuf| -> PathBuf {
        p.canonicalize().unwrap_or_else(|_| {
            p.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect()
        })
    };
    let wild = |c: &std::path::Component| c.as_os_str().to_string_lossy().contains(['*', '?', '[']);
    // The current folder is literal whatever its name; the pattern's own folders up to the
    // first wildcard too.
    let given = Path::new(pattern);
    let literal = cwd.join(given.components().take_while(|c| !wild(c)).collect::<PathBuf>());
    let rest: PathBuf = given.components().skip_while(|c| !wild(c)).collect();
    let mut glob = glob::Pattern::escape(&real(literal).to_string_lossy());
    if !rest.as_os_str().is_empty() {
        glob = format!("{glob}/{}", rest.to_string_lossy());
    }
    let path = cwd.join(path);
    let (Some(folder), Some(name)) = (path.parent(), path.file_name()) else { return false };
    let path = real(folder.to_path_buf()).join(name);
    glob::Pattern::new(&glob).is_ok_and(|p| p.matches_path_with(&path, options))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `*` leaves hidden files out, as Python's glob and a shell do.
    #[test]
    fn globs_skip_hidden_files() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["a.jsonl", ".h.jsonl"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let got = expand_glob(&format!("{}/*.jsonl", dir.path().display())).unwrap();
        assert_eq!(got, [dir.path().join("a.jsonl")]);
        // A folder is no file; given alone, the error says to give its files.
        let e = expand_glob(&dir.path().display().to_string()).unwrap_err().to_string();
        assert!(e.contains("is a folder: give its files"), "{e}");
    }

    /// Row `r`'s dot with one query.
    fn dot(rows: &Rows, dim: usize, r: usize, query: &[f32]) -> f32 {
        let mut out = 0.0;
        rows.dots(dim, r, &[query], std::slice::from_mut(&mut out));
        out
    }

    /// Values in [-1.5, 1.5) from a seeded generator.
    fn values(seed: u64) -> impl FnMut() -> f32 {
        let mut x = seed;
        move || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
        }
    }

    /// A row's inner product is the same bits from F32, F16 and BF16 storage of the same
    /// (half-representable) values, on this CPU's F16C path and the portable one alike.
    #[test]
    fn row_dots_agree_bit_for_bit_across_storage() {
        let mut next = values(12345);
        for dim in [1, 7, 8, 9, 16, 31, 384, 385] {
            let rows = 3;
            let values: Vec<f32> = (0..rows * dim).map(|_| next()).collect();
            let query: Vec<f32> = (0..dim).map(|_| next()).collect();
            let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
            let widened: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
            let bfloats: Vec<bf16> = widened.iter().map(|&v| bf16::from_f32(v)).collect();
            let bf_widened: Vec<f32> = bfloats.iter().map(|h| h.to_f32()).collect();
            for r in 0..rows {
                let want = dot(&Rows::F32(&widened), dim, r, &query);
                assert_eq!(
                    dot(&Rows::F16(&halves), dim, r, &query).to_bits(),
                    want.to_bits(),
                    "f16 {dim}"
                );
                let portable = dot_lanes(&halves[r * dim..(r + 1) * dim], &query, f16::to_f32);
                assert_eq!(portable.to_bits(), want.to_bits(), "portable f16 {dim}");
                let want = dot(&Rows::F32(&bf_widened), dim, r, &query);
                assert_eq!(
                    dot(&Rows::BF16(&bfloats), dim, r, &query).to_bits(),
                    want.to_bits(),
                    "bf16 {dim}"
                );
                let direct: f32 =
                    widened[r * dim..(r + 1) * dim].iter().zip(&query).map(|(a, b)| a * b).sum();
                assert!(
                    (dot(&Rows::F32(&widened), dim, r, &query) - direct).abs() <= 1e-4 * dim as f32
                );
            }
        }
    }

    /// Several queries against a row at once (four at a time on AVX, then the rest) give each
    /// query the bits of the portable one-query order, for every storage.
    #[test]
    fn many_queries_against_a_row_give_each_its_own_dot() {
        let mut next = values(777);
        for dim in [1, 8, 13, 384] {
            let rows = 2;
            let values: Vec<f32> = (0..rows * dim).map(|_| next()).collect();
            let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
            let bfloats: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
            for nq in [1, 2, 3, 4, 5, 6, 7, 9] {
                let queries: Vec<Vec<f32>> =
                    (0..nq).map(|_| (0..dim).map(|_| next()).collect()).collect();
                let views: Vec<&[f32]> = queries.iter().map(|q| q.as_slice()).collect();
                for r in 0..rows {
                    let row = r * dim..(r + 1) * dim;
                    let want = |q: &[f32]| {
                        [
                            dot_lanes(&values[row.clone()], q, |v| v),
                            dot_lanes(&halves[row.clone()], q, f16::to_f32),
                            dot_lanes(&bfloats[row.clone()], q, bf16::to_f32),
                        ]
                    };
                    let stores = [Rows::F32(&values), Rows::F16(&halves), Rows::BF16(&bfloats)];
                    for (s, rows) in stores.iter().enumerate() {
                        let mut got = vec![0f32; nq];
                        rows.dots(dim, r, &views, &mut got);
                        for (q, got) in views.iter().zip(&got) {
                            assert_eq!(
                                got.to_bits(),
                                want(q)[s].to_bits(),
                                "dim {dim}, {nq} queries, store {s}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn write_then_read_every_dtype() {
        let dir = tempfile::tempdir().unwrap();
        for dtype in [VecDType::F32, VecDType::F16, VecDType::BF16] {
            let path = dir.path().join(format!("e.{}.safetensors", dtype.name()));
            let mut meta = BTreeMap::new();
            meta.insert("pooling".to_string(), "mean".to_string());
            let mut w = VectorWriter::create(&path, 3, dtype, meta).unwrap();
            w.push(&[1.0, 2.0, 3.0], &["a"]).unwrap();
            w.push(&[-0.5, 0.25, 4.0, 0.0, 1.5, -2.0], &["b c", "é"]).unwrap();
            w.finish().unwrap();
            let v = Vectors::open(&path).unwrap();
            assert_eq!((v.len(), v.dim(), v.dtype()), (3, 3, dtype));
            assert_eq!(v.ids().iter().collect::<Vec<_>>(), ["a", "b c", "é"]);
            assert_eq!(v.to_f32(), [1.0, 2.0, 3.0, -0.5, 0.25, 4.0, 0.0, 1.5, -2.0]);
            assert_eq!(v.metadata()["pooling"], "mean");
            assert_eq!(v.metadata()["dtype"], dtype.name().to_lowercase());
        }
    }

    /// A file of no rows may claim any width: one beyond [`MAX_DIM`] is refused (an int8 index
    /// of it failed to allocate its calibration and panicked).
    #[test]
    fn a_width_beyond_any_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.safetensors");
        let w = VectorWriter::create(&path, MAX_DIM + 1, VecDType::F32, BTreeMap::new()).unwrap();
        w.finish().unwrap();
        let e = Vectors::open(&path).err().unwrap().to_string();
        assert!(e.contains(&format!("width {}: more than", MAX_DIM + 1)), "{e}");
        let path = dir.path().join("widest.safetensors");
        VectorWriter::create(&path, MAX_DIM, VecDType::F32, BTreeMap::new())
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(Vectors::open(&path).unwrap().dim(), MAX_DIM);
    }

    #[test]
    fn truncation_cuts_and_renormalises() {
        let rows = [3.0f32, 4.0, 12.0, 0.0, 0.0, 5.0];
        assert_eq!(truncate(&rows, 3, 2, false), [3.0, 4.0, 0.0, 0.0]);
        assert_eq!(truncate(&rows, 3, 2, true), [0.6, 0.8, 0.0, 0.0], "a zero prefix stays zero");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.safetensors");
        let mut w = VectorWriter::create(&path, 3, VecDType::BF16, BTreeMap::new()).unwrap();
        w.push(&rows, &["a", "b"]).unwrap();
        w.finish().unwrap();
        let v = Vectors::open(&path).unwrap();
        let e = v.truncated(4, true).err().unwrap().to_string();
        assert!(e.ends_with("cannot be cut to 4 dimensions: its vectors have 3"), "{e}");
        let t = v.truncated(2, true).unwrap();
        assert_eq!((t.dim(), t.len(), t.dtype()), (2, 2, VecDType::F32));
        assert_eq!(t.to_f32(), [0.6, 0.8, 0.0, 0.0]);
        assert_eq!(t.ids().iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(t.metadata()["truncate_dim"], "2");
    }

    #[test]
    fn empty_and_single_empty_id_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.safetensors");
        VectorWriter::create(&path, 2, VecDType::F32, BTreeMap::new()).unwrap().finish().unwrap();
        assert_eq!(Vectors::open(&path).unwrap().len(), 0);
        let mut w = VectorWriter::create(&path, 2, VecDType::F32, BTreeMap::new()).unwrap();
        w.push(&[1.0, 2.0], &[""]).unwrap();
        w.finish().unwrap();
        assert_eq!(Vectors::open(&path).unwrap().ids().iter().collect::<Vec<_>>(), [""]);
    }

    /// Embeddings that start off a 4-byte boundary (another writer put a one-byte tensor
    /// first) are read by copy, 0 rows or 2.
    #[test]
    fn unaligned_embeddings_are_read_empty_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.safetensors");
        for rows in [0usize, 2] {
            let values: Vec<f32> = (0..rows * 2).map(|i| i as f32 + 0.5).collect();
            let ids = if rows == 0 { String::new() } else { "a\nb".to_string() };
            let emb_end = 1 + 4 * values.len();
            let mut header = serde_json::json!({
                "pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                "embeddings": {"dtype": "F32", "shape": [rows, 2], "data_offsets": [1, emb_end]},
                "ids": {"dtype": "U8", "shape": [ids.len()], "data_offsets": [emb_end, emb_end + ids.len()]},
            })
            .to_string();
            while !header.len().is_multiple_of(8) {
                header.push(' ');
            }
            let mut file = (header.len() as u64).to_le_bytes().to_vec();
            file.extend(header.as_bytes());
            file.push(7);
            file.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            file.extend(ids.as_bytes());
            std::fs::write(&path, file).unwrap();
            let v = Vectors::open(&path).unwrap();
            assert_eq!(v.len(), rows);
            assert_eq!(v.to_f32(), values);
        }
    }

    #[test]
    fn newline_in_id_is_refused_and_no_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.safetensors");
        let mut w = VectorWriter::create(&path, 1, VecDType::F32, BTreeMap::new()).unwrap();
        let err = w.push(&[1.0], &["a\nb"]).unwrap_err();
        assert!(err.to_string().contains("contains a newline"), "{err}");
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.safetensors");
        let mut w = VectorWriter::create(&path, 2, VecDType::F32, BTreeMap::new()).unwrap();
        w.push(&[1.0, 2.0], &["x"]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = Vectors::open(&path).err().unwrap().to_string();
        assert!(err.contains("not a readable safetensors file"), "{err}");
    }
}
