//! Random access to the rows of JSONL, `.jsonl.gz` and Parquet files without holding them in
//! memory, for training: a sampler asks for row 7,341,002 of an 8.8M-passage corpus and gets
//! it from a memory map.
//!
//! Each input file gets an on-disk cache folder, built once and reused while the file's path,
//! size and modification time stay the same: `index.bin` holds one 16-byte entry per non-blank
//! row (byte offset, length, source line). Plain JSONL is indexed in place; gzip and Parquet
//! inputs are first written out as plain JSONL (`rows.jsonl`). A [`DocIndex`] adds a sorted
//! `(hash(docid), row)` table so that ids resolve to rows by binary search, also from a map.
//! Cache files are written under temporary names and renamed, so an interrupted build is
//! simply rebuilt.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::atomic::AtomicFile;
use crate::records::{id_field, open_jsonl};
use crate::{Error, Result};

const ENTRY: usize = 16;

/// One indexed input file.
struct Part {
    source: PathBuf,
    data: Option<Mmap>,
    index: Option<Mmap>,
    rows: usize,
}

impl Part {
    fn entry(&self, row: usize) -> (usize, usize, usize) {
        let idx = self.index.as_deref().unwrap_or(&[]);
        let e = &idx[row * ENTRY..(row + 1) * ENTRY];
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&e[r]);
            u64::from_le_bytes(b) as usize
        };
        (word(0..8), word(8..12), word(12..16))
    }
}

/// The rows of several files, addressed by one 0-based position across them (files in order).
pub struct RowStore {
    parts: Vec<Part>,
    starts: Vec<usize>,
}

/// One row: its JSON object and where it came from.
pub struct Row<'a> {
    /// The parsed object.
    pub value: Value,
    /// The input file.
    pub path: &'a Path,
    /// 1-based line (row, for Parquet) in that file.
    pub line: usize,
    /// Its position in the store.
    pub row: usize,
}

/// A file's identity as a name: its stem and a hash of its real path, size and modification
/// time, so that anything derived from the file (a row index, the parts of an encode) is
/// known stale once the file changes.
pub fn cache_key(path: &Path) -> Result<String> {
    use std::hash::{Hash, Hasher};
    let meta =
        std::fs::metadata(path).map_err(|source| Error::Read { path: path.into(), source })?;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut h = crate::fxhash::FxHasher::default();
    canonical.hash(&mut h);
    meta.len().hash(&mut h);
    if let Ok(t) = meta.modified() {
        t.hash(&mut h);
    }
    let stem = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(format!("{stem}-{:016x}", h.finish()))
}

fn map(path: &Path) -> Result<Option<Mmap>> {
    let file = File::open(path).map_err(|source| Error::Read { path: path.into(), source })?;
    let len = file.metadata().map_err(|source| Error::Read { path: path.into(), source })?.len();
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: the mapping is read-only; cache files are only ever replaced by rename, never
    // modified in place, and inputs are not expected to change while training reads them.
    let m =
        unsafe { Mmap::map(&file) }.map_err(|source| Error::Read { path: path.into(), source })?;
    Ok(Some(m))
}

/// Writes `path` through [`AtomicFile`] (temporary name, then rename).
fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    fill(file.writer()).map_err(|e| file.err(e))?;
    file.commit()
}

fn push_entry(out: &mut Vec<u8>, offset: usize, len: usize, line: usize) {
    out.extend_from_slice(&(offset as u64).to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&(line as u32).to_le_bytes());
}

