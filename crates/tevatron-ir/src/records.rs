//! Tevatron's input records, read as a stream: JSONL, `.jsonl.gz` and Parquet files of queries
//! (`query_id` + `query_text`/`query`) or corpus passages (`docid` + optional `title` + `text`).
//!
//! This module owns how a record becomes an id and a text, exactly as Tevatron's encode dataset
//! builds it; it knows nothing of tokenizers. Errors name the file, the line and the field.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// Which kind of record a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// `{query_id, query_text | query}`.
    Query,
    /// `{docid, title?, text}`.
    Doc,
}

/// One record ready for tokenization: its id and its text (without any prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextRecord {
    /// `query_id` or `docid`, as a string (integers are written in decimal).
    pub id: String,
    /// The text Tevatron would encode.
    pub text: String,
}

/// Python's `str.isspace`, which `str.strip()` uses: Unicode white space plus the four
/// information separators U+001C..U+001F that Rust's `char::is_whitespace` leaves out.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` with no argument.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// Hugging Face `Dataset.shard(num_shards, index)` with contiguous blocks: shard `i` of `n` rows
/// split `k` ways covers `[div*i + min(i, mod), +div + (i < mod))`.
pub fn shard_range(n: usize, num_shards: usize, index: usize) -> Range<usize> {
    let div = n / num_shards;
    let rem = n % num_shards;
    let start = div * index + index.min(rem);
    let len = div + usize::from(index < rem);
    start..start + len
}

/// A stream of JSON objects from one JSONL file (plain or gzip) or Parquet file, with line
/// numbers (row numbers, 1-based, for Parquet).
pub struct JsonlReader {
    path: PathBuf,
    reader: Box<dyn BufRead + Send>,
    parquet: Option<(parquet::record::reader::RowIter<'static>, usize)>,
    line: usize,
    buf: Vec<u8>,
}

/// Calls into the parquet crate, which fails an assertion (a panic) instead of returning an
/// error on some corrupt files; the panic's message is returned instead.
fn parquet_call<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    crate::caught_panic::catch(f)
}

fn open_parquet(
    path: &Path,
    file: File,
) -> Result<(parquet::record::reader::RowIter<'static>, usize)> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |e: String| Error::Invalid(format!("{}: cannot read Parquet ({e})", path.display()));
    let opened = parquet_call(|| {
        let reader = SerializedFileReader::new(file)?;
        let rows = reader.metadata().file_metadata().num_rows().max(0) as usize;
        Ok::<_, parquet::errors::ParquetError>((reader.into_iter(), rows))
    });
    opened.map_err(|m| bad(format!("corrupt file: {m}")))?.map_err(|e| bad(e.to_string()))
}

/// Compressions Hugging Face unpacks on the fly that are not read here: a file in one is
/// refused by name (its bytes would read as text that is not UTF-8).
const UNREAD_COMPRESSIONS: &[&str] = &[".xz", ".bz2", ".zst", ".lz4", ".zip"];

/// The compression of `path` that is not read here (`.xz`, ...), if its name ends in one.
pub fn unread_compression(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_str()?;
    UNREAD_COMPRESSIONS.iter().find(|c| name.ends_with(*c)).copied()
}

/// Refuses, by name, a file whose form is not read here: a compression other than gzip, CSV or
/// TSV (their bytes would otherwise fail as text that is not UTF-8, or as malformed JSON). Every
/// reader of data files calls it first.
pub fn check_readable(path: &Path) -> Result<()> {
    if let Some(c) = unread_compression(path) {
        return Err(Error::Invalid(format!(
            "{}: {c} files are not read here (gzip is); decompress it, or gzip it",
            path.display()
        )));
    }
    if path.extension().is_some_and(|e| e == "csv" || e == "tsv") {
        return Err(Error::Invalid(format!(
            "{}: CSV and TSV files are not read here; give JSON lines or Parquet",
            path.display()
        )));
    }
    Ok(())
}

