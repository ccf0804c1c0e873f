//! The [`Encoder`]: a backbone plus pooling and optional normalisation, loaded from a Hugging
//! Face folder with its tokenizer. `Encoder::encode` is the differentiable core shared by
//! training and inference; `Encoder::embed_sequences` is the inference path that sorts by
//! length, cuts batches by a token budget and restores the input order. Knows nothing of files
//! beyond the model folder, nor of the command line.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tevatron_ir::rerank::PairFormat;

use crate::backbone::bf16::Bf16Kernels;
use crate::backbone::int8::Int8Kernels;
use crate::backbone::layers::{Linears, ReducedKernels};
use crate::backbone::{Backbone, Mode, SequenceClassification};
use crate::collate::{collate_typed, Batch, PaddingSide};
use crate::config::ModelConfig;
use crate::head::{self, HeadSettings, ScoreHead};
use crate::lora::{self, LoraConfig, LoraOptions, LoraPlan, TrainableAdapter};
use crate::pooling::{l2_normalize, Pooling};
use crate::st_modules::{self, Dense};
use crate::text::{TextOptions, TextTokenizer};
use crate::{weights, Error, Result};

/// How to load an [`Encoder`].
#[derive(Clone, Debug)]
pub struct EncoderOptions {
    /// Pooling; `None` takes the sentence-transformers folder's, else Tevatron's default `cls`.
    pub pooling: Option<Pooling>,
    /// L2-normalise; `None` takes the sentence-transformers folder's, else `false`.
    pub normalize: Option<bool>,
    /// Compute dtype of weights and activations.
    pub dtype: DType,
    /// Where to run.
    pub device: Device,
    /// Keep weights as trainable variables (training); otherwise plain tensors.
    pub trainable: bool,
    /// Set every dropout probability to 0 (parity checks).
    pub disable_dropout: bool,
    /// LoRA: train an adapter on a frozen base, or merge a saved one for inference.
    pub lora: Option<LoraOptions>,
    /// Load the model as a cross-encoder: a one-logit score head in place of pooling.
    pub score_head: Option<ScoreHeadOptions>,
    /// The precision of the backbone's projections in inference on the CPU (F32 weights only);
    /// a score head stays in F32.
    pub cpu_products: CpuProducts,
}

/// What a model's projections compute in on the CPU in inference: F32, or a reduced precision
/// whose kernels are chosen for this CPU at load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuProducts {
    /// F32 products (the gemm crate).
    #[default]
    F32,
    /// int8 weights and activations with exact integer sums (`backbone::int8`, `--int8`).
    Int8,
    /// bf16 weights and activations with F32 sums (`backbone::bf16`, `--bf16` on a CPU with
    /// AMX-BF16 or AVX-512 BF16); refused at load on a CPU without either.
    Bf16,
}

impl CpuProducts {
    /// A name for messages: `F32`, `int8` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::Int8 => "int8",
            Self::Bf16 => "bf16",
        }
    }
}

/// How a cross-encoder's score head is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreHeadOptions {
    /// Initialise the head's missing weights (a base model being trained into a reranker), as
    /// transformers does; otherwise a folder without a head is an error.
    pub init_missing: bool,
    /// Seed of the initialised weights.
    pub seed: u64,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        Self {
            pooling: None,
            normalize: None,
            dtype: DType::F32,
            device: Device::Cpu,
            trainable: false,
            disable_dropout: false,
            lora: None,
            score_head: None,
            cpu_products: CpuProducts::F32,
        }
    }
}

/// How sequences are grouped into batches for inference.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// At most this many sequences per batch (`--per_device_eval_batch_size`).
    pub batch_size: usize,
    /// At most this many padded tokens per batch; short texts form larger batches. A single
    /// sequence longer than the budget still makes a batch of one.
    pub token_budget: usize,
    /// Pad lengths up to a multiple of this (`--pad_to_multiple_of`).
    pub pad_to_multiple_of: usize,
    /// Side padding goes on (`--padding_side`).
    pub padding_side: PaddingSide,
}

/// Records tokenized and encoded together by `tevatron encode` (and by validation during
/// training, which must batch as encode does): large enough to sort by length usefully, small
/// enough that memory stays at a few batches.
pub const EMBED_CHUNK: usize = 4096;

/// Largest padded token count per batch on a CPU: larger batches add no speed there, only
/// bigger buffers (and activations past the allocator's mmap threshold).
const MAX_CPU_BATCH_TOKENS: usize = 4096;

impl BatchOptions {
    /// The batches `tevatron encode` uses: `batch_size` texts of at most `max_len` tokens, the
    /// token budget capped on a CPU (a GPU takes whole batches).
    pub fn for_encoding(
        batch_size: usize,
        max_len: usize,
        pad_to_multiple_of: usize,
        padding_side: PaddingSide,
        device: &Device,
    ) -> Self {
        let tokens = batch_size * max_len.max(1);
        let token_budget = if device.is_cpu() { tokens.min(MAX_CPU_BATCH_TOKENS) } else { tokens };
        Self {
            batch_size,
            token_budget,
            pad_to_multiple_of: pad_to_multiple_of.max(1),
            padding_side,
        }
    }
}