fn build_part(source: &Path, cache_root: &Path) -> Result<Part> {
    crate::records::check_readable(source)?;
    let dir = cache_root.join(cache_key(source)?);
    let index_path = dir.join("index.bin");
    let plain = !source.extension().is_some_and(|e| e == "gz" || e == "parquet");
    let data_path = if plain { source.to_path_buf() } else { dir.join("rows.jsonl") };
    if !index_path.is_file() {
        std::fs::create_dir_all(&dir)
            .map_err(|source| Error::Write { path: dir.clone(), source })?;
        let mut index = Vec::new();
        if plain {
            if let Some(data) = map(source)? {
                // A UTF-8 byte-order mark before the first row is no part of it.
                let bom = crate::records::bom_len(&data);
                let mut offset = bom;
                for (i, line) in data[bom..].split(|&b| b == b'\n').enumerate() {
                    if line.iter().any(|b| !b.is_ascii_whitespace()) {
                        push_entry(&mut index, offset, line.len(), i + 1);
                    }
                    offset += line.len() + 1;
                }
            }
        } else {
            // Decompress or convert once into plain JSONL beside the index. A reader error
            // (file:line) is kept aside so that it is reported as itself, not as a write error.
            let mut reader = open_jsonl(source)?;
            let mut bad_input = None;
            let written = write_atomic(&data_path, |w| {
                let mut offset = 0;
                while let Some(item) = reader.next_object() {
                    let (line, value) = match item {
                        Ok(x) => x,
                        Err(e) => {
                            bad_input = Some(e);
                            return Err(std::io::Error::other("bad input row"));
                        }
                    };
                    let text = serde_json::to_vec(&value).map_err(std::io::Error::other)?;
                    w.write_all(&text)?;
                    w.write_all(b"\n")?;
                    push_entry(&mut index, offset, text.len(), line);
                    offset += text.len() + 1;
                }
                Ok(())
            });
            if let Some(e) = bad_input {
                return Err(e);
            }
            written?;
        }
        write_atomic(&index_path, |w| w.write_all(&index))?;
    }
    let index = map(&index_path)?;
    let rows = index.as_ref().map_or(0, |m| m.len() / ENTRY);
    Ok(Part { source: source.to_path_buf(), data: map(&data_path)?, index, rows })
}

impl RowStore {
    /// Indexes `files` (in order), building missing caches under `cache_root`.
    pub fn open(files: &[PathBuf], cache_root: &Path) -> Result<Self> {
        let mut parts = Vec::with_capacity(files.len());
        let mut starts = vec![0];
        for f in files {
            let part = build_part(f, cache_root)?;
            starts.push(starts.last().copied().unwrap_or(0) + part.rows);
            parts.push(part);
        }
        Ok(Self { parts, starts })
    }

    /// Number of rows across all files.
    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where row `row` comes from: its file and 1-based line.
    pub fn location(&self, row: usize) -> (&Path, usize) {
        let (p, r) = self.locate(row);
        (&self.parts[p].source, self.parts[p].entry(r).2)
    }

    fn locate(&self, row: usize) -> (usize, usize) {
        let p = self.starts.partition_point(|&s| s <= row) - 1;
        (p, row - self.starts[p])
    }

    /// The raw text of row `row` (`row < len()`).
    pub fn text(&self, row: usize) -> Result<&str> {
        let (p, r) = self.locate(row);
        let part = &self.parts[p];
        let (offset, len, line) = part.entry(r);
        let data = part.data.as_deref().unwrap_or(&[]);
        let bytes = data.get(offset..offset + len).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: the file changed since it was indexed; delete the cache and retry",
                part.source.display()
            ))
        })?;
        std::str::from_utf8(bytes).map_err(|_| Error::NotUtf8 { path: part.source.clone(), line })
    }

    /// Row `row` parsed as a JSON object.
    pub fn get(&self, row: usize) -> Result<Row<'_>> {
        let (path, line) = self.location(row);
        let value = crate::records::parse_row(self.text(row)?, path, line)?;
        Ok(Row { value, path, line, row })
    }
}

/// Maps ids (a corpus's `docid`) to rows of a [`RowStore`] through a sorted, memory-mapped
/// `(hash, row)` table; hash collisions are settled by reading the candidate rows.
pub struct DocIndex {
    table: Option<Mmap>,
    field: String,
}

