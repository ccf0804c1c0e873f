//! Tokenization as Tevatron's collators do it: `prefix + text`, truncation that counts special
//! tokens, optional EOS appended after truncating to `max_len - 1`, and `add_special_tokens`.
//! The padding and truncation settings stored in `tokenizer.json` are overridden (the MiniLM
//! folder ships fixed padding to 128), and where transformers 5 does not run the file's own
//! pipeline (XLM-RoBERTa: `xlmr_pipeline`) its rebuilt one is used. Knows nothing of tensors.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tevatron_ir::caught_panic;
use tevatron_ir::rerank::{pair_input, PairFormat};
use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

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
    /// Whether text pairs carry token types into the model (as transformers gives them).
    token_types: bool,
    /// The longest sequence the model's positions hold, where they have an end
    /// ([`TextTokenizer::limit_to`]).
    max_tokens: Option<usize>,
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

/// transformers 5's XLM-RoBERTa tokenizer class, which rebuilds the pipeline (below).
const XLMR_CLASS: &str = "XLMRobertaTokenizer";

/// The tokenizer class `AutoTokenizer` of transformers 5 picks, without a `Fast` suffix:
/// `tokenizer_class` of `tokenizer_config.json` or `config.json`, else the class of
/// `config.json`'s `model_type` (only `xlm-roberta` matters here).
fn transformers_class(tokenizer_config: Option<&Value>, config: Option<&Value>) -> Option<String> {
    let named = |v: Option<&Value>| {
        v.and_then(|v| v.get("tokenizer_class")).and_then(Value::as_str).map(str::to_owned)
    };
    named(tokenizer_config)
        .or_else(|| named(config))
        .map(|c| c.strip_suffix("Fast").map(str::to_owned).unwrap_or(c))
        .or_else(|| {
            let model_type = config?.get("model_type")?.as_str()?;
            (model_type == "xlm-roberta").then(|| XLMR_CLASS.to_owned())
        })
}

/// Tokenizer classes of transformers 5 whose `model_input_names` hold `token_type_ids` (the
/// base class's do not): the only ones whose text pairs reach the model with token types.
const TYPED_CLASSES: &[&str] = &[
    "BertTokenizer",
    "ConvBertTokenizer",
    "DPRContextEncoderTokenizer",
    "DPRQuestionEncoderTokenizer",
    "MarkupLMTokenizer",
];

/// Whether transformers' tokenizer returns `token_type_ids` for this folder (and so
/// sentence-transformers' CrossEncoder passes them): `model_input_names` of
/// `tokenizer_config.json` when it states them, else the class's (a `bert` model without a
/// named class gets `BertTokenizer`).
fn returns_token_types(tokenizer_config: Option<&Value>, config: Option<&Value>) -> bool {
    let stated =
        tokenizer_config.and_then(|c| c.get("model_input_names")).and_then(Value::as_array);
    if let Some(names) = stated {
        return names.iter().any(|n| n.as_str() == Some("token_type_ids"));
    }
    let class = transformers_class(tokenizer_config, config).or_else(|| {
        let model_type = config?.get("model_type")?.as_str()?;
        (model_type == "bert").then(|| "BertTokenizer".to_string())
    });
    class.is_some_and(|c| TYPED_CLASSES.contains(&c.as_str()))
}