/// Where the pooling and normalisation in force came from, for the log.
///
/// The rule users of Tevatron expect: a folder's own settings (its sentence-transformers
/// modules) are used only when neither `--pooling` nor `--normalize` is given; once either is
/// given, Tevatron's defaults (`cls`, no normalisation) hold for the other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DefaultsSource {
    /// Both given by the user.
    User,
    /// One given by the user; Tevatron's default for the other. The folder's own settings, if
    /// it states any, are named so the log can say they were not used.
    UserAndTevatron {
        /// The sentence-transformers folder's settings that were set aside, e.g. "mean
        /// pooling, normalize true".
        folder: Option<String>,
    },
    /// Taken from `modules.json` / `1_Pooling/config.json` (no flag given).
    SentenceTransformers(String),
    /// Tevatron's own defaults (`cls`, no normalisation): no flag given and the folder states
    /// none.
    Tevatron,
}

/// Settles the pooling and normalisation in force from the flags (`pooling`, `normalize`) and
/// the folder's sentence-transformers settings (`folder`: its pooling, if it has a Pooling
/// module, and whether it has a Normalize module), by the rule on [`DefaultsSource`].
pub fn resolve_pooling(
    folder: Option<(Option<Pooling>, bool)>,
    pooling: Option<Pooling>,
    normalize: Option<bool>,
) -> (Pooling, bool, DefaultsSource) {
    let folder = folder.filter(|(p, n)| p.is_some() || *n);
    match (pooling, normalize, folder) {
        (Some(p), Some(n), _) => (p, n, DefaultsSource::User),
        (None, None, Some((p, n))) => {
            let p = p.unwrap_or(Pooling::Cls);
            (p, n, DefaultsSource::SentenceTransformers(String::new()))
        }
        (None, None, None) => (Pooling::Cls, false, DefaultsSource::Tevatron),
        (p, n, folder) => {
            let folder = folder.map(|(fp, fnorm)| {
                format!("{} pooling, normalize {fnorm}", fp.unwrap_or(Pooling::Cls).name())
            });
            (
                p.unwrap_or(Pooling::Cls),
                n.unwrap_or(false),
                DefaultsSource::UserAndTevatron { folder },
            )
        }
    }
}

/// A loaded retrieval encoder.
pub struct Encoder {
    backbone: Box<dyn Backbone>,
    config: ModelConfig,
    pooling: Pooling,
    /// sentence-transformers Dense modules applied to the pooled vector, before normalising.
    dense: Vec<Dense>,
    normalize: bool,
    tokenizer: TextTokenizer,
    device: Device,
    dtype: DType,
    varmap: Option<VarMap>,
    /// Checkpoint tensors the architecture does not use (a pooler), kept so that a trained
    /// model is saved whole. Empty unless trainable.
    unused: std::collections::BTreeMap<String, Tensor>,
    model_dir: PathBuf,
    weights_dir: PathBuf,
    tokenizer_dir: PathBuf,
    defaults: DefaultsSource,
    /// Trainable LoRA adapters and their settings, and a cross-encoder's score head trained
    /// whole beside them; saved in PEFT's format.
    adapters: Option<(LoraConfig, Vec<TrainableAdapter>, Vec<HeadVar>)>,
    /// A cross-encoder's score head, which replaces pooling, and the head weights that were
    /// initialised because the folder had none.
    head: Option<(ScoreHead, SequenceClassification, Vec<String>)>,
    /// How a cross-encoder is given its pairs, recorded by [`Encoder::save_pretrained`] so
    /// that `tevatron rerank` gives them alike (Tevatron's one string unless set).
    pair_format: PairFormat,
}

/// A cross-encoder's score-head weight trained whole beside LoRA adapters: its name and variable.
type HeadVar = (String, candle_core::Var);

/// Task heads that are not part of the base model a retriever trains (MLM, classification).
const HEAD_PREFIXES: &[&str] = &[
    "cls.",
    // ModernBERT's MLM head (`ModernBertForMaskedLM`), beside the `model.` it strips: a
    // reranker's head takes `head.*` over, as transformers does; a retriever has none.
    "head.",
    "decoder.",
    "lm_head",
    "classifier",
    "qa_outputs",
    "vocab_transform",
    "vocab_layer_norm",
    "vocab_projector",
];

/// Files copied from the tokenizer folder into a saved model.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "added_tokens.json",
];

/// What an adapter's module names start with: nothing for a retriever (PEFT on the base model),
/// the family prefix for a cross-encoder (PEFT on its `*ForSequenceClassification` model names
/// `model.layers…`, `bert.encoder…`).
fn adapter_prefix(config: &ModelConfig, cross_encoder: bool) -> &'static str {
    if cross_encoder {
        config.weight_prefixes().first().copied().unwrap_or_default()
    } else {
        ""
    }
}

