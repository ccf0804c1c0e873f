//! `tevatron rerank`: score query-passage pairs with a cross-encoder and write Tevatron's
//! `qid<TAB>docid<TAB>score` ranking. The pairs come from a rerank input file (Tevatron's
//! `--dataset_path`) or from a run's top `--rerank_depth` documents per query; they are
//! tokenized and scored in chunks, each cut into length-sorted batches.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tevatron_ir::records::count_rows;
use tevatron_ir::rerank::{
    pairs_from_run, write_reranked, PairFormat, PairReader, RerankPair, RunPairs,
};
use tevatron_model::encoder::{BatchOptions, EMBED_CHUNK};
use tevatron_model::text::{CrossTokens, PreparedTokenizer};
use tevatron_model::{Encoder, EncoderOptions, PaddingSide, ScoreHeadOptions, TextOptions};

use crate::args::{CrossEncoderFlags, RerankArgs};
use crate::progress;

/// `--pair_format auto` for a model folder: sentence-transformers' text pair for a
/// CrossEncoder folder, unless the folder says which format it was trained on
/// (`tevatron_pair_format`, which our saved rerankers write); Tevatron's one string otherwise.
/// A CrossEncoder folder states an activation for sentence-transformers in its `config.json`
/// (v4's `sentence_transformers` key, or the older `sbert_ce_default_activation_function`), or
/// is a `*ForSequenceClassification` with `config_sentence_transformers.json` beside it. That
/// file alone does not make one: every SentenceTransformer bi-encoder folder has it too.
fn folder_format(model_dir: &Path) -> PairFormat {
    let config: Option<serde_json::Value> = std::fs::read_to_string(model_dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let config = config.unwrap_or_default();
    if let Some(recorded) = config.get("tevatron_pair_format") {
        return PairFormat::from_recorded(recorded.as_str());
    }
    let classifier = config["architectures"].as_array().is_some_and(|a| {
        a.iter().any(|c| c.as_str().is_some_and(|c| c.ends_with("ForSequenceClassification")))
    });
    let cross_encoder = config.get("sentence_transformers").is_some()
        || config.get("sbert_ce_default_activation_function").is_some()
        || (classifier && model_dir.join("config_sentence_transformers.json").is_file());
    if cross_encoder {
        PairFormat::Pair
    } else {
        PairFormat::Tevatron
    }
}

/// How a cross-encoder takes its pairs, for `rerank`, `annotate` and `train-reranker`: the
/// format `--pair_format` names; else, for a LoRA adapter our trainer wrote, the format its
/// `training_args.json` records (`tevatron` when it records none, as every adapter trained
/// before the record), whatever its base folder would choose (the adapter folder has no config
/// of its own that could say so); else the model folder's ([`folder_format`]). The log says
/// which, and why when the adapter's record decided.
pub(super) fn resolve_pair_format(
    named: Option<PairFormat>,
    adapter: Option<&str>,
    cache_dir: Option<&Path>,
    model_dir: &Path,
) -> PairFormat {
    if let Some(format) = named {
        return format;
    }
    let recorded = adapter.and_then(|a| super::training_record(None, Some(a), cache_dir));
    match recorded {
        Some((dir, args)) => {
            let format = PairFormat::from_recorded(args["pair_format"].as_str());
            tracing::info!(
                "{} was trained by tevatron train-reranker on pairs in the {} format (its \
                 training_args.json), whatever the base folder says",
                dir.display(),
                format.name()
            );
            format
        }
        None => folder_format(model_dir),
    }
}

/// Where the pairs come from, read a chunk at a time: rerank input rows (streamed from the
/// files), or a run's pairs (each text held once).
enum Source {
    Rows(Box<PairReader>),
    Run(RunPairs, usize),
}

impl Source {
    /// The next `n` pairs (none at the end).
    fn next_chunk(&mut self, n: usize) -> Result<Vec<RerankPair>> {
        match self {
            Source::Rows(reader) => reader.next_chunk(n).context("reading the rerank input"),
            Source::Run(pairs, at) => {
                let end = (*at + n).min(pairs.len());
                let chunk = pairs.get(*at..end);
                *at = end;
                Ok(chunk)
            }
        }
    }
}

/// The pairs of one shard (`--dataset_number_of_shards`, `--dataset_shard_index`): the
/// positions `range` of the source's pairs, read a chunk at a time.
struct Shard {
    source: Source,
    /// The position of the source's next pair.
    at: usize,
    range: std::ops::Range<usize>,
}

impl Shard {
    /// The shard's next `n` pairs at most (none at its end); pairs before it are read and
    /// dropped.
    fn next_chunk(&mut self, n: usize) -> Result<Vec<RerankPair>> {
        loop {
            if self.at >= self.range.end {
                return Ok(Vec::new());
            }
            let want = n.min(self.range.end - self.at);
            let mut chunk = self.source.next_chunk(want)?;
            let first = self.at;
            self.at += chunk.len();
            if chunk.is_empty() {
                return Ok(chunk);
            }
            if self.at <= self.range.start {
                continue;
            }
            return Ok(chunk.split_off(self.range.start.saturating_sub(first)));
        }
    }
}

/// The pairs the flags name, and how many there are: a rerank input, or a run with its
/// queries and corpus. The texts may not be written over by the scores (a run, of the
/// output's own form, may), which is refused before they are read.
fn input_pairs(a: &RerankArgs) -> Result<(Source, usize)> {
    match (&a.run_path, &a.data.dataset_path) {
        (Some(_), Some(_)) => {
            bail!("give either --dataset_path (a rerank input) or --run_path, not both")
        }
        (Some(run), None) => {
            let (Some(queries), Some(corpus)) = (&a.query_path, &a.corpus_path) else {
                bail!("--run_path needs --query_path and --corpus_path for the texts")
            };
            let depth = a.rerank_depth.unwrap_or(100);
            if depth == 0 {
                bail!("--rerank_depth must be at least 1");
            }
            let d = &a.data;
            let input_flags = d.dataset_name != "json"
                || d.dataset_config.is_some()
                || d.dataset_split != "train"
                || d.dataset_cache_dir.is_some();
            if input_flags {
                bail!("--dataset_name, --dataset_config, --dataset_split and --dataset_cache_dir name a rerank input; with --run_path the texts come from --query_path and --corpus_path");
            }
            refuse_as_output(a, &[queries.clone(), corpus.clone()])?;
            let pairs = pairs_from_run(
                run,
                std::slice::from_ref(queries),
                std::slice::from_ref(corpus),
                depth,
            )
            .with_context(|| format!("reading the run {} and its texts", run.display()))?;
            let n = pairs.len();
            Ok((Source::Run(pairs, 0), n))
        }
        (None, _) => {
            if a.query_path.is_some() || a.corpus_path.is_some() || a.rerank_depth.is_some() {
                bail!("--query_path, --corpus_path and --rerank_depth go with --run_path (a rerank input is scored whole)");
            }
            let files = a.data.files()?;
            refuse_as_output(a, &files)?;
            let n = count_rows(&files).context("reading the rerank input")?;
            Ok((Source::Rows(Box::new(PairReader::new(files))), n))
        }
    }
}

/// Refuses a `--rerank_output_path` that names one of the `texts` files.
fn refuse_as_output(a: &RerankArgs, texts: &[std::path::PathBuf]) -> Result<()> {
    let flag = "--rerank_output_path";
    Ok(tevatron_ir::atomic::refuse_input_as_output(&a.rerank_output_path, texts, flag)?)
}

/// How pairs become token ids: the format, Tevatron's prefixes, the length rules.
pub(super) struct PairInput {
    format: PairFormat,
    query_prefix: String,
    passage_prefix: String,
    /// The tokenizer set up once for `--rerank_max_len` and `--append_eos_token`.
    tokenizer: PreparedTokenizer,
}

impl PairInput {
    /// Settles the format from `--pair_format` and the folder (logging which), with the
    /// prefixes of Tevatron's format, `--rerank_max_len` and `--append_eos_token`.
    pub(super) fn new(f: &CrossEncoderFlags, enc: &Encoder) -> Result<Self> {
        let (query_prefix, passage_prefix) = (f.query_prefix.as_str(), f.passage_prefix.as_str());
        let format = resolve_pair_format(
            f.pair_format.named(),
            f.lora_name_or_path.as_deref(),
            f.cache_dir.as_deref(),
            enc.model_dir(),
        );
        log_format(format, query_prefix, passage_prefix);
        warn_unlike_training(f, format);
        let text = TextOptions {
            max_len: pair_max_len(f, format, enc.model_dir()),
            // Tevatron's prefixes are inside its formatted string; a text pair takes none.
            prefix: String::new(),
            append_eos: f.append_eos_token,
            add_special_tokens: true,
        };
        let (query_prefix, passage_prefix) = (query_prefix.to_string(), passage_prefix.to_string());
        let tokenizer = enc.tokenizer().prepare(&text)?;
        Ok(Self { format, query_prefix, passage_prefix, tokenizer })
    }

    /// Token ids (and token types, for text pairs) of a chunk of pairs.
    pub(super) fn tokenize(&self, pairs: &[RerankPair]) -> Result<CrossTokens> {
        let prefixes = (self.query_prefix.as_str(), self.passage_prefix.as_str());
        let pairs = pairs.iter().map(|p| (p.query.as_str(), p.title.as_str(), p.text.as_str()));
        Ok(self.tokenizer.tokenize_cross(self.format, prefixes, pairs)?)
    }
}

/// `--rerank_max_len`; when it is not given, 512 (Tevatron's), except that for text pairs a
/// folder that does not record a format of ours (a CrossEncoder's, not one this tool
/// trained) and whose tokenizer says a shorter `model_max_length` (what sentence-transformers'
/// `CrossEncoder` saves its `max_length` as, and cuts its pairs at) is read at that length, so
/// that the scores are `CrossEncoder.predict`'s; the log says so.
fn pair_max_len(f: &CrossEncoderFlags, format: PairFormat, model_dir: &Path) -> usize {
    if let Some(given) = f.rerank_max_len {
        return given;
    }
    let read = |file: &str| -> serde_json::Value {
        std::fs::read_to_string(model_dir.join(file))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    };
    let ours = read("config.json").get("tevatron_pair_format").is_some();
    let saved = read("tokenizer_config.json")["model_max_length"].as_u64();
    match saved {
        Some(m)
            if format == PairFormat::Pair && !ours && (1..DEFAULT_PAIR_LEN as u64).contains(&m) =>
        {
            tracing::info!(
                "pairs cut at {m} tokens, the model_max_length of {} (CrossEncoder's \
                 max_length); --rerank_max_len sets another",
                model_dir.join("tokenizer_config.json").display()
            );
            m as usize
        }
        _ => DEFAULT_PAIR_LEN,
    }
}

/// `--rerank_max_len` when neither the flag nor the folder says otherwise: Tevatron's.
const DEFAULT_PAIR_LEN: usize = 512;

/// Warns where the input settings in force differ from those the model (or adapter) was
/// trained with, as its `training_args.json` records them: `--append_eos_token` and, in
/// Tevatron's format, the prefixes change what the model reads, and scores move with them.
/// Only the pair format is taken from the record; these stay the flags' (Tevatron's rerank
/// driver reads them from its own flags too).
fn warn_unlike_training(f: &CrossEncoderFlags, format: PairFormat) {
    let record = super::training_record(
        Some(&f.model_name_or_path),
        f.lora_name_or_path.as_deref(),
        f.cache_dir.as_deref(),
    );
    let Some((dir, args)) = record else { return };
    let mut unlike = Vec::new();
    if let Some(trained) = args["append_eos_token"].as_bool() {
        if trained != f.append_eos_token {
            unlike.push(format!("--append_eos_token {trained} (here {})", f.append_eos_token));
        }
    }
    if format == PairFormat::Tevatron {
        for (flag, given) in
            [("query_prefix", &f.query_prefix), ("passage_prefix", &f.passage_prefix)]
        {
            // Records from before the values in force were written hold null: not compared.
            if let Some(trained) = args[flag].as_str() {
                if trained != given {
                    unlike.push(format!("--{flag} {trained:?} (here {given:?})"));
                }
            }
        }
    }
    if !unlike.is_empty() {
        tracing::warn!(
            "{} was trained with {}: give the same to score pairs as it learnt to read them",
            dir.join("training_args.json").display(),
            unlike.join(", ")
        );
    }
}

/// Says in the log how pairs become model input (`rerank`, `annotate`, `train-reranker`).
pub(super) fn log_format(format: PairFormat, query_prefix: &str, passage_prefix: &str) {
    match format {
        PairFormat::Tevatron => tracing::info!(
            "pairs in Tevatron's format: \"{query_prefix} <query> {passage_prefix} <title> <text>\" as one text"
        ),
        PairFormat::Pair => tracing::info!(
            "pairs as sentence-transformers' CrossEncoder gives them: (query, title and text) \
             as a text pair; --query_prefix and --passage_prefix apply only to Tevatron's format"
        ),
    }
}

/// Loads a cross-encoder for scoring (a folder without a head is refused), with the batches
/// its pairs are scored in.
pub(super) fn load_reranker(f: &CrossEncoderFlags) -> Result<(Encoder, BatchOptions)> {
    if f.per_device_eval_batch_size == 0 {
        bail!("--per_device_eval_batch_size must be at least 1");
    }
    let (device, dtype, cpu_products) =
        super::inference_precision(f.device.as_deref(), f.fp16, f.bf16, f.int8)?;
    let opts = EncoderOptions {
        dtype,
        device: device.clone(),
        score_head: Some(ScoreHeadOptions { init_missing: false, seed: 0 }),
        cpu_products,
        lora: f
            .lora_name_or_path
            .as_deref()
            .map(|l| super::merged_adapter(l, f.cache_dir.as_deref()))
            .transpose()?,
        ..EncoderOptions::default()
    };
    let enc = super::load_encoder(
        &f.model_name_or_path,
        f.tokenizer_name.as_deref(),
        f.cache_dir.as_deref(),
        &opts,
    )?;
    let batches = BatchOptions::for_encoding(
        f.per_device_eval_batch_size,
        f.rerank_max_len.unwrap_or(DEFAULT_PAIR_LEN),
        f.pad_to_multiple_of,
        PaddingSide::Right,
        &device,
    );
    Ok((enc, batches))
}

/// Runs `tevatron rerank`.
pub fn run(a: &RerankArgs) -> Result<()> {
    crate::tune_allocator();
    if let Some(dir) = &a.output_dir {
        tracing::info!(
            "--output_dir {} changes nothing here: the scores go to --rerank_output_path",
            dir.display()
        );
    }
    let (shards, index) = (a.dataset_number_of_shards, a.dataset_shard_index);
    if shards == 0 {
        bail!("--dataset_number_of_shards must be at least 1");
    }
    if index >= shards {
        bail!("--dataset_shard_index {index} must be below --dataset_number_of_shards {shards}");
    }
    let (source, all) = input_pairs(a)?;
    if all == 0 {
        bail!("there are no pairs to rerank");
    }
    let range = tevatron_ir::records::shard_range(all, shards, index);
    if shards > 1 {
        tracing::info!(
            "shard {index} of {shards}: pairs {}..{} of {all}",
            range.start + 1,
            range.end
        );
    }
    let total = range.len();
    if total == 0 {
        tracing::info!("shard {index} of {shards} holds no pair: writing an empty ranking");
        write_reranked(&a.rerank_output_path, &[]).context("writing --rerank_output_path")?;
        return Ok(());
    }
    let mut source = Shard { source, at: 0, range };
    let (enc, batches) = load_reranker(&a.model)?;
    let input = PairInput::new(&a.model, &enc)?;
    let bar = progress::bar(Some(total as u64), "pairs", a.quiet);
    let mut log = progress::LogProgress::new(total, "pairs", a.quiet);
    let start = std::time::Instant::now();
    // Only ids and scores are kept: the texts of one chunk at a time.
    let mut scored: Vec<(String, String, f32)> = Vec::with_capacity(total);
    loop {
        let chunk = source.next_chunk(EMBED_CHUNK)?;
        if chunk.is_empty() {
            break;
        }
        let (ids, types) = input.tokenize(&chunk)?;
        let scores = enc.embed_typed(&ids, types.as_deref(), &batches)?;
        bar.inc(chunk.len() as u64);
        log.advance(chunk.len());
        scored.extend(chunk.into_iter().zip(scores).map(|(p, s)| (p.query_id, p.docid, s)));
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let rows: Vec<(&str, &str, f32)> =
        scored.iter().map(|(q, d, s)| (q.as_str(), d.as_str(), *s)).collect();
    write_reranked(&a.rerank_output_path, &rows).context("writing --rerank_output_path")?;
    tracing::info!(
        "reranked {} pairs in {secs:.1} s ({:.1} pairs/s) into {}",
        rows.len(),
        rows.len() as f64 / secs.max(1e-9),
        a.rerank_output_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard is its range of the pairs whatever the chunk size: pairs before it are read and
    /// dropped, and reading stops at its end.
    #[test]
    fn a_shard_reads_its_range_of_the_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("in.jsonl");
        let rows: String = (0..7)
            .map(|i| {
                format!(
                    "{{\"query_id\":\"q\",\"query\":\"q\",\"docid\":\"d{i}\",\"text\":\"t\"}}\n"
                )
            })
            .collect();
        std::fs::write(&file, rows).unwrap();
        for (range, n) in [(2..5, 2), (2..5, 1), (0..7, 3), (6..7, 4), (3..3, 2)] {
            let source = Source::Rows(Box::new(PairReader::new(vec![file.clone()])));
            let mut shard = Shard { source, at: 0, range: range.clone() };
            let mut got = Vec::new();
            loop {
                let chunk = shard.next_chunk(n).unwrap();
                if chunk.is_empty() {
                    break;
                }
                assert!(chunk.len() <= n);
                got.extend(chunk.into_iter().map(|p| p.docid));
            }
            let want: Vec<String> = range.clone().map(|i| format!("d{i}")).collect();
            assert_eq!(got, want, "{range:?} in chunks of {n}");
        }
    }
}
