//! What every crate's `parsers_fuzz` tests share (included with `#[path]`, so that one copy
//! serves all four crates): the inputs (arbitrary bytes, byte-level mutations of a valid file,
//! JSON-aware mutations that keep the file valid JSON but change a value), a time bound, and
//! the check that an error names the file it is about.
//!
//! `PARSERS_FUZZ_CASES=N` runs `N` cases per parser instead of the default, for a deeper search
//! than CI affords.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Value};

/// How long one parse may take before it counts as a hang: far above what any of these small
/// inputs needs, even in a debug build on a loaded machine.
pub const LIMIT: Duration = Duration::from_secs(60);

/// Proptest settings: `cases` per parser (or `PARSERS_FUZZ_CASES`), no forking.
pub fn config(cases: u32) -> ProptestConfig {
    let cases =
        std::env::var("PARSERS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    ProptestConfig { cases, max_shrink_iters: 256, ..ProptestConfig::default() }
}

/// Any bytes, up to `max` of them.
pub fn arbitrary_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// Bytes that parsers give meaning to: JSON punctuation, digits, white space, a NUL, bytes
/// that are not UTF-8, and TREC's separators.
const SPECIAL: &[u8] = b"\0\n\r\t \"\\{}[]:,.-+eE0123456789\x7f\x80\xc3\xff";

/// Values written over 8 bytes: header lengths and offsets at their edges.
fn special_u64(len: usize, pick: u8) -> u64 {
    [0, 1, 7, 8, len as u64, len as u64 + 1, 1 << 31, 1 << 32, 1 << 40, u64::MAX / 2, u64::MAX]
        [pick as usize % 11]
}

/// One edit of a byte buffer.
#[derive(Clone, Debug)]
enum Edit {
    /// XOR one byte with a non-zero mask.
    Flip(Index, u8),
    /// Overwrite one byte with a [`SPECIAL`] byte.
    Special(Index, u8),
    /// Insert a byte.
    Insert(Index, u8),
    /// Delete up to 16 bytes.
    Delete(Index, u8),
    /// Cut the file short.
    Truncate(Index),
    /// Copy up to 64 bytes to another place (repeats a line, a key, a header field).
    Duplicate(Index, Index, u8),
    /// Overwrite 8 bytes with a little-endian edge value (safetensors' header length is the
    /// first 8 bytes; Parquet's footer length the 4 before the last 4).
    Word(Index, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<Index>(), 1..=255u8).prop_map(|(i, m)| Edit::Flip(i, m)),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Special(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => (any::<Index>(), 1..=16u8).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => any::<Index>().prop_map(Edit::Truncate),
        1 => (any::<Index>(), any::<Index>(), 1..=64u8).prop_map(|(a, b, n)| Edit::Duplicate(a, b, n)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, v)| Edit::Word(i, v)),
    ]
}

fn apply(bytes: &mut Vec<u8>, e: &Edit) {
    let len = bytes.len();
    let at = |i: &Index| if len == 0 { 0 } else { i.index(len) };
    match e {
        Edit::Flip(i, m) if len > 0 => bytes[at(i)] ^= m,
        Edit::Special(i, b) if len > 0 => bytes[at(i)] = SPECIAL[*b as usize % SPECIAL.len()],
        Edit::Insert(i, b) => bytes.insert(i.index(len + 1), *b),
        Edit::Delete(i, n) if len > 0 => {
            let start = at(i);
            bytes.drain(start..(start + *n as usize).min(len));
        }
        Edit::Truncate(i) => bytes.truncate(i.index(len + 1)),
        Edit::Duplicate(from, to, n) if len > 0 => {
            let start = at(from);
            let span = bytes[start..(start + *n as usize).min(len)].to_vec();
            let to = to.index(len + 1);
            bytes.splice(to..to, span);
        }
        Edit::Word(i, v) if len > 0 => {
            // Half of the time at the very start, where binary formats keep their lengths.
            let start = if v & 0x80 == 0 { 0 } else { at(i) };
            let word = special_u64(len, *v).to_le_bytes();
            for (k, b) in word.iter().enumerate() {
                if let Some(slot) = bytes.get_mut(start + k) {
                    *slot = *b;
                }
            }
        }
        _ => {}
    }
}

