//! Tokenization as Tevatron's collators do it: `prefix + text`, truncation that counts special
//! tokens, optional EOS appended after truncating to `max_len - 1`, and `add_special_tokens`.
//! The padding and truncation settings stored in `tokenizer.json` are overridden (the MiniLM
//! folder ships fixed padding to 128). Knows nothing of tensors.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::{Error, Result};

/// How texts of one kind (queries or passages) are turned into ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextOptions {
    /// Maximum tokens, special tokens and the appended EOS included.
    pub max_len: usize,
    /// Prepended to every text (`--query_prefix` / `--passage_prefix`).
    pub prefix: String,
    /// Truncate to `max_len - 1` and append the EOS id (`--append_eos_token`).
    pub append_eos: bool,
    /// Add the tokenizer's special tokens (`--add_special_tokens`, default true).
    pub add_special_tokens: bool,
}

impl Default for TextOptions {
    fn default() -> Self {
        Self { max_len: 128, prefix: String::new(), append_eos: false, add_special_tokens: true }
    }
}

/// A Hugging Face tokenizer with the special ids Tevatron needs.
#[derive(Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    eos_id: Option<u32>,
    pad_id: u32,
}

fn token_name(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| Error::Json { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read { path: path.to_path_buf(), source }),
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `dir`, with the EOS and PAD tokens named in
    /// `tokenizer_config.json` or `special_tokens_map.json`. The pad id falls back to the
    /// EOS id (as Tevatron sets `pad_token = eos_token`), then to 0.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::NotFound(format!(
                "{}: no tokenizer.json (only fast tokenizers are supported; save one with \
                 AutoTokenizer.from_pretrained(...).save_pretrained(...))",
                dir.display()
            )));
        }
        let mut tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer { path: path.clone(), message: e.to_string() })?;
        let stored_pad = tokenizer.get_padding().map(|p| p.pad_id);
        tokenizer.with_padding(None);
        let mut eos = None;
        let mut pad = None;
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            if let Some(v) = read_json(&dir.join(file))? {
                eos = eos.or_else(|| v.get("eos_token").and_then(token_name).map(str::to_owned));
                pad = pad.or_else(|| v.get("pad_token").and_then(token_name).map(str::to_owned));
            }
        }
        let eos_id = eos.and_then(|t| tokenizer.token_to_id(&t));
        let pad_id =
            pad.and_then(|t| tokenizer.token_to_id(&t)).or(stored_pad).or(eos_id).unwrap_or(0);
        Ok(Self { tokenizer, path, eos_id, pad_id })
    }

    /// The id used for padding.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The end-of-sequence id, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// A copy configured for one kind of text (truncation set once, not per call).
    pub fn prepare(&self, opts: &TextOptions) -> Result<PreparedTokenizer> {
        if opts.append_eos && self.eos_id.is_none() {
            return Err(Error::Invalid(format!(
                "--append_eos_token needs an EOS token, and {} names none",
                self.path.display()
            )));
        }
        let budget = if opts.append_eos { opts.max_len.saturating_sub(1) } else { opts.max_len };
        if budget == 0 {
            return Err(Error::Invalid(format!(
                "max length {} leaves no room for text",
                opts.max_len
            )));
        }
        let mut tokenizer = self.tokenizer.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: budget,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(PreparedTokenizer {
            tokenizer,
            opts: opts.clone(),
            eos_id: self.eos_id,
            path: self.path.clone(),
        })
    }
}

/// A tokenizer set up for one [`TextOptions`].
pub struct PreparedTokenizer {
    tokenizer: Tokenizer,
    opts: TextOptions,
    eos_id: Option<u32>,
    path: PathBuf,
}

impl PreparedTokenizer {
    /// Tokenizes texts (in parallel) into id sequences, unpadded.
    pub fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<String> = if self.opts.prefix.is_empty() {
            texts.to_vec()
        } else {
            texts.iter().map(|t| format!("{}{t}", self.opts.prefix)).collect()
        };
        let encodings = self
            .tokenizer
            .encode_batch(inputs, self.opts.add_special_tokens)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(encodings
            .into_iter()
            .map(|e| {
                let mut ids = e.get_ids().to_vec();
                if self.opts.append_eos {
                    ids.push(self.eos_id.expect("checked in prepare"));
                }
                ids
            })
            .collect())
    }

    /// The options this tokenizer applies.
    pub fn options(&self) -> &TextOptions {
        &self.opts
    }
}