/// Opens a JSONL file; a name ending in `.gz` is decompressed on the fly.
pub fn open_jsonl(path: &Path) -> Result<JsonlReader> {
    check_readable(path)?;
    let file =
        File::open(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    let reader: Box<dyn BufRead + Send> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(file)))
    } else if path.extension().is_some_and(|e| e == "parquet") {
        let parquet = Some(open_parquet(path, file)?);
        return Ok(JsonlReader {
            path: path.to_path_buf(),
            reader: Box::new(std::io::empty()),
            parquet,
            line: 0,
            buf: Vec::new(),
        });
    } else {
        Box::new(BufReader::with_capacity(1 << 20, file))
    };
    Ok(JsonlReader { path: path.to_path_buf(), reader, parquet: None, line: 0, buf: Vec::new() })
}

impl JsonlReader {
    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next Parquet row as JSON (`None` past the last row or when the file is not
    /// Parquet). A row the parquet crate panics on ends the stream with an error.
    fn next_parquet_row(&mut self) -> Option<Result<(usize, Value)>> {
        let (rows, _) = self.parquet.as_mut()?;
        let next = parquet_call(|| rows.next().map(|r| r.map(|r| r.to_json_value())));
        self.line += 1;
        let what = match next {
            Ok(None) => return None,
            Ok(Some(Ok(value))) => return Some(Ok((self.line, value))),
            Ok(Some(Err(e))) => e.to_string(),
            Err(panic) => {
                // The reader's state is unknown after a panic: no row is read from it again
                // (without it, the stream reads the empty text reader and ends).
                self.parquet = None;
                format!("corrupt file: {panic}")
            }
        };
        Some(Err(Error::Invalid(format!(
            "{}: row {}: cannot read Parquet ({what})",
            self.path.display(),
            self.line
        ))))
    }

    /// Reads the next non-blank line as raw UTF-8 text; returns its line number. For Parquet,
    /// skips one row and returns an empty text.
    pub fn next_line(&mut self) -> Option<Result<(usize, &str)>> {
        if self.parquet.is_some() {
            return Some(self.next_parquet_row()?.map(|(line, _)| (line, "")));
        }
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(source) => return Some(Err(Error::Read { path: self.path.clone(), source })),
            }
            self.line += 1;
            if std::str::from_utf8(&self.buf).is_err() {
                return Some(Err(Error::NotUtf8 { path: self.path.clone(), line: self.line }));
            }
            // A UTF-8 byte-order mark at the start of the file is no part of its first row.
            let start = if self.line == 1 { bom_len(&self.buf) } else { 0 };
            // Blank by the same rule the row counts use (a line of U+00A0 is a bad row).
            if self.buf[start..].iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            // Re-borrow after the checks so the returned slice outlives the loop.
            let text = std::str::from_utf8(&self.buf[start..]).expect("checked above");
            return Some(Ok((self.line, text)));
        }
    }

    /// Reads the next non-blank line (or Parquet row) as a JSON object.
    pub fn next_object(&mut self) -> Option<Result<(usize, Value)>> {
        if self.parquet.is_some() {
            return self.next_parquet_row();
        }
        let path = self.path.clone();
        Some(self.next_line()?.and_then(|(line, text)| Ok((line, parse_row(text, &path, line)?))))
    }

    /// Counts the non-blank lines left in the file (used to shard without loading it); Parquet
    /// files give their row count from the footer.
    pub fn count_rows(mut self) -> Result<usize> {
        if let Some((_, rows)) = self.parquet {
            return Ok(rows);
        }
        let mut n = 0;
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return Ok(n),
                Ok(_) => n += usize::from(self.buf.iter().any(|b| !b.is_ascii_whitespace())),
                Err(source) => return Err(Error::Read { path: self.path, source }),
            }
        }
    }
}