/// Settles a cross-encoder's head before the weights become variables: the family's layout,
/// its settings from `config.json` (dropout, pad id), and each missing head weight initialised into `tensors` when
/// `opts` allows it (their names are returned, for the log), else an error naming them.
fn plan_head(
    config: &ModelConfig,
    config_path: &Path,
    tensors: &mut std::collections::HashMap<String, Tensor>,
    opts: ScoreHeadOptions,
    device: &Device,
) -> Result<(SequenceClassification, HeadSettings, Vec<String>)> {
    let dir = config_path.parent().unwrap_or(config_path).to_path_buf();
    let Some(spec) = config.sequence_classification() else {
        return Err(Error::Invalid(format!(
            "{}: model_type {} has no sequence-classification head in this build (cross-encoders: \
             bert, roberta, xlm-roberta, distilbert, modernbert, llama, mistral, qwen2, qwen3)",
            config_path.display(),
            config.model_type()
        )));
    };
    if let crate::backbone::HeadLayout::Prediction(p) = spec.layout {
        if p.activation.is_none() {
            return Err(Error::Invalid(format!(
                "{}: classifier_activation is {}",
                config_path.display(),
                head::UNKNOWN_ACTIVATION
            )));
        }
    }
    let text = std::fs::read_to_string(config_path)
        .map_err(|source| Error::Read { path: config_path.to_path_buf(), source })?;
    let settings: HeadSettings = serde_json::from_str(&text)
        .map_err(|source| Error::Json { path: config_path.to_path_buf(), source })?;
    let shapes = head::weight_shapes(spec.layout, config.hidden_size());
    for (name, shape) in &shapes {
        if let Some(t) = tensors.get(name) {
            if t.dims() != shape.as_slice() {
                return Err(Error::Weights {
                    path: dir,
                    what: format!(
                        "{name} has shape {:?}, but a one-logit score head (num_labels = 1) needs {shape:?}",
                        t.dims()
                    ),
                });
            }
        }
    }
    let missing: Vec<(String, Vec<usize>)> =
        shapes.into_iter().filter(|(n, _)| !tensors.contains_key(n)).collect();
    let names: Vec<String> = missing.iter().map(|(n, _)| n.clone()).collect();
    if !missing.is_empty() {
        if !opts.init_missing {
            return Err(Error::Weights {
                path: dir,
                what: format!(
                    "no score head ({} missing): this folder is not a {}; a base model becomes \
                     a reranker with `tevatron train-reranker`, which initialises the head",
                    names.join(", "),
                    spec.class
                ),
            });
        }
        let h = config.hidden_size();
        let draw = |name: &str| settings.draw(spec.layout, name, h);
        tensors.extend(head::init_weights(&missing, draw, opts.seed, device)?);
    }
    Ok((spec, settings, names))
}

/// The name an adapter records for its base: the hub id for a folder of the Hugging Face cache
/// (`.../models--org--name/snapshots/<sha>` → `org/name`), else the folder as given.
fn base_model_name(model_dir: &Path) -> String {
    model_dir
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .find_map(|c| c.strip_prefix("models--"))
        .map(|id| id.replacen("--", "/", 1))
        .unwrap_or_else(|| model_dir.to_string_lossy().into_owned())
}

/// Copies the tokenizer files that `from` has into `to` (a saved model or adapter folder).
pub(crate) fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, to.join(f))
                .map_err(|source| Error::Write { path: to.join(f), source })?;
        }
    }
    Ok(())
}