/// The pipeline transformers 5's `XLMRobertaTokenizer` runs, whatever `tokenizer.json` holds:
/// its constructor keeps the file's Unigram vocabulary, post-processor and the SentencePiece
/// `Precompiled` normalizer, and drops the rest of the normalizer and the pre-tokenizer for
/// `WhitespaceSplit` then `Metaspace` (prepending "▁" unless `add_prefix_space` is false).
/// The files that XLM-R models ship (FacebookAI/xlm-roberta-base, multilingual-e5, bge-m3),
/// converted by transformers 4, instead hold `[Precompiled, Replace(" {2,}" -> " ")]` and a bare
/// `Metaspace`, which turn trailing white space ("query: ", "text\n") into an extra "▁" token
/// that transformers 5, like SentencePiece itself, does not produce. Files of any other model
/// kind than Unigram are left as they are.
fn xlmr_pipeline(json: &mut Value, tokenizer_config: Option<&Value>) {
    let Some(root) = json.as_object_mut() else { return };
    if root.get("model").and_then(|m| m.get("type")).and_then(Value::as_str) != Some("Unigram") {
        return;
    }
    let normalizer = root.get("normalizer").and_then(|n| {
        let list = match n.get("type").and_then(Value::as_str) {
            Some("Sequence") => n.get("normalizers")?.as_array()?.iter().collect(),
            _ => vec![n],
        };
        list.into_iter()
            .find(|n| {
                n.get("type").and_then(Value::as_str) == Some("Precompiled")
                    && n.get("precompiled_charsmap").is_some_and(Value::is_string)
            })
            .cloned()
    });
    let prepend = tokenizer_config
        .and_then(|c| c.get("add_prefix_space"))
        .and_then(Value::as_bool)
        .unwrap_or(true);
    root.insert("normalizer".into(), normalizer.unwrap_or(Value::Null));
    root.insert(
        "pre_tokenizer".into(),
        serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Metaspace", "replacement": "\u{2581}", "split": true,
             "prepend_scheme": if prepend { "always" } else { "never" }},
        ]}),
    );
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
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
        if tokenizer_config.as_ref().and_then(|c| c.get("add_eos_token"))
            == Some(&Value::Bool(true))
        {
            // transformers 4's LlamaTokenizerFast rebuilt its post-processor from this flag;
            // transformers 5 (the reference here) keeps tokenizer.json's, and so do we.
            tracing::warn!(
                "{}: add_eos_token is set, which transformers 5 ignores (4's Llama tokenizer \
                 appended an EOS for it); no EOS is appended here unless --append_eos_token is \
                 given, as Tevatron does",
                dir.join("tokenizer_config.json").display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|source| Error::Read { path: path.clone(), source })?;
        let tokenizer_error = |message: String| Error::Tokenizer { path: path.clone(), message };
        // Only to tell the tokenizer class: a config that does not parse is the model loader's
        // to report.
        let config: Option<Value> = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let class = transformers_class(tokenizer_config.as_ref(), config.as_ref());
        let token_types = returns_token_types(tokenizer_config.as_ref(), config.as_ref());
        let json = if class.as_deref() == Some(XLMR_CLASS) {
            let mut json: Value =
                serde_json::from_str(&text).map_err(|e| tokenizer_error(e.to_string()))?;
            xlmr_pipeline(&mut json, tokenizer_config.as_ref());
            Some(json)
        } else {
            None
        };
        // The tokenizers crate panics on some malformed parts instead of failing (a
        // `Precompiled` normalizer whose base64 does not decode): reported as an error on the
        // file.
        let mut tokenizer = caught_panic::catch(|| match json {
            Some(json) => serde_json::from_value::<Tokenizer>(json),
            None => serde_json::from_str::<Tokenizer>(&text),
        })
        .map_err(|panic| tokenizer_error(format!("it does not load ({panic})")))?
        .map_err(|e| tokenizer_error(e.to_string()))?;
        let stored_pad = tokenizer.get_padding().map(|p| p.pad_id);
        tokenizer.with_padding(None);
        let mut eos = None;
        let mut pad = None;
        let special_tokens_map = read_json(&dir.join("special_tokens_map.json"))?;
        for v in [&tokenizer_config, &special_tokens_map].into_iter().flatten() {
            eos = eos.or_else(|| v.get("eos_token").and_then(token_name).map(str::to_owned));
            pad = pad.or_else(|| v.get("pad_token").and_then(token_name).map(str::to_owned));
        }
        let eos_id = eos.and_then(|t| tokenizer.token_to_id(&t));
        let pad_id =
            pad.and_then(|t| tokenizer.token_to_id(&t)).or(stored_pad).or(eos_id).unwrap_or(0);
        Ok(Self { tokenizer, path, eos_id, pad_id, token_types, max_tokens: None })
    }

    /// The id used for padding.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The end-of-sequence id, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Cuts every text at the model's `max_tokens` positions (learned absolute positions end
    /// there), whatever length a flag asks for: a longer text stopped the run where it came (a
    /// training hours in), as transformers' model does. The cut is logged once.
    pub fn limit_to(&mut self, max_tokens: Option<usize>) {
        self.max_tokens = max_tokens;
    }

    /// A copy configured for one kind of text (truncation set once, not per call).
    pub fn prepare(&self, opts: &TextOptions) -> Result<PreparedTokenizer> {
        let limited;
        let opts = match self.max_tokens {
            Some(max) if opts.max_len > max => {
                static WARNED: std::sync::Mutex<Vec<(usize, usize)>> =
                    std::sync::Mutex::new(Vec::new());
                let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
                if !warned.contains(&(opts.max_len, max)) {
                    warned.push((opts.max_len, max));
                    tracing::warn!(
                        "a length of {} tokens is more than the model's {max} positions: texts \
                         are cut at {max} (--query_max_len, --passage_max_len or \
                         --rerank_max_len)",
                        opts.max_len
                    );
                }
                limited = TextOptions { max_len: max, ..opts.clone() };
                &limited
            }
            _ => opts,
        };
        if opts.append_eos && self.eos_id.is_none() {
            return Err(Error::Invalid(format!(
                "--append_eos_token needs an EOS token, and {} names none",
                self.path.display()
            )));
        }
        let budget = room_for_text(&self.tokenizer, opts, false)?;
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
            token_types: self.token_types,
        })
    }
}