/// The length of a UTF-8 byte-order mark at the start of `bytes` (3, or 0 without one).
pub(crate) fn bom_len(bytes: &[u8]) -> usize {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    }
}

/// Parses one JSON-lines row: an object, else an error naming the file and line (a file holding
/// one JSON array, which Hugging Face's json reader also takes, is named as such).
pub(crate) fn parse_row(text: &str, path: &Path, line: usize) -> Result<Value> {
    let array = || Error::Line {
        path: path.to_path_buf(),
        line,
        what: "a JSON array: rows are read as JSON lines, one object per line (`jq -c '.[]'` \
               writes an array's objects so)"
            .into(),
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) if text.trim_start().starts_with('[') => return Err(array()),
        Err(source) => return Err(Error::Json { path: path.to_path_buf(), line, source }),
    };
    match value {
        Value::Object(_) => Ok(value),
        Value::Array(_) => Err(array()),
        _ => Err(Error::FieldType {
            path: path.to_path_buf(),
            line,
            field: "<row>".into(),
            expected: "a JSON object",
        }),
    }
}

/// Reads an id field: a JSON string, or an integer written in decimal.
pub fn id_field(obj: &Value, field: &str, path: &Path, line: usize) -> Result<String> {
    match obj.get(field) {
        None | Some(Value::Null) => {
            Err(Error::MissingField { path: path.to_path_buf(), line, field: field.into() })
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Some(_) => Err(Error::FieldType {
            path: path.to_path_buf(),
            line,
            field: field.into(),
            expected: "a string or an integer",
        }),
    }
}

/// Reads an optional text field: `None` when absent, `""` when null.
pub fn text_field<'a>(
    obj: &'a Value,
    field: &str,
    path: &Path,
    line: usize,
) -> Result<Option<&'a str>> {
    match obj.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some("")),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Error::FieldType {
            path: path.to_path_buf(),
            line,
            field: field.into(),
            expected: "a string",
        }),
    }
}

/// Reads a text field a row cannot do without (a passage's `text`, a rerank pair's `query`):
/// absent or null is an error naming the field. Tevatron's encode and training fail on both
/// (they call `.strip()` on the value), and its reranker would score the word `None`.
pub fn required_text<'a>(obj: &'a Value, field: &str, path: &Path, line: usize) -> Result<&'a str> {
    match obj.get(field) {
        None => Err(Error::MissingField { path: path.to_path_buf(), line, field: field.into() }),
        Some(Value::Null) => Err(Error::FieldType {
            path: path.to_path_buf(),
            line,
            field: field.into(),
            expected: "a string, not null",
        }),
        Some(_) => Ok(text_field(obj, field, path, line)?.unwrap_or_default()),
    }
}

/// Builds the record Tevatron's encode dataset would build from one JSON row.
///
/// Queries: `query_text or query or ''` (a row with neither field is an error). Documents:
/// `(title + ' ' + text).strip()` when a `title` key exists, else `text.strip()`.
pub fn text_record(obj: &Value, kind: RecordKind, path: &Path, line: usize) -> Result<TextRecord> {
    match kind {
        RecordKind::Query => {
            let id = id_field(obj, "query_id", path, line)?;
            let text = match text_field(obj, "query_text", path, line)? {
                Some(t) if !t.is_empty() => t,
                _ => match text_field(obj, "query", path, line)? {
                    Some(t) => t,
                    None if obj.get("query_text").is_some() => "",
                    None => {
                        return Err(Error::MissingField {
                            path: path.to_path_buf(),
                            line,
                            field: "query".into(),
                        })
                    }
                },
            };
            Ok(TextRecord { id, text: text.to_string() })
        }
        RecordKind::Doc => {
            let id = id_field(obj, "docid", path, line)?;
            let text = required_text(obj, "text", path, line)?;
            let text = match text_field(obj, "title", path, line)? {
                Some(title) => py_strip(&format!("{title} {text}")).to_string(),
                None => py_strip(text).to_string(),
            };
            Ok(TextRecord { id, text })
        }
    }
}