impl Encoder {
    /// Loads the model in `model_dir` (and the tokenizer from `tokenizer_dir`, default the
    /// model folder).
    pub fn load(
        model_dir: &Path,
        tokenizer_dir: Option<&Path>,
        opts: &EncoderOptions,
    ) -> Result<Self> {
        if !model_dir.is_dir() {
            return Err(Error::NotFound(format!(
                "model folder {} does not exist",
                model_dir.display()
            )));
        }
        let reduced = opts.cpu_products != CpuProducts::F32;
        if reduced && (opts.trainable || !opts.device.is_cpu() || opts.dtype != DType::F32) {
            return Err(Error::Invalid(format!(
                "{} products run inference on the CPU from F32 weights: not with training, a GPU, or a half-precision dtype",
                opts.cpu_products.name()
            )));
        }
        let reduced = match opts.cpu_products {
            CpuProducts::F32 => None,
            CpuProducts::Int8 => Some(ReducedKernels::Int8(Int8Kernels::detect())),
            CpuProducts::Bf16 => match Bf16Kernels::detect() {
                Some(k) => Some(ReducedKernels::Bf16(k)),
                None => return Err(Error::Invalid(
                    "bf16 products on the CPU need AMX-BF16 or AVX-512 BF16, which this CPU lacks"
                        .into(),
                )),
            },
        };
        let st = st_modules::read(model_dir)?;
        let weights_dir = match st.as_ref().and_then(|s| s.transformer_dir.as_ref()) {
            Some(sub) => model_dir.join(sub),
            None => model_dir.to_path_buf(),
        };
        let config_path = weights_dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::NotFound(format!("{}: no config.json", weights_dir.display())));
        }
        let mut config = ModelConfig::read(&config_path)?;
        if opts.disable_dropout {
            config.disable_dropout();
        }
        let tok_dir = tokenizer_dir.map(Path::to_path_buf).unwrap_or_else(|| {
            if weights_dir.join("tokenizer.json").is_file() {
                weights_dir.clone()
            } else {
                model_dir.to_path_buf()
            }
        });
        let mut tokenizer = TextTokenizer::load(&tok_dir)?;
        tokenizer.limit_to(config.max_tokens());

        // A retriever runs the folder's pipeline after the Transformer, so what of it cannot
        // run is refused; a cross-encoder's head replaces that pipeline.
        let retriever = opts.score_head.is_none();
        if let Some(why) = st.as_ref().and_then(|s| s.unsupported.clone()).filter(|_| retriever) {
            return Err(Error::Invalid(why));
        }
        // The folder's pooling is in force when no pooling flag is given: one it states but we
        // cannot run is refused (whether or not the folder also normalises).
        if let Some(Err(why)) = st.as_ref().and_then(|s| s.pooling.clone()) {
            if retriever && opts.pooling.is_none() && opts.normalize.is_none() {
                return Err(Error::Invalid(why));
            }
        }
        let folder_pooling = st.as_ref().and_then(|s| s.pooling.clone()?.ok());
        let folder_settings = st.as_ref().map(|st| (folder_pooling, st.normalize));
        let (pooling, normalize, mut defaults) =
            resolve_pooling(folder_settings, opts.pooling, opts.normalize);
        if let DefaultsSource::SentenceTransformers(what) = &mut defaults {
            let stated = folder_pooling.is_some();
            let pooling = if stated {
                format!("pooling {}", pooling.name())
            } else {
                format!("pooling {} (Tevatron's default: the folder states none)", pooling.name())
            };
            *what = format!(
                "{pooling} and normalize {normalize} from the sentence-transformers modules of {}",
                model_dir.display()
            );
        }

        let mut tensors = weights::load(&weights_dir, config.weight_prefixes(), &opts.device)?;
        let plan = opts
            .lora
            .as_ref()
            .map(|l| {
                let prefixes = config.weight_prefixes();
                LoraPlan::new(l, opts.dtype, &opts.device, prefixes, config.hidden_size())
            })
            .transpose()?
            .map(|mut p| {
                if opts.disable_dropout {
                    p.config.lora_dropout = 0.0;
                }
                p
            });
        // A cross-encoder's head: a SEQ_CLS adapter's trained head replaces the base's.
        let head_plan = match opts.score_head {
            Some(head_opts) => {
                if let Some(plan) = &plan {
                    for (name, t) in plan.saved_modules() {
                        tensors.insert(name.clone(), t.to_device(&opts.device)?);
                    }
                }
                Some(plan_head(&config, &config_path, &mut tensors, head_opts, &opts.device)?)
            }
            None => {
                // A retriever's adapter with whole modules saved beside it (PEFT's
                // `modules_to_save`, an embedding table say): used without them it would encode
                // otherwise than PEFT does, so it is refused by name.
                if let Some(saved) = plan.as_ref().and_then(|p| p.saved_modules().keys().min()) {
                    return Err(Error::Invalid(format!(
                        "the adapter saves whole modules beside its LoRA weights ({saved}, PEFT's modules_to_save): a retriever's adapter with them is not supported"
                    )));
                }
                None
            }
        };
        // Training LoRA on a cross-encoder trains its score head whole, as PEFT's SEQ_CLS task
        // does (`modules_to_save`: `classifier`, `score`); the rest of the head stays frozen,
        // so a part of it that had to be initialised would stay random and unsaved.
        let mut head_vars = Vec::new();
        if let (Some((spec, _, initialised)), Some(plan)) = (&head_plan, &plan) {
            if opts.trainable && !plan.merges() {
                let whole =
                    |n: &str| lora::SEQ_CLS_MODULES.iter().any(|m| n.starts_with(&format!("{m}.")));
                if let Some(frozen) = initialised.iter().find(|n| !whole(n)) {
                    return Err(Error::Invalid(format!(
                        "{}: the base model has no {frozen}, which LoRA would leave frozen at its random start (PEFT's SEQ_CLS adapters save only {}); train the full model instead",
                        model_dir.display(),
                        lora::SEQ_CLS_MODULES.join(" and ")
                    )));
                }
                for (name, _) in head::weight_shapes(spec.layout, config.hidden_size()) {
                    if whole(&name) {
                        let t = tensors[&name].to_dtype(opts.dtype)?;
                        let var = candle_core::Var::from_tensor(&t)?;
                        tensors.insert(name.clone(), var.as_tensor().clone());
                        head_vars.push((name, var));
                    }
                }
            }
        }
        // Trainable weights are variables; the backbone is built over their tensors (same ids, so
        // gradients reach them), and only the names it asked for are kept in the VarMap. With
        // LoRA the base stays frozen: only the adapters become variables.
        let full_training = opts.trainable && plan.is_none();
        let mut vars = std::collections::HashMap::new();
        let tensors = if full_training {
            let mut as_vars = std::collections::HashMap::new();
            for (name, t) in tensors {
                let var = candle_core::Var::from_tensor(&t.to_dtype(opts.dtype)?)?;
                as_vars.insert(name.clone(), var.as_tensor().clone());
                vars.insert(name, var);
            }
            as_vars
        } else {
            tensors
        };
        let (backend, used) = weights::TrackedWeights::new(tensors);
        let vb = VarBuilder::from_backend(Box::new(backend), opts.dtype, opts.device.clone());
        let arch = |e: candle_core::Error| Error::Weights {
            path: weights_dir.clone(),
            what: format!("weights do not fit the {} architecture ({e})", config.model_type()),
        };
        let lin = Linears { lora: plan.as_ref(), reduced };
        let backbone: Box<dyn Backbone> = config.build(vb.clone(), &lin).map_err(arch)?;
        let head = match head_plan {
            Some((spec, settings, initialised)) => {
                let h = config.hidden_size();
                let dropout = settings.dropout(spec.layout);
                let pad = settings.pad_id();
                let mut built = ScoreHead::load(&vb, spec.layout, h, dropout, pad).map_err(arch)?;
                if opts.disable_dropout {
                    built.disable_dropout();
                }
                Some((built, spec, initialised))
            }
            None => None,
        };
        // The folder's Dense modules project the pooled vector (a cross-encoder's head replaces
        // pooling, so it has none). They train with the model; under LoRA they stay frozen.
        let mut dense = Vec::new();
        let mut dense_vars = Vec::new();
        if retriever {
            let mut width = config.hidden_size();
            for (i, (dir, cfg)) in st.iter().flat_map(|s| &s.dense).enumerate() {
                let mut d = Dense::load(dir, cfg, width, &opts.device)?;
                width = d.out_features();
                if full_training {
                    for (name, var) in d.make_trainable()? {
                        dense_vars.push((format!("{}/{name}", st_modules::dense_folder(i)), var));
                    }
                }
                dense.push(d);
            }
            if !dense.is_empty() {
                let steps: Vec<String> = dense.iter().map(Dense::describe).collect();
                tracing::info!(
                    "{}: sentence-transformers Dense modules after pooling: {}",
                    model_dir.display(),
                    steps.join("; ")
                );
            }
        }
        let mut adapters = None;
        if let Some(plan) = &plan {
            plan.check_matched()?;
            plan.check_adapter_fits()?;
            if opts.trainable && !plan.merges() {
                adapters = Some((plan.config.clone(), plan.built(), head_vars));
            }
        }
        let mut unused = std::collections::BTreeMap::new();
        let varmap = if let Some((_, built, head_vars)) = &adapters {
            let vm = VarMap::new();
            {
                // Named as the saved adapter names them (checkpoints resume by these names).
                let prefix = adapter_prefix(&config, head.is_some());
                let mut data = vm.data().lock().expect("fresh varmap lock");
                for t in built {
                    let module = format!("{prefix}{}", t.module);
                    data.insert(lora::peft_name(&module, 'A'), t.a.clone());
                    data.insert(lora::peft_name(&module, 'B'), t.b.clone());
                }
                for (name, var) in head_vars {
                    data.insert(format!("base_model.model.{name}"), var.clone());
                }
            }
            Some(vm)
        } else if full_training {
            let vm = VarMap::new();
            {
                let used = used.lock().expect("weight tracker lock");
                let mut data = vm.data().lock().expect("fresh varmap lock");
                for name in used.iter() {
                    if let Some(var) = vars.remove(name) {
                        data.insert(name.clone(), var);
                    }
                }
                data.extend(dense_vars);
            }
            for (name, var) in vars {
                if !HEAD_PREFIXES.iter().any(|p| name.starts_with(p)) {
                    unused.insert(name, var.as_tensor().clone());
                }
            }
            Some(vm)
        } else {
            None
        };
        Ok(Self {
            backbone,
            config,
            pooling,
            dense,
            normalize,
            tokenizer,
            device: opts.device.clone(),
            dtype: opts.dtype,
            varmap,
            unused,
            model_dir: model_dir.to_path_buf(),
            weights_dir,
            tokenizer_dir: tok_dir,
            defaults,
            adapters,
            head,
            pair_format: PairFormat::Tevatron,
        })
    }

    /// Hidden states of the backbone `(b, l, h)`.
    pub fn hidden_states(&self, batch: &Batch, mode: Mode) -> candle_core::Result<Tensor> {
        self.backbone.forward(batch, mode)
    }

    /// Pooled representations (projected by the folder's Dense modules, and normalised if
    /// configured) `(b, output_width)`, in F32 (F64 for an F64 model).
    pub fn encode(&self, batch: &Batch, mode: Mode) -> candle_core::Result<Tensor> {
        let hidden = self.hidden_states(batch, mode)?;
        self.represent(&hidden, batch, mode)
    }

    /// Pools last hidden states `(b, l, h)` into representations (through the folder's Dense
    /// modules, then normalised if configured); for a cross-encoder, the score head's logits
    /// `(b, 1)` instead.
    pub fn represent(
        &self,
        hidden: &Tensor,
        batch: &Batch,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        if let Some((head, _, _)) = &self.head {
            return head.score(hidden, &batch.input_ids, &batch.attention_mask, mode);
        }
        let reps = match mode {
            Mode::Eval => self.pooling.pool_inference(hidden, &batch.attention_mask)?,
            Mode::Train(_) => self.pooling.pool(hidden, &batch.attention_mask)?,
        };
        // Half-precision representations are widened; F64 stays F64 (gradient checks).
        let mut reps = if reps.dtype() == DType::F64 { reps } else { reps.to_dtype(DType::F32)? };
        for d in &self.dense {
            reps = d.forward(&reps)?;
        }
        if self.normalize {
            l2_normalize(&reps)
        } else {
            Ok(reps)
        }
    }

    /// The backbone, layer by layer (gradient checkpointing drives it directly).
    pub fn backbone(&self) -> &dyn Backbone {
        self.backbone.as_ref()
    }

    /// Every tensor a saved model's weights file holds, by Hugging Face name: the trainable
    /// variables' current values and the untouched unused tensors (sentence-transformers Dense
    /// modules' are saved in their own folders).
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> =
            self.unused.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(vm) = &self.varmap {
            let data = vm.data().lock().expect("varmap lock");
            // Dense modules' variables (`2_Dense/linear.weight`) are saved in their own folders.
            let model = data.iter().filter(|(k, _)| !k.contains('/'));
            out.extend(model.map(|(k, v)| (k.clone(), v.as_tensor().clone())));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Writes a Hugging Face model folder into `dir` (which must exist): `config.json`,
    /// `model.safetensors` (F32) and the tokenizer files, loadable by transformers'
    /// `AutoModel` and by [`Encoder::load`], plus sentence-transformers modules stating this
    /// encoder's pooling and normalisation, so that `tevatron encode` (and
    /// `SentenceTransformer`) embed with the settings the model was trained with.
    ///
    /// With trainable LoRA adapters it writes what PEFT's `save_pretrained` writes instead:
    /// `adapter_config.json` and `adapter_model.safetensors` (plus the tokenizer files), which
    /// `PeftModel.from_pretrained(base, dir)` and `--lora_name_or_path dir` load.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        copy_tokenizer_files(&self.tokenizer_dir, dir)?;
        if let Some((config, built, head_vars)) = &self.adapters {
            let prefix = adapter_prefix(&self.config, self.head.is_some());
            let modules: Vec<(String, Tensor, Tensor)> = built
                .iter()
                .map(|t| {
                    let (a, b) = (t.a.as_tensor().clone(), t.b.as_tensor().clone());
                    (format!("{prefix}{}", t.module), a, b)
                })
                .collect();
            let head: Vec<(String, Tensor)> =
                head_vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
            return lora::save_adapter(
                dir,
                config,
                &base_model_name(&self.model_dir),
                &modules,
                &head,
            );
        }
        if let Some((head, spec, _)) = &self.head {
            return self.save_cross_encoder(dir, head, *spec);
        }
        let config = self.weights_dir.join("config.json");
        std::fs::copy(&config, dir.join("config.json"))
            .map_err(|source| Error::Write { path: dir.join("config.json"), source })?;
        st_modules::write(dir, self.hidden_size(), self.pooling, &self.dense, self.normalize)?;
        let tensors: Vec<(String, Tensor)> = self
            .state_dict()
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<_>>()?;
        weights::save(&dir.join("model.safetensors"), tensors)
    }

    /// A cross-encoder in its family's `*ForSequenceClassification` layout: the base model's
    /// weights under the family prefix (`bert.`, `model.`), the head's as transformers names
    /// them, and a `config.json` naming the class with one label, the pad id a decoder's head
    /// finds the last token by, and sentence-transformers' `activation_fn` set to the identity,
    /// so that `CrossEncoder.predict` returns the raw logits `tevatron rerank` writes.
    fn save_cross_encoder(
        &self,
        dir: &Path,
        head: &ScoreHead,
        spec: SequenceClassification,
    ) -> Result<()> {
        let src = self.weights_dir.join("config.json");
        let text = std::fs::read_to_string(&src)
            .map_err(|source| Error::Read { path: src.clone(), source })?;
        let mut config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .map_err(|source| Error::Json { path: src.clone(), source })?;
        config.insert("architectures".into(), serde_json::json!([spec.class]));
        config.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
        config.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
        config.remove("num_labels");
        if spec.layout == crate::backbone::HeadLayout::LastToken {
            // The id the head skipped (the config's, else Tevatron's 0), so that transformers'
            // head scores the same token.
            let pad = head.pad_id();
            config.insert("pad_token_id".into(), pad.into());
        }
        // How `tevatron rerank` should give this model its pairs: the format it was trained
        // on, whatever the sentence-transformers key below suggests.
        config.insert("tevatron_pair_format".into(), self.pair_format.name().into());
        config.insert(
            "sentence_transformers".into(),
            serde_json::json!({"activation_fn": "torch.nn.modules.linear.Identity"}),
        );
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
        std::fs::write(&path, text).map_err(|source| Error::Write { path, source })?;
        let beside: std::collections::HashSet<String> =
            head::weight_shapes(spec.layout, self.hidden_size())
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| !head::inside_base(n))
                .collect();
        let prefix = self.config.weight_prefixes().first().copied().unwrap_or_default();
        let tensors: Vec<(String, Tensor)> = self
            .state_dict()
            .into_iter()
            .map(|(k, t)| {
                let name = if beside.contains(&k) { k } else { format!("{prefix}{k}") };
                Ok((name, t.to_dtype(DType::F32)?))
            })
            .collect::<candle_core::Result<_>>()?;
        weights::save(&dir.join("model.safetensors"), tensors)
    }

    /// The weights file [`Encoder::save_pretrained`] writes: PEFT's adapter file when training
    /// LoRA adapters, the whole model's otherwise.
    pub fn weights_file(&self) -> &'static str {
        if self.adapters.is_some() {
            "adapter_model.safetensors"
        } else {
            "model.safetensors"
        }
    }

    /// Checks that a batch layout suits the pooling (cls with left padding reads a pad token),
    /// or a cross-encoder's head (the encoder heads read the first token, but for ModernBERT's
    /// where it takes the masked mean).
    pub fn check_padding(&self, side: PaddingSide) -> Result<()> {
        use crate::backbone::HeadLayout;
        if let Some((_, spec, _)) = &self.head {
            let anywhere = match spec.layout {
                HeadLayout::LastToken => true,
                HeadLayout::Prediction(p) => p.mean_pooling,
                _ => false,
            };
            if side == PaddingSide::Left && !anywhere {
                return Err(Error::Invalid(format!(
                    "--padding_side left would put padding where the {} head reads the first token; use right padding",
                    spec.class
                )));
            }
            return Ok(());
        }
        if side == PaddingSide::Left && self.pooling == Pooling::Cls {
            return Err(Error::Invalid(
                "--pooling cls with --padding_side left would pool a padding token; use right padding or eos/last pooling".into(),
            ));
        }
        Ok(())
    }

    /// Encodes id sequences for inference and returns `(n, w)` rows in input order (`w` the
    /// [`Encoder::output_width`]: a cross-encoder's one score per row). Sequences
    /// are sorted by length (longest first) and cut into batches by `opts`.
    pub fn embed_sequences(&self, seqs: &[Vec<u32>], opts: &BatchOptions) -> Result<Vec<f32>> {
        self.embed_typed(seqs, None, opts)
    }

    /// [`Encoder::embed_sequences`] with each sequence's token types (text pairs for a
    /// cross-encoder) when `types` is given.
    pub fn embed_typed(
        &self,
        seqs: &[Vec<u32>],
        types: Option<&[Vec<u32>]>,
        opts: &BatchOptions,
    ) -> Result<Vec<f32>> {
        self.check_padding(opts.padding_side)?;
        self.check_token_ids(seqs)?;
        if let Some(t) = types.filter(|t| t.len() != seqs.len()) {
            return Err(Error::Invalid(format!(
                "{} token-type rows for {} sequences",
                t.len(),
                seqs.len()
            )));
        }
        let h = self.output_width();
        let mut out = vec![0f32; seqs.len() * h];
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
        let mut start = 0;
        while start < order.len() {
            let longest = seqs[order[start]].len().max(1);
            let padded =
                longest.div_ceil(opts.pad_to_multiple_of.max(1)) * opts.pad_to_multiple_of.max(1);
            let by_budget = (opts.token_budget / padded.max(1)).max(1);
            let end = (start + opts.batch_size.max(1).min(by_budget)).min(order.len());
            let idx = &order[start..end];
            let rows: Vec<&[u32]> = idx.iter().map(|&i| seqs[i].as_slice()).collect();
            let row_types: Option<Vec<&[u32]>> =
                types.map(|t| idx.iter().map(|&i| t[i].as_slice()).collect());
            let batch = collate_typed(
                &rows,
                row_types.as_deref(),
                self.tokenizer.pad_id(),
                opts.pad_to_multiple_of,
                opts.padding_side,
                &self.device,
            )?;
            let reps =
                self.encode(&batch, Mode::Eval)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
            for (&i, r) in idx.iter().zip(reps) {
                out[i * h..(i + 1) * h].copy_from_slice(&r);
            }
            start = end;
        }
        Ok(out)
    }

    /// Tokenizes and encodes texts (a convenience over [`Encoder::embed_sequences`]).
    pub fn embed(
        &self,
        texts: &[String],
        text: &TextOptions,
        batch_size: usize,
    ) -> Result<Vec<f32>> {
        let seqs = self.tokenizer.prepare(text)?.tokenize(texts)?;
        let opts = BatchOptions {
            batch_size,
            token_budget: batch_size * text.max_len.max(1),
            pad_to_multiple_of: 16,
            padding_side: PaddingSide::Right,
        };
        self.embed_sequences(&seqs, &opts)
    }

    /// The prompts the folder's sentence-transformers config states (name, text), which
    /// sentence-transformers prepends on request and this crate never does by itself: Tevatron
    /// prepends only `--query_prefix` / `--passage_prefix`.
    pub fn st_prompts(&self) -> Vec<(String, String)> {
        st_modules::prompts(&self.model_dir)
    }

    /// Width of the backbone's hidden states (a retriever's representations are
    /// [`Encoder::output_width`] wide).
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size()
    }
    /// Width of what [`Encoder::encode`] returns: the hidden size, the last sentence-transformers
    /// Dense module's output width when the folder has one, or 1 for a cross-encoder.
    pub fn output_width(&self) -> usize {
        if self.head.is_some() {
            1
        } else {
            self.dense.last().map_or(self.hidden_size(), Dense::out_features)
        }
    }
    /// Whether this is a cross-encoder (a score head in place of pooling).
    pub fn is_cross_encoder(&self) -> bool {
        self.head.is_some()
    }
    /// Sets how this cross-encoder is given its pairs (`train-reranker --pair_format`), which
    /// a saved folder records as `tevatron_pair_format`.
    pub fn set_pair_format(&mut self, format: PairFormat) {
        self.pair_format = format;
    }
    /// The head weights initialised at load because the folder had none (for the log).
    pub fn initialised_head(&self) -> &[String] {
        self.head.as_ref().map(|(_, _, names)| names.as_slice()).unwrap_or_default()
    }
    /// The parsed `config.json`.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    /// The pooling in use.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }
    /// Whether representations are L2-normalised.
    pub fn normalize(&self) -> bool {
        self.normalize
    }
    /// Refuses token ids (and the padding id) past the model's embedding table, naming the
    /// tokenizer: a tokenizer
    /// from another model (or added tokens the model was not resized for) is an error here, on
    /// the host, where a GPU lookup would read past the table.
    pub fn check_token_ids<S: AsRef<[u32]>>(&self, seqs: &[S]) -> Result<()> {
        let rows = self.backbone.vocab_rows();
        let pad = self.tokenizer.pad_id();
        if pad as usize >= rows {
            return Err(Error::Invalid(format!(
                "the padding id {pad} of the tokenizer at {} is past the {rows} rows of the token \
                 embeddings of {}: the tokenizer does not belong to this model",
                self.tokenizer_dir.display(),
                self.model_dir.display()
            )));
        }
        for (i, s) in seqs.iter().enumerate() {
            if let Some(&id) = s.as_ref().iter().find(|&&id| id as usize >= rows) {
                return Err(Error::Invalid(format!(
                    "token id {id} (text {i} of the batch) is past the {rows} rows of the token \
                     embeddings of {}: the tokenizer at {} does not belong to this model",
                    self.model_dir.display(),
                    self.tokenizer_dir.display()
                )));
            }
        }
        Ok(())
    }
    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }
    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The trainable variables, when loaded with `trainable` (only the adapters with LoRA). A
    /// sentence-transformers Dense module's are named by the folder they are saved in
    /// (`2_Dense/linear.weight`), the rest as in the model's weights file.
    pub fn varmap(&self) -> Option<&VarMap> {
        self.varmap.as_ref()
    }
    /// The model folder.
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }
    /// Where pooling and normalisation came from.
    pub fn defaults_source(&self) -> &DefaultsSource {
        &self.defaults
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folders_pooling_applies_only_when_no_flag_is_given() {
        use DefaultsSource as D;
        let st = Some((Some(Pooling::Mean), true));
        // No flag: the folder's settings.
        let (p, n, d) = resolve_pooling(st, None, None);
        assert_eq!((p, n), (Pooling::Mean, true));
        assert!(matches!(d, D::SentenceTransformers(_)));
        // --pooling alone: Tevatron's default for normalize (off), not the folder's.
        let (p, n, d) = resolve_pooling(st, Some(Pooling::Cls), None);
        assert_eq!((p, n), (Pooling::Cls, false));
        let folder = Some("mean pooling, normalize true".to_string());
        assert_eq!(d, D::UserAndTevatron { folder });
        // --normalize alone: Tevatron's default pooling (cls), not the folder's mean.
        assert_eq!(resolve_pooling(st, None, Some(true)).0, Pooling::Cls);
        assert_eq!(resolve_pooling(st, None, Some(false)).0, Pooling::Cls);
        assert!(!resolve_pooling(st, None, Some(false)).1);
        // Both given: as given.
        let both = resolve_pooling(st, Some(Pooling::Last), Some(true));
        assert_eq!(both, (Pooling::Last, true, D::User));
        // No folder settings: Tevatron's defaults, with or without flags.
        assert_eq!(resolve_pooling(None, None, None), (Pooling::Cls, false, D::Tevatron));
        let plain = Some((None, false));
        assert_eq!(resolve_pooling(plain, None, None), (Pooling::Cls, false, D::Tevatron));
        let (p, n, d) = resolve_pooling(None, Some(Pooling::Mean), None);
        assert_eq!((p, n, d), (Pooling::Mean, false, D::UserAndTevatron { folder: None }));
    }

    #[test]
    fn adapters_record_the_hub_id_of_a_cached_base() {
        let cached = Path::new(
            "/home/u/.cache/huggingface/hub/models--mistralai--Mistral-7B-v0.1/snapshots/abc",
        );
        assert_eq!(base_model_name(cached), "mistralai/Mistral-7B-v0.1");
        assert_eq!(base_model_name(Path::new("models/local")), "models/local");
    }
}