/// Cross-encoder inputs, tokenized: each pair's ids, and its token types when the pairs are
/// text pairs.
pub type CrossTokens = (Vec<Vec<u32>>, Option<Vec<Vec<u32>>>);

/// A tokenizer set up for one [`TextOptions`].
pub struct PreparedTokenizer {
    tokenizer: Tokenizer,
    opts: TextOptions,
    eos_id: Option<u32>,
    path: PathBuf,
    token_types: bool,
}

impl PreparedTokenizer {
    /// Tokenizes texts (in parallel) into id sequences, unpadded.
    pub fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<String> = if self.opts.prefix.is_empty() {
            texts.to_vec()
        } else {
            texts.iter().map(|t| format!("{}{t}", self.opts.prefix)).collect()
        };
        Ok(self.encode(inputs)?.into_iter().map(|(ids, _)| ids).collect())
    }

    /// Tokenizes text pairs as transformers' tokenizer does for `tokenizer(first, second,
    /// truncation="longest_first", max_length=max_len)` (sentence-transformers' CrossEncoder):
    /// the pair template with its special tokens, the longer text truncated first. Returns each
    /// pair's ids and token types. The prefix applies to the first text; EOS appending to the
    /// whole. The token types are all 0 where transformers' tokenizer for this folder returns
    /// none (its class's `model_input_names` lack `token_type_ids`: every class but BERT's),
    /// as the model then sees them.
    pub fn tokenize_pairs(&self, pairs: &[(String, String)]) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        room_for_text(&self.tokenizer, &self.opts, true)?;
        let inputs: Vec<tokenizers::EncodeInput> = pairs
            .iter()
            .map(|(a, b)| (format!("{}{a}", self.opts.prefix), b.clone()).into())
            .collect();
        let mut out = self.encode(inputs)?;
        if !self.token_types {
            out.iter_mut().for_each(|(_, types)| types.fill(0));
        }
        Ok(out)
    }

    /// Tokenizes query-passage pairs `(query, title, text)` for a cross-encoder in `format`
    /// ([`pair_input`]): Tevatron's one string each, or a text pair each with its token
    /// types (`None` for the one-string form, whose token types are all 0).
    pub fn tokenize_cross<'a>(
        &self,
        format: PairFormat,
        (query_prefix, passage_prefix): (&str, &str),
        pairs: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) -> Result<CrossTokens> {
        let inputs = pairs.into_iter().map(|(q, title, text)| {
            pair_input(format, q, title, text, query_prefix, passage_prefix)
        });
        match format {
            PairFormat::Tevatron => {
                let texts: Vec<String> = inputs.map(|(one, _)| one).collect();
                Ok((self.tokenize(&texts)?, None))
            }
            PairFormat::Pair => {
                let texts: Vec<(String, String)> =
                    inputs.map(|(q, p)| (q, p.unwrap_or_default())).collect();
                let (ids, types) = self.tokenize_pairs(&texts)?.into_iter().unzip();
                Ok((ids, Some(types)))
            }
        }
    }

    /// Encodes inputs in parallel into ids and token types, with the EOS appended when asked
    /// (its token type that of the token before). The tokenizers crate trusts its file: a
    /// tokenizer.json that deserialises but is inconsistent (a post-processor template naming a
    /// special token the file does not define) panics while encoding. That is reported as an
    /// error on the file.
    fn encode<'s, I>(&self, inputs: Vec<I>) -> Result<Vec<(Vec<u32>, Vec<u32>)>>
    where
        I: Into<tokenizers::EncodeInput<'s>> + Send,
    {
        let encodings = caught_panic::catch(|| {
            self.tokenizer.encode_batch(inputs, self.opts.add_special_tokens)
        })
        .map_err(|panic| Error::Tokenizer {
            path: self.path.clone(),
            message: format!("the tokenizer failed ({panic}); the file is inconsistent"),
        })?
        .map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(encodings
            .into_iter()
            .map(|e| {
                let (mut ids, mut types) = (e.get_ids().to_vec(), e.get_type_ids().to_vec());
                if self.opts.append_eos {
                    ids.push(self.eos_id.expect("checked in prepare"));
                    types.push(types.last().copied().unwrap_or(0));
                }
                (ids, types)
            })
            .collect())
    }

    /// The options this tokenizer applies.
    pub fn options(&self) -> &TextOptions {
        &self.opts
    }
}