/// A stream of [`TextRecord`]s over several files read in order, optionally restricted to a
/// contiguous range of row numbers (for `--dataset_number_of_shards`).
pub struct RecordStream {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<JsonlReader>,
    kind: RecordKind,
    range: Range<usize>,
    row: usize,
}

impl RecordStream {
    /// Streams every record of `files`, in order.
    pub fn open(files: Vec<PathBuf>, kind: RecordKind) -> Self {
        Self { files: files.into_iter(), current: None, kind, range: 0..usize::MAX, row: 0 }
    }

    /// Keeps only rows whose 0-based position across all files falls in `range`.
    pub fn with_range(mut self, range: Range<usize>) -> Self {
        self.range = range;
        self
    }
}

/// Counts the rows of all files (non-blank lines), for sharding.
pub fn count_rows(files: &[PathBuf]) -> Result<usize> {
    files.iter().map(|f| open_jsonl(f)?.count_rows()).sum()
}

impl Iterator for RecordStream {
    type Item = Result<TextRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.row >= self.range.end {
                return None;
            }
            if self.current.is_none() {
                let path = self.files.next()?;
                match open_jsonl(&path) {
                    Ok(r) => self.current = Some(r),
                    Err(e) => return Some(Err(e)),
                }
            }
            let reader = self.current.as_mut().expect("set above");
            if self.row < self.range.start {
                match reader.next_line() {
                    None => self.current = None,
                    Some(Err(e)) => return Some(Err(e)),
                    Some(Ok(_)) => self.row += 1,
                }
                continue;
            }
            match reader.next_object() {
                None => self.current = None,
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok((line, obj))) => {
                    self.row += 1;
                    let record = text_record(&obj, self.kind, reader.path(), line);
                    return Some(
                        record.and_then(|r| storable_id(r, self.kind, reader.path(), line)),
                    );
                }
            }
        }
    }
}

/// Refuses an id that an embeddings file cannot store (its ids are newline-separated), naming
/// the input's file, line and field rather than leaving it to the writer, which knows neither.
fn storable_id(r: TextRecord, kind: RecordKind, path: &Path, line: usize) -> Result<TextRecord> {
    if !r.id.contains('\n') {
        return Ok(r);
    }
    let field = if kind == RecordKind::Query { "query_id" } else { "docid" };
    Err(Error::Line {
        path: path.to_path_buf(),
        line,
        what: format!(
            "field `{field}`: id {:?} contains a newline, which the embeddings format cannot store",
            r.id
        ),
    })
}