fn id_hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = crate::fxhash::FxHasher::default();
    id.hash(&mut h);
    // SplitMix64's finaliser spreads FxHash's output over all 64 bits.
    let mut z = h.finish();
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl DocIndex {
    /// Builds (or reuses) the index of `field` over `store`, cached under `cache_root` with a
    /// key derived from `files`. Fails on a row without the field, naming file and line.
    pub fn open(
        store: &RowStore,
        files: &[PathBuf],
        field: &str,
        cache_root: &Path,
    ) -> Result<Self> {
        let mut key = String::new();
        for f in files {
            key.push_str(&cache_key(f)?);
        }
        use std::hash::{Hash, Hasher};
        let mut h = crate::fxhash::FxHasher::default();
        key.hash(&mut h);
        let dir = cache_root.join(format!("ids-{field}-{:016x}", h.finish()));
        let path = dir.join("ids.bin");
        if !path.is_file() {
            std::fs::create_dir_all(&dir)
                .map_err(|source| Error::Write { path: dir.clone(), source })?;
            let mut pairs: Vec<(u64, u32)> = Vec::with_capacity(store.len());
            for row in 0..store.len() {
                let r = store.get(row)?;
                let id = id_field(&r.value, field, r.path, r.line)?;
                pairs.push((id_hash(&id), row as u32));
            }
            pairs.sort_unstable();
            write_atomic(&path, |w| {
                for (hash, row) in &pairs {
                    w.write_all(&hash.to_le_bytes())?;
                    w.write_all(&row.to_le_bytes())?;
                }
                Ok(())
            })?;
        }
        Ok(Self { table: map(&path)?, field: field.to_string() })
    }

    fn pair(table: &[u8], i: usize) -> (u64, usize) {
        let e = &table[i * 12..(i + 1) * 12];
        let mut h = [0u8; 8];
        h.copy_from_slice(&e[..8]);
        let mut r = [0u8; 4];
        r.copy_from_slice(&e[8..]);
        (u64::from_le_bytes(h), u32::from_le_bytes(r) as usize)
    }

    /// The row whose id equals `id`, if any (the first one, for duplicate ids), parsed: the
    /// candidate has to be parsed anyway to settle hash collisions.
    pub fn get<'s>(&self, store: &'s RowStore, id: &str) -> Result<Option<Row<'s>>> {
        let table = self.table.as_deref().unwrap_or(&[]);
        let n = table.len() / 12;
        let want = id_hash(id);
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if Self::pair(table, mid).0 < want {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut i = lo;
        while i < n {
            let (hash, row) = Self::pair(table, i);
            if hash != want {
                break;
            }
            let r = store.get(row)?;
            if id_field(&r.value, &self.field, r.path, r.line)? == id {
                return Ok(Some(r));
            }
            i += 1;
        }
        Ok(None)
    }

    /// The position of the row whose id equals `id`, if any.
    pub fn find(&self, store: &RowStore, id: &str) -> Result<Option<usize>> {
        Ok(self.get(store, id)?.map(|r| r.row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_found_in_plain_and_gzip_files_with_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("a.jsonl");
        std::fs::write(
            &plain,
            "{\"docid\":\"d1\",\"text\":\"one\"}\n\n{\"docid\":\"d2\",\"text\":\"two\"}\n",
        )
        .unwrap();
        let gz = dir.path().join("b.jsonl.gz");
        let mut enc =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        enc.write_all(b"{\"docid\":7,\"text\":\"three\"}\n").unwrap();
        enc.finish().unwrap();
        let cache = dir.path().join("cache");
        let files = vec![plain.clone(), gz.clone()];
        let store = RowStore::open(&files, &cache).unwrap();
        assert_eq!(store.len(), 3);
        assert_eq!(store.location(1), (plain.as_path(), 3));
        assert_eq!(store.get(2).unwrap().value["text"], "three");
        let ids = DocIndex::open(&store, &files, "docid", &cache).unwrap();
        assert_eq!(ids.find(&store, "d2").unwrap(), Some(1));
        assert_eq!(ids.find(&store, "7").unwrap(), Some(2));
        assert_eq!(ids.find(&store, "d3").unwrap(), None);
        // A second open reuses the cache: no file of it is written again, same answers.
        let before = cache_files(&cache);
        assert!(before.keys().any(|p| p.ends_with("index.bin")), "{before:?}");
        let again = RowStore::open(&files, &cache).unwrap();
        let ids = DocIndex::open(&again, &files, "docid", &cache).unwrap();
        assert_eq!(cache_files(&cache), before, "the second open rebuilt the cache");
        assert_eq!(again.text(0).unwrap(), store.text(0).unwrap());
        assert_eq!(ids.find(&again, "7").unwrap(), Some(2));
    }

    /// Every file under `dir` with its modification time (a rebuild writes a new file).
    fn cache_files(dir: &Path) -> std::collections::BTreeMap<PathBuf, std::time::SystemTime> {
        let mut out = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let (path, meta) = (entry.as_ref().unwrap().path(), entry.unwrap().metadata().unwrap());
            if meta.is_dir() {
                out.extend(cache_files(&path));
            } else {
                out.insert(path, meta.modified().unwrap());
            }
        }
        out
    }

    #[test]
    fn a_row_without_the_id_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.jsonl");
        std::fs::write(&f, "{\"docid\":\"d1\",\"text\":\"x\"}\n{\"text\":\"y\"}\n").unwrap();
        let store = RowStore::open(std::slice::from_ref(&f), dir.path()).unwrap();
        let err = DocIndex::open(&store, &[f], "docid", dir.path()).err().unwrap().to_string();
        assert!(err.contains("c.jsonl:2") && err.contains("docid"), "{err}");
    }
}
