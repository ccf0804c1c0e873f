//! A check in front of the `safetensors` crate's header parser for what it does not check: in
//! 0.8 it adds the header length and the tensors' end offset unchecked (`buffer_end + N_LEN +
//! n`), so a header whose tensors end just below 2^64 overflows (a panic with overflow checks,
//! a wrong sum without) before the file's length is compared. Every reader of safetensors files
//! that reach this crate's parser (embeddings, LoRA adapters, checkpoints) calls [`check`] or
//! [`check_file`] first.
//!
//! Only that case is refused here; anything else the header gets wrong is left to `safetensors`,
//! whose messages say what it is.

use std::io::Read;
use std::path::Path;

/// The largest header `safetensors` accepts (its `MAX_HEADER_SIZE`).
const MAX_HEADER: u64 = 100_000_000;

/// Checks the header at the start of `prefix` (the first bytes of a safetensors file of
/// `file_len` bytes): every tensor must end within the file. Returns what is wrong, in words.
pub fn check(prefix: &[u8], file_len: u64) -> Result<(), String> {
    let Some(n) = prefix.get(..8) else { return Ok(()) };
    let n = u64::from_le_bytes(n.try_into().expect("8 bytes"));
    let Some(data_len) = file_len.checked_sub(8).and_then(|rest| rest.checked_sub(n)) else {
        return Ok(()); // a header longer than the file: safetensors refuses it
    };
    if n > MAX_HEADER {
        return Ok(());
    }
    let Some(header) = prefix.get(8..8 + n as usize) else { return Ok(()) };
    let Ok(serde_json::Value::Object(tensors)) = serde_json::from_slice(header) else {
        return Ok(());
    };
    for (name, info) in &tensors {
        let end = info.get("data_offsets").and_then(|o| o.get(1)).and_then(|e| e.as_u64());
        if let Some(end) = end.filter(|&e| e > data_len) {
            return Err(format!(
                "tensor {name:?} ends at byte {end} of the data, which holds {data_len} bytes (a truncated or corrupt file)"
            ));
        }
    }
    Ok(())
}

/// [`check`] for the file at `path`, reading only its header. An unreadable file passes: the
/// caller's own read reports it.
pub fn check_file(path: &Path) -> Result<(), String> {
    let Ok(mut file) = std::fs::File::open(path) else { return Ok(()) };
    let Ok(file_len) = file.metadata().map(|m| m.len()) else { return Ok(()) };
    let mut len = [0u8; 8];
    if file.read_exact(&mut len).is_err() {
        return Ok(());
    }
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n > file_len - 8 {
        return Ok(());
    }
    let mut prefix = len.to_vec();
    prefix.resize(8 + n as usize, 0);
    if file.read_exact(&mut prefix[8..]).is_err() {
        return Ok(());
    }
    check(&prefix, file_len)
}

/// Maps a safetensors file read-only and parses its header after [`check`]: the map, the offset
/// where its data starts, and the tensors' descriptions. `kind` names the file in messages
/// ("safetensors file", "compact file"): the one way this crate opens the files it maps.
pub(crate) fn map(
    path: &Path,
    kind: &str,
) -> crate::Result<(memmap2::Mmap, usize, safetensors::tensor::Metadata)> {
    let file = std::fs::File::open(path)
        .map_err(|source| crate::Error::Read { path: path.to_path_buf(), source })?;
    // SAFETY: the file is opened read-only; like every mmap reader we assume nobody truncates
    // it while it is read.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|source| crate::Error::Read { path: path.to_path_buf(), source })?;
    let bad = |e: String| crate::Error::Embeddings {
        path: path.to_path_buf(),
        what: format!("not a readable {kind} ({e})"),
    };
    if is_pickle(&map) {
        // Embeddings are what users bring from Tevatron, whose encode pickles them.
        let advice = if kind == "safetensors file" {
            " (Tevatron's encode pickles its embeddings); convert it with \
             scripts/pickle-to-safetensors.py, or encode with tevatron encode"
        } else {
            ""
        };
        return Err(crate::Error::Embeddings {
            path: path.to_path_buf(),
            what: format!("a Python pickle, not a {kind}{advice}"),
        });
    }
    check(&map, map.len() as u64).map_err(bad)?;
    let (header_len, meta) =
        safetensors::SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
    Ok((map, 8 + header_len, meta))
}

/// Whether `bytes` start as a pickle of protocol 2 or later does: the `PROTO` opcode (0x80) and
/// its version (2 to 5), as Tevatron's and PyTorch's files do. A safetensors file starts with
/// its header's length, a little-endian u64 that may begin with the same two bytes; read so,
/// a pickle's first eight bytes give a length past the largest header `safetensors` accepts
/// (or the file is shorter than eight bytes), which a safetensors file's never do.
pub(crate) fn is_pickle(bytes: &[u8]) -> bool {
    matches!(bytes, [0x80, 2..=5, ..])
        && bytes.get(..8).is_none_or(|n| u64::from_le_bytes(n.try_into().expect("8")) > MAX_HEADER)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.resize(f.len() + data, 0);
        f
    }

    #[test]
    fn tensors_ending_past_the_file_are_refused_and_others_left_alone() {
        let ok = file(r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#, 4);
        assert_eq!(check(&ok, ok.len() as u64), Ok(()));
        let past =
            file(r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,18446744073709551615]}}"#, 4);
        let err = check(&past, past.len() as u64).unwrap_err();
        assert!(err.contains("\"a\" ends at byte 18446744073709551615"), "{err}");
        // Not JSON, too short, a header longer than the file: left to safetensors.
        assert_eq!(check(&file("{", 0), 9), Ok(()));
        assert_eq!(check(b"1234", 4), Ok(()));
        assert_eq!(check(&u64::MAX.to_le_bytes(), 8), Ok(()));
    }

    #[test]
    fn pickles_are_told_from_safetensors() {
        // pickle.dumps((1, ['a']), protocol=4)
        let pickle =
            b"\x80\x04\x95\x0e\x00\x00\x00\x00\x00\x00\x00K\x01]\x94\x8c\x01a\x94a\x86\x94.";
        assert!(is_pickle(pickle));
        assert!(is_pickle(b"\x80\x02K\x01."));
        let ok = file(r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#, 4);
        assert!(!is_pickle(&ok));
        // A safetensors header of 0x0280 bytes starts with the same two bytes.
        let mut long = (0x0280u64).to_le_bytes().to_vec();
        long.resize(0x0280 + 8, b' ');
        assert!(!is_pickle(&long));
    }
}