/// Reads a whole file into memory, naming the path in the error. A byte-order mark that some
/// Windows editors put first is left out: it would otherwise become part of the first line's
/// first field (a qrels' first query id, which then matched no query of a run).
pub fn read_to_string(path: &Path) -> Result<String> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    // A safetensors file (an 8-byte length its header fits in, then the header's JSON): most
    // often the ranking `tevatron search` writes by default, given where a text run is read.
    let header = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if header.is_some_and(|h| h >= 2 && h <= bytes.len() as u64 - 8) && bytes[8..10] == *b"{\"" {
        return Err(Error::Invalid(format!(
            "{}: a safetensors file, not text (tevatron search writes its ranking so unless given \
             --save_text)",
            path.display()
        )));
    }
    let mut s = String::from_utf8(bytes).map_err(|e| {
        // Named by line, as the JSONL readers do: the lines before the first bad byte, plus one.
        let valid = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..valid].iter().filter(|&&b| b == b'\n').count();
        Error::NotUtf8 { path: path.to_path_buf(), line }
    })?;
    if s.starts_with('\u{feff}') {
        s.drain(..'\u{feff}'.len_utf8());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(json: &str, kind: RecordKind) -> Result<TextRecord> {
        let v: Value = serde_json::from_str(json).expect("test json");
        text_record(&v, kind, Path::new("f.jsonl"), 3)
    }

    #[test]
    fn doc_text_joins_title_and_strips() {
        let r = rec(r#"{"docid": 7, "title": "", "text": " body \n"}"#, RecordKind::Doc).unwrap();
        assert_eq!(r, TextRecord { id: "7".into(), text: "body".into() });
        let r = rec(r#"{"docid": "a", "title": "T", "text": "x"}"#, RecordKind::Doc).unwrap();
        assert_eq!(r.text, "T x");
        let r = rec(r#"{"docid": "a", "text": "\u001fx "}"#, RecordKind::Doc).unwrap();
        assert_eq!(r.text, "x");
    }

    #[test]
    fn query_text_prefers_query_text_then_query() {
        assert_eq!(
            rec(r#"{"query_id":"1","query_text":"a","query":"b"}"#, RecordKind::Query)
                .unwrap()
                .text,
            "a"
        );
        assert_eq!(
            rec(r#"{"query_id":"1","query_text":null,"query":"b"}"#, RecordKind::Query)
                .unwrap()
                .text,
            "b"
        );
        assert_eq!(
            rec(r#"{"query_id":"1","query_text":null}"#, RecordKind::Query).unwrap().text,
            ""
        );
    }

    #[test]
    fn missing_fields_name_file_line_and_field() {
        let e = rec(r#"{"text":"x"}"#, RecordKind::Doc).unwrap_err();
        assert_eq!(e.to_string(), "f.jsonl:3: missing field `docid`");
        let e = rec(r#"{"docid":"1"}"#, RecordKind::Doc).unwrap_err();
        assert_eq!(e.to_string(), "f.jsonl:3: missing field `text`");
        let e = rec(r#"{"docid":"1","title":null,"text":null}"#, RecordKind::Doc).unwrap_err();
        assert_eq!(e.to_string(), "f.jsonl:3: field `text` must be a string, not null");
        let e = rec(r#"{"query_id":"1"}"#, RecordKind::Query).unwrap_err();
        assert_eq!(e.to_string(), "f.jsonl:3: missing field `query`");
        let e = rec(r#"{"docid":[1],"text":"x"}"#, RecordKind::Doc).unwrap_err();
        assert_eq!(e.to_string(), "f.jsonl:3: field `docid` must be a string or an integer");
    }

    #[test]
    fn shards_are_contiguous_like_hugging_face() {
        // datasets: Dataset.from_dict({'a': range(10)}).shard(3, i) -> [0..4), [4..7), [7..10)
        assert_eq!(shard_range(10, 3, 0), 0..4);
        assert_eq!(shard_range(10, 3, 1), 4..7);
        assert_eq!(shard_range(10, 3, 2), 7..10);
        assert_eq!(shard_range(2, 4, 3), 2..2);
    }

    /// A byte-order mark before the first row is dropped (by the stream and the row store
    /// alike); a line of Unicode white space is a bad row, as the row counts have it; a JSON
    /// array file is named as one.
    #[test]
    fn a_bom_is_dropped_and_odd_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let bom = dir.path().join("bom.jsonl");
        std::fs::write(&bom, "\u{feff}{\"docid\": \"a\", \"text\": \"x\"}\n").unwrap();
        let mut r = open_jsonl(&bom).unwrap();
        assert_eq!(r.next_object().unwrap().unwrap().1["docid"], "a");
        let store =
            crate::rows::RowStore::open(std::slice::from_ref(&bom), &dir.path().join("c")).unwrap();
        assert_eq!(store.get(0).unwrap().value["docid"], "a");
        let nbsp = dir.path().join("nbsp.jsonl");
        std::fs::write(&nbsp, "{\"docid\": \"a\", \"text\": \"x\"}\n\u{a0}\n").unwrap();
        let mut r = open_jsonl(&nbsp).unwrap();
        assert!(r.next_object().unwrap().is_ok());
        let e = r.next_object().unwrap().unwrap_err().to_string();
        assert!(e.contains("nbsp.jsonl:2"), "{e}");
        for (name, text) in
            [("arr.json", "[\n  {\"docid\": \"a\"}\n]\n"), ("one.json", "[{\"docid\": \"a\"}]\n")]
        {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            let e = open_jsonl(&p).unwrap().next_object().unwrap().unwrap_err().to_string();
            assert!(e.contains(&format!("{name}:1: a JSON array")), "{e}");
        }
    }

    #[test]
    fn stream_reads_gzip_skips_blank_lines_and_shards() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl.gz");
        let mut gz =
            flate2::write::GzEncoder::new(File::create(&path).unwrap(), Default::default());
        for i in 0..5 {
            writeln!(gz, r#"{{"docid": "d{i}", "text": "t{i}"}}"#).unwrap();
            writeln!(gz).unwrap();
        }
        gz.finish().unwrap();
        assert_eq!(count_rows(std::slice::from_ref(&path)).unwrap(), 5);
        let ids: Vec<String> = RecordStream::open(vec![path], RecordKind::Doc)
            .with_range(shard_range(5, 2, 1))
            .map(|r| r.unwrap().id)
            .collect();
        assert_eq!(ids, ["d3", "d4"]);
    }

    #[test]
    fn parquet_rows_read_like_jsonl() {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.parquet");
        let schema = std::sync::Arc::new(
            parse_message_type("message c { required binary docid (UTF8); required binary title (UTF8); required binary text (UTF8); }")
                .unwrap(),
        );
        let mut w =
            SerializedFileWriter::new(File::create(&path).unwrap(), schema, Default::default())
                .unwrap();
        let mut rg = w.next_row_group().unwrap();
        for col in [["d1", "d2", "d3"], ["T", "", "x"], ["one ", "two", " three"]] {
            let mut c = rg.next_column().unwrap().unwrap();
            let vals: Vec<ByteArray> = col.iter().map(|v| ByteArray::from(*v)).collect();
            c.typed::<ByteArrayType>().write_batch(&vals, None, None).unwrap();
            c.close().unwrap();
        }
        rg.close().unwrap();
        w.close().unwrap();
        assert_eq!(count_rows(std::slice::from_ref(&path)).unwrap(), 3);
        let got: Vec<TextRecord> = RecordStream::open(vec![path], RecordKind::Doc)
            .with_range(1..3)
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(
            got,
            [
                TextRecord { id: "d2".into(), text: "two".into() },
                TextRecord { id: "d3".into(), text: "x  three".into() }
            ]
        );
    }

    #[test]
    fn malformed_and_non_utf8_lines_are_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        std::fs::write(&path, b"{\"docid\":\"1\",\"text\":\"a\"}\n{oops\n").unwrap();
        let errs: Vec<String> = RecordStream::open(vec![path.clone()], RecordKind::Doc)
            .filter_map(|r| r.err())
            .map(|e| e.to_string())
            .collect();
        assert_eq!(errs, [format!("{}:2: malformed JSON", path.display())]);
        std::fs::write(&path, b"{\"docid\":\"1\",\"text\":\"\xff\"}\n").unwrap();
        let err =
            RecordStream::open(vec![path.clone()], RecordKind::Doc).next().unwrap().unwrap_err();
        assert_eq!(err.to_string(), format!("{}:1: text is not valid UTF-8", path.display()));
        // A whole-file text (qrels, runs) names the line of its first bad byte too.
        let qrels = dir.path().join("qrels.txt");
        std::fs::write(&qrels, b"q1 0 d1 1\nq1 0 d2 1\nq2 0 d\xe93 1\n").unwrap();
        let err = read_to_string(&qrels).unwrap_err().to_string();
        assert_eq!(err, format!("{}:3: text is not valid UTF-8", qrels.display()));
    }
}