/// `valid` with 1 to 8 byte-level edits.
pub fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(edit(), 1..8).prop_map(move |edits| {
        let mut bytes = valid.clone();
        for e in &edits {
            apply(&mut bytes, e);
        }
        bytes
    })
}

/// Values that parsers of JSON tend to trust: zero, negative, huge, fractional and wrongly
/// typed numbers, odd strings, and every other JSON type.
fn special_value(pick: u8) -> Value {
    let values = [
        json!(0),
        json!(-1),
        json!(1),
        json!(2),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1u64 << 40),
        json!(1e308),
        json!(-1e308),
        json!(0.5),
        json!(-0.0),
        json!(""),
        json!("\0\n\t"),
        json!("é😀"),
        json!("../../"),
        Value::Null,
        json!(true),
        json!(false),
        json!([]),
        json!({}),
        json!([0, "", null]),
        json!({"": null}),
    ];
    values[pick as usize % values.len()].clone()
}

/// JSON pointers of every node of `v` (the root is `""`).
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                pointers(x, p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                pointers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// Removes the node at `pointer` from its parent; false for the root.
fn remove(root: &mut Value, pointer: &str) -> bool {
    let Some((parent, key)) = pointer.rsplit_once('/') else { return false };
    let key = key.replace("~1", "/").replace("~0", "~");
    match root.pointer_mut(parent) {
        Some(Value::Object(m)) => m.remove(&key).is_some(),
        Some(Value::Array(a)) => match key.parse::<usize>() {
            Ok(i) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// `valid` (a JSON document) with 1 to 4 of its values replaced by [`special_value`]s or
/// removed, written back compactly: a file that parses as JSON and is wrong in meaning.
pub fn json_mutated(valid: &[u8]) -> impl Strategy<Value = Vec<u8>> {
    let doc: Value = serde_json::from_slice(valid).expect("the valid sample is JSON");
    prop::collection::vec((any::<Index>(), any::<u8>(), any::<u8>()), 1..5).prop_map(move |ops| {
        let mut doc = doc.clone();
        for (node, action, pick) in ops {
            let mut all = Vec::new();
            pointers(&doc, String::new(), &mut all);
            let pointer = all[node.index(all.len())].clone();
            if action % 4 == 0 && remove(&mut doc, &pointer) {
                continue;
            }
            if let Some(slot) = doc.pointer_mut(&pointer) {
                *slot = special_value(pick);
            }
        }
        serde_json::to_vec(&doc).expect("a Value serialises")
    })
}

/// [`json_mutated`] for each line of a JSONL file (lines that are not JSON are kept).
pub fn jsonl_mutated(valid: &[u8]) -> impl Strategy<Value = Vec<u8>> {
    let lines: Vec<Vec<u8>> = valid.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    let n = lines.len();
    (any::<Index>(), json_line_edits()).prop_map(move |(which, ops)| {
        let mut lines = lines.clone();
        let i = which.index(n);
        if let Ok(mut doc) = serde_json::from_slice::<Value>(&lines[i]) {
            for (node, action, pick) in ops {
                let mut all = Vec::new();
                pointers(&doc, String::new(), &mut all);
                let pointer = all[node.index(all.len())].clone();
                if action % 4 == 0 && remove(&mut doc, &pointer) {
                    continue;
                }
                if let Some(slot) = doc.pointer_mut(&pointer) {
                    *slot = special_value(pick);
                }
            }
            lines[i] = serde_json::to_vec(&doc).expect("a Value serialises");
        }
        lines.join(&b'\n')
    })
}

fn json_line_edits() -> impl Strategy<Value = Vec<(Index, u8, u8)>> {
    prop::collection::vec((any::<Index>(), any::<u8>(), any::<u8>()), 1..5)
}

/// The three kinds of input for a file whose valid form is `valid`: arbitrary bytes, byte
/// edits of `valid`, and (when `valid` is JSON or JSONL) value edits that keep it JSON.
pub fn inputs(valid: Vec<u8>) -> BoxedStrategy<Vec<u8>> {
    let max = (valid.len() * 2).clamp(64, 4096);
    let json = serde_json::from_slice::<Value>(&valid).is_ok();
    let jsonl = !json
        && valid
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .all(|l| serde_json::from_slice::<Value>(l).is_ok());
    if json {
        prop_oneof![1 => arbitrary_bytes(max), 2 => mutated(valid.clone()), 2 => json_mutated(&valid)]
            .boxed()
    } else if jsonl {
        prop_oneof![1 => arbitrary_bytes(max), 2 => mutated(valid.clone()), 2 => jsonl_mutated(&valid)]
            .boxed()
    } else {
        prop_oneof![1 => arbitrary_bytes(max), 3 => mutated(valid)].boxed()
    }
}

/// Runs `f` on a thread and returns its result; a panic in `f` is re-raised here (proptest
/// reports it with the input), and `f` running past [`LIMIT`] fails the test as a hang.
pub fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::Builder::new()
        .name(format!("fuzz {what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn a thread");
    match rx.recv_timeout(LIMIT) {
        Ok(v) => {
            let _ = worker.join();
            v
        }
        Err(RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the worker sends before it returns"),
        },
        Err(RecvTimeoutError::Timeout) => {
            panic!("{what} did not return within {LIMIT:?}: a hang")
        }
    }
}

/// An error and its sources, joined as `{:#}` joins an anyhow chain.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Fails unless the error text names `path`.
pub fn assert_names(error: &str, path: &Path) {
    let name = path.display().to_string();
    assert!(error.contains(&name), "the error does not name {name}: {error}");
}

/// Writes `bytes` to `path`.
pub fn write(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create the input's folder");
    }
    std::fs::write(path, bytes).expect("write the input");
}

/// A file of the repository's `testdata/`.
pub fn testdata(rel: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata").join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Splits a safetensors file into its header JSON and its data.
fn safetensors_parts(file: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let n = u64::from_le_bytes(file[..8].try_into().expect("8 bytes")) as usize;
    (file[8..8 + n].to_vec(), file[8 + n..].to_vec())
}

/// For a safetensors file: [`inputs`], plus JSON-aware edits of its header (dtypes, shapes,
/// offsets, metadata) written back with a length that fits the new header, so that the edits
/// reach the header's meaning rather than stopping at its syntax.
pub fn safetensors_inputs(valid: Vec<u8>) -> BoxedStrategy<Vec<u8>> {
    let (header, data) = safetensors_parts(&valid);
    let edited = (json_mutated(&header), any::<bool>()).prop_map(move |(h, keep_data)| {
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        if keep_data {
            out.extend_from_slice(&data);
        }
        out
    });
    prop_oneof![2 => inputs(valid), 3 => edited].boxed()
}

/// A safetensors file whose eight U8 tensors of `2^61 - 1` bytes each end just below 2^64:
/// valid tensor by tensor, but the header's end plus the data's overflows a `u64`. The
/// `safetensors` crate (0.8) adds them unchecked; random edits do not find it.
pub fn safetensors_with_offsets_near_u64_max() -> Vec<u8> {
    let size = (1u64 << 61) - 1;
    let tensors: Vec<String> = (0..8)
        .map(|i| {
            format!(
                r#""t{i}":{{"dtype":"U8","shape":[{size}],"data_offsets":[{},{}]}}"#,
                i * size,
                (i + 1) * size
            )
        })
        .collect();
    let header = format!("{{{}}}", tensors.join(","));
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&[0; 16]);
    file
}