/// The tokenizer's truncation length (the max length, less the EOS `--append_eos_token`
/// appends), refused when the tokenizer's own special tokens fill it (as `[CLS]` and `[SEP]` do
/// a length of 2): the tokenizers crate subtracts them from it without a check, which
/// overflows, and no text would be left anyway.
fn room_for_text(tokenizer: &Tokenizer, opts: &TextOptions, pair: bool) -> Result<usize> {
    let budget = opts.max_len.saturating_sub(usize::from(opts.append_eos));
    let specials = match tokenizer.get_post_processor() {
        Some(processor) if opts.add_special_tokens => processor.added_tokens(pair),
        _ => 0,
    };
    if budget <= specials {
        let what = if pair { "a text pair" } else { "a text" };
        return Err(Error::Invalid(format!(
            "max length {} leaves no room for text: the tokenizer adds {specials} special \
             token(s) to {what}{}",
            opts.max_len,
            if opts.append_eos { ", and --append_eos_token one more" } else { "" }
        )));
    }
    Ok(budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_class_is_transformers_autotokenizer_choice() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let xlmr = v(r#"{"model_type": "xlm-roberta"}"#);
        let fast = v(r#"{"tokenizer_class": "XLMRobertaTokenizerFast"}"#);
        assert_eq!(transformers_class(Some(&fast), None).as_deref(), Some(XLMR_CLASS));
        assert_eq!(transformers_class(None, Some(&xlmr)).as_deref(), Some(XLMR_CLASS));
        assert_eq!(transformers_class(Some(&v("{}")), Some(&xlmr)).as_deref(), Some(XLMR_CLASS));
        // A named class wins over the model type (transformers trusts the folder's class).
        let backend = v(r#"{"tokenizer_class": "TokenizersBackend"}"#);
        assert_eq!(
            transformers_class(Some(&backend), Some(&xlmr)).as_deref(),
            Some("TokenizersBackend")
        );
        let named_in_config = v(r#"{"model_type": "bert", "tokenizer_class": "BertTokenizer"}"#);
        assert_eq!(
            transformers_class(None, Some(&named_in_config)).as_deref(),
            Some("BertTokenizer")
        );
        assert_eq!(transformers_class(None, Some(&v(r#"{"model_type": "bert"}"#))), None);
        assert_eq!(transformers_class(Some(&v(r#"{"tokenizer_class": 5}"#)), None), None);
        // Token types reach the model only for the classes that return them.
        let bert = v(r#"{"model_type": "bert"}"#);
        assert!(returns_token_types(None, Some(&bert)));
        assert!(returns_token_types(Some(&v(r#"{"tokenizer_class": "BertTokenizerFast"}"#)), None));
        assert!(!returns_token_types(
            Some(&v(r#"{"tokenizer_class": "TokenizersBackend"}"#)),
            Some(&bert)
        ));
        assert!(!returns_token_types(
            Some(&v(r#"{"tokenizer_class": "DistilBertTokenizer"}"#)),
            None
        ));
        assert!(!returns_token_types(None, Some(&v(r#"{"model_type": "roberta"}"#))));
        let stated = v(
            r#"{"tokenizer_class": "RobertaTokenizer", "model_input_names": ["input_ids", "token_type_ids"]}"#,
        );
        assert!(returns_token_types(Some(&stated), None));
    }

    /// A Unigram tokenizer.json in the form transformers 4 converted XLM-R (as the hub ships it).
    fn hub_form_xlmr() -> Value {
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]},
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "add_prefix_space": true},
            "post_processor": null, "decoder": null,
            "model": {"type": "Unigram", "unk_id": 3, "byte_fallback": false, "vocab": [
                ["<s>", 0.0], ["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0], ["\u{2581}", -2.0],
                ["\u{2581}query", -1.0], ["query", -1.0], [":", -1.0], ["\u{2581}a", -1.0]]}
        })
    }

    fn pieces(json: Value, text: &str) -> Vec<String> {
        let tokenizer: Tokenizer = serde_json::from_value(json).unwrap();
        tokenizer.encode(text, false).unwrap().get_tokens().to_vec()
    }

    #[test]
    fn xlmr_gets_the_pipeline_transformers_5_rebuilds() {
        // The file's own pipeline: trailing white space becomes a "▁" token.
        assert_eq!(pieces(hub_form_xlmr(), "query: "), ["▁query", ":", "▁"]);
        assert_eq!(pieces(hub_form_xlmr(), " "), ["▁"]);
        let mut json = hub_form_xlmr();
        xlmr_pipeline(&mut json, None);
        assert_eq!(json["normalizer"], Value::Null, "only a Precompiled normalizer is kept");
        assert_eq!(pieces(json.clone(), "query: "), ["▁query", ":"]);
        assert_eq!(pieces(json.clone(), "  a \n query:\t"), ["▁a", "▁query", ":"]);
        assert!(pieces(json, " ").is_empty());
        // add_prefix_space false: no "▁" prepended to any word.
        let mut json = hub_form_xlmr();
        xlmr_pipeline(&mut json, Some(&serde_json::json!({"add_prefix_space": false})));
        assert_eq!(pieces(json, "query: "), ["query", ":"]);
        // The SentencePiece normalizer survives, alone.
        let precompiled = serde_json::json!({"type": "Precompiled", "precompiled_charsmap": ""});
        let mut json = hub_form_xlmr();
        json["normalizer"]["normalizers"].as_array_mut().unwrap().insert(0, precompiled.clone());
        xlmr_pipeline(&mut json, None);
        assert_eq!(json["normalizer"], precompiled);
        // Anything but a Unigram model is left alone.
        let mut bpe = hub_form_xlmr();
        bpe["model"] = serde_json::json!({"type": "BPE", "vocab": {}, "merges": []});
        let before = bpe.clone();
        xlmr_pipeline(&mut bpe, None);
        assert_eq!(bpe, before);
    }
}
