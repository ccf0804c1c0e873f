//! Flags of Tevatron's and Hugging Face's argument classes that this tool does not implement,
//! screened before clap sees the command line, so that a pasted Tevatron recipe runs.
//!
//! Python's drivers parse Tevatron's `ModelArguments`, `DataArguments` and
//! `TevatronTrainingArguments` (a `TrainingArguments`) for `train` and `encode` alike, and the
//! reranker's for `reranker.driver.train` and `.rerank`. Every flag
//! of those classes is therefore known here: implemented (a clap flag of the command), accepted
//! with a log line saying it changes nothing here and why, or refused with the reason and what
//! to do instead. Any other flag is an error that names every unknown flag at once.

use std::ffi::OsString;

use anyhow::{bail, Result};
use clap::CommandFactory;

use crate::args::{parse_bool, Cli};

/// How a flag's value follows it on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    /// A boolean: `--flag`, or `--flag true|false` (argparse's `string_to_bool`).
    Bool,
    /// Exactly one value.
    One,
    /// One or more values (`nargs="+"`).
    Many,
}

/// What this tool does with a flag it does not implement.
#[derive(Clone, Copy, Debug)]
pub enum Rule {
    /// Accepted; the log says it changes nothing here, and why.
    NoEffect(&'static str),
    /// Accepted when its value asks for what this tool does anyway (one of the listed values,
    /// compared without case; a bare boolean flag is `true`); any other value is refused with
    /// the reason and what to do instead.
    Only(&'static [&'static str], &'static str),
    /// Refused with the reason and what to do instead.
    Refused(&'static str),
    /// `--use_cpu` / `--no_cuda`: when true, the same as `--device cpu`.
    UseCpu,
}

/// A flag of Tevatron's or Hugging Face's argument classes with no clap flag of its own.
#[derive(Clone, Copy, Debug)]
pub struct Foreign {
    /// The name, without `--`, as Python spells it.
    pub name: &'static str,
    /// How its value follows it.
    pub arity: Arity,
    /// What happens to it.
    pub rule: Rule,
}

const fn no_effect(name: &'static str, arity: Arity, why: &'static str) -> Foreign {
    Foreign { name, arity, rule: Rule::NoEffect(why) }
}
const fn only(
    name: &'static str,
    arity: Arity,
    ok: &'static [&'static str],
    why: &'static str,
) -> Foreign {
    Foreign { name, arity, rule: Rule::Only(ok, why) }
}
const fn refused(name: &'static str, arity: Arity, why: &'static str) -> Foreign {
    Foreign { name, arity, rule: Rule::Refused(why) }
}

use Arity::{Bool, Many, One};

const NO_EVAL: &str =
    "a setting of Hugging Face's evaluation loop; validation here is --eval_strategy with \
     --eval_query_path, --eval_corpus_path and --eval_qrels_path (docs/train.md)";
const NO_TRACKER: &str = "no experiment tracker is used; the log is OUTPUT_DIR/trainer_state.json";
const NO_HUB: &str = "nothing is uploaded to the Hugging Face hub";
const NO_COMPILER: &str = "there is no graph compiler here; the hot operations are fused kernels";
const TRAIN_UNSHARDED: &str = "it shards encoding and reranking; training reads every row \
     (Tevatron's training datasets have no shards to take: given more than one, they fail)";
const FALSE: &[&str] = &["false"];
const NONE: &[&str] = &["", "none"];

/// Flags of Tevatron's argument classes and of `TrainingArguments` (transformers 4.4x-5.x)
/// that `tevatron train` has no clap flag for. `encode` accepts every one of them too (see
/// [`screen`]).
pub const FOREIGN_TRAIN: &[Foreign] = &[
    // Tevatron's ModelArguments.
    no_effect("config_name", One, "only Tevatron's JAX drivers read it; the model folder's config.json is used"),
    only("model_revision", One, &["main"], "revisions are not supported; download the revision and pass its folder"),
    no_effect("dtype", One, "only Tevatron's JAX drivers read it; use --bf16 or --fp16"),
    no_effect("untie_encoder", Bool, "Tevatron's PyTorch drivers ignore it too: queries and passages share one encoder"),
    no_effect("is_bidirectional", Bool, "only Tevatron's SPLADE decoder driver reads it"),
    no_effect("pooling_strategy", One, "only Tevatron's SPLADE decoder driver reads it; use --pooling"),
    // Tevatron's DataArguments.
    refused("train_yaml", One, "multi-dataset YAML is a multimodal feature; pass --dataset_path"),
    no_effect("assets_path", One, "only Tevatron's multimodal drivers read it"),
    no_effect("positive_passage_no_shuffle", Bool, "Tevatron's retriever ignores it too (only its reranker reads it): positives are drawn per epoch as Tevatron's retriever draws them"),
    no_effect("negative_passage_no_shuffle", Bool, "Tevatron's retriever ignores it too (only its reranker reads it): negatives are drawn per epoch as Tevatron's retriever draws them"),
    no_effect("passage_field_separator", One, "Tevatron's drivers ignore it too: title and text are joined with one space"),
    no_effect("num_proc", One, "data files are streamed and indexed, not loaded by worker processes"),
    only("encode_text", Bool, &["true"], "text is the only modality here"),
    no_effect("encode_image", Bool, "text is the only modality here"),
    no_effect("encode_audio", Bool, "text is the only modality here"),
    no_effect("encode_video", Bool, "text is the only modality here"),
    no_effect("dataset_number_of_shards", One, TRAIN_UNSHARDED),
    no_effect("dataset_shard_index", One, TRAIN_UNSHARDED),
    no_effect("encode_is_query", Bool, "an encoding setting; Tevatron's training drivers parse it and ignore it too"),
    no_effect("encode_output_path", One, "an encoding setting; Tevatron's training drivers parse it and ignore it too"),
    // TevatronTrainingArguments beyond Hugging Face's.
    no_effect("q_flops_loss_factor", One, "only Tevatron's SPLADE driver reads it"),
    no_effect("p_flops_loss_factor", One, "only Tevatron's SPLADE driver reads it"),
    no_effect("flops_warmup", One, "only Tevatron's SPLADE driver reads it"),
    // Hugging Face's TrainingArguments: evaluation.
    no_effect("do_eval", Bool, NO_EVAL),
    no_effect("do_predict", Bool, NO_EVAL),
    no_effect("eval_delay", One, NO_EVAL),
    no_effect("eval_accumulation_steps", One, NO_EVAL),
    no_effect("eval_on_start", Bool, NO_EVAL),
    no_effect("eval_do_concat_batches", Bool, NO_EVAL),
    no_effect("eval_use_gather_object", Bool, NO_EVAL),
    no_effect("batch_eval_metrics", Bool, NO_EVAL),
    no_effect("prediction_loss_only", Bool, NO_EVAL),
    no_effect("per_gpu_eval_batch_size", One, NO_EVAL),
    no_effect("bf16_full_eval", Bool, NO_EVAL),
    no_effect("fp16_full_eval", Bool, NO_EVAL),
    no_effect("jit_mode_eval", Bool, NO_EVAL),
    no_effect("use_legacy_prediction_loop", Bool, NO_EVAL),
    no_effect("include_inputs_for_metrics", Bool, NO_EVAL),
    no_effect("include_for_metrics", Many, NO_EVAL),
    no_effect("label_names", Many, NO_EVAL),
    no_effect("past_index", One, NO_EVAL),
    // Batches, optimizer and schedule.
    refused("per_gpu_train_batch_size", One, "a deprecated Hugging Face flag; use --per_device_train_batch_size"),
    only("optim", One, &["adamw_torch", "adamw_torch_fused", "adamw_hf"], "the optimizer here is AdamW with decoupled weight decay, as adamw_torch; other optimizers are not implemented"),
    only("optim_args", One, NONE, "the AdamW here takes its settings from --adam_beta1, --adam_beta2, --adam_epsilon and --weight_decay"),
    no_effect("optim_target_modules", Many, "only GaLore optimizers read it, and the optimizer here is AdamW"),
    only("adafactor", Bool, FALSE, "Adafactor is not implemented; the optimizer is AdamW"),
    only("lr_scheduler_kwargs", One, &["", "{}"], "the schedules here (--lr_scheduler_type) take no options"),
    no_effect("label_smoothing_factor", One, "Tevatron's contrastive loss ignores it too (it never passes labels to the Trainer)"),
    only("neftune_noise_alpha", One, NONE, "noise on the input embeddings is not implemented"),
    only("group_by_length", Bool, FALSE, "batches are drawn at random as Tevatron's sampler draws them"),
    no_effect("length_column_name", One, "only --group_by_length reads it"),
    only("auto_find_batch_size", Bool, FALSE, "set --per_device_train_batch_size (and --grad_cache for large batches in bounded memory)"),
    refused("data_seed", One, "one --seed drives sampling, shuffling and dropout here; drop --data_seed (or set --seed)"),
    no_effect("average_tokens_across_devices", Bool, "the contrastive loss is a mean over queries, not tokens"),
    no_effect("torch_empty_cache_steps", One, "there is no PyTorch caching allocator here"),
    no_effect("full_determinism", Bool, "a run here is already deterministic for a seed on one machine (a resumed run ends bit for bit as an uninterrupted one)"),
    only("ignore_data_skip", Bool, FALSE, "a resumed run here always continues with the batch it stopped at"),
    // Precision and devices.
    no_effect("fp16_opt_level", One, "an apex setting; --fp16 uses autocast with dynamic loss scaling"),
    no_effect("half_precision_backend", One, "--fp16 and --bf16 use this tool's own autocast"),
    no_effect("fp16_backend", One, "--fp16 and --bf16 use this tool's own autocast"),
    no_effect("tf32", Bool, "this tool has no TF32 switch; F32 matrix products follow candle's default"),
    Foreign { name: "use_cpu", arity: Bool, rule: Rule::UseCpu },
    Foreign { name: "no_cuda", arity: Bool, rule: Rule::UseCpu },
    only("use_mps_device", Bool, FALSE, "Apple GPUs are not supported; the CPU or an NVIDIA GPU (--device) is used"),
    only("use_ipex", Bool, FALSE, "Intel's PyTorch extension is not used; CPU kernels are chosen by the CPU's features at run time"),
    no_effect("tpu_num_cores", One, "TPUs are not supported"),
    no_effect("tpu_metrics_debug", Bool, "TPUs are not supported"),
    no_effect("debug", Many, "PyTorch's debug modes do not exist here"),
    no_effect("torchdynamo", One, NO_COMPILER),
    no_effect("torch_compile", Bool, NO_COMPILER),
    no_effect("torch_compile_backend", One, NO_COMPILER),
    no_effect("torch_compile_mode", One, NO_COMPILER),
    no_effect("use_liger_kernel", Bool, NO_COMPILER),
    no_effect("jit_mode", Bool, NO_COMPILER),
    // Distribution.
    refused("deepspeed", One, "DeepSpeed is not used; drop --deepspeed (one process trains the whole model; see docs/train.md for memory options: --gradient_checkpointing, --grad_cache, --bf16)"),
    only("fsdp", Many, &["", "false"], "FSDP is not used: each rank holds the whole model; see docs/train.md for memory options"),
    no_effect("fsdp_min_num_params", One, "FSDP is not used"),
    no_effect("fsdp_config", One, "FSDP is not used"),
    no_effect("fsdp_transformer_layer_cls_to_wrap", One, "FSDP is not used"),
    no_effect("accelerator_config", One, "Accelerate is not used; ranks are started by --nproc_per_node or a launcher's variables"),
    no_effect("dispatch_batches", Bool, "each rank reads its own slice of every batch, as Tevatron's ranks do"),
    only("split_batches", Bool, FALSE, "each rank takes --per_device_train_batch_size queries, as Tevatron's ranks do"),
    no_effect("ddp_find_unused_parameters", Bool, "every trainable weight gets a gradient in every step, and the ranks exchange all gradients"),
    no_effect("ddp_bucket_cap_mb", One, "gradients are exchanged in one pass after the backward"),
    no_effect("ddp_broadcast_buffers", Bool, "the models here hold no buffers that change in training"),
    no_effect("mp_parameters", One, "a SageMaker setting"),
    no_effect("ray_scope", One, "Ray is not used"),
    // Logging and saving.
    only("report_to", Many, &["none"], NO_TRACKER),
    no_effect("run_name", One, NO_TRACKER),
    no_effect("logging_dir", One, "there is no TensorBoard log; the log is OUTPUT_DIR/trainer_state.json (tevatron plot draws it)"),
    no_effect("logging_nan_inf_filter", Bool, "a non-finite loss stops training here, with the last checkpoint intact"),
    no_effect("log_level", One, "the log level is set by --quiet and the TEVATRON_LOG variable"),
    no_effect("log_level_replica", One, "only rank 0 logs progress; the others log warnings"),
    no_effect("log_on_each_node", Bool, "only rank 0 logs progress"),
    no_effect("include_tokens_per_second", Bool, "the log has no throughput fields"),
    no_effect("include_num_input_tokens_seen", Bool, "the log has no token counts"),
    no_effect("skip_memory_metrics", Bool, "the log has no memory fields"),
    no_effect("remove_unused_columns", Bool, "Tevatron's datasets are torch Datasets, so it removes no columns there either"),
    no_effect("dataloader_pin_memory", Bool, "batches are tokenized into the device's memory directly; there are no pinned host buffers"),
    no_effect("dataloader_persistent_workers", Bool, "tokenization workers (--dataloader_num_workers) live for the whole run"),
    no_effect("dataloader_prefetch_factor", One, "tokenization workers keep a fixed number of micro-batches ready"),
    only("save_safetensors", Bool, &["true"], "checkpoints and models are always written as safetensors, which transformers loads"),
    only("save_only_model", Bool, FALSE, "checkpoints keep the optimizer, schedule and sampler state so that a run resumes after a crash; drop --save_only_model"),
    no_effect("save_on_each_node", Bool, "rank 0 saves, on one machine"),
    no_effect("restore_callback_states_from_checkpoint", Bool, "there are no callbacks; a resume restores the whole trainer state"),
    no_effect("gradient_checkpointing_kwargs", One, "Tevatron ignores it too: --gradient_checkpointing recomputes each layer in the backward"),
    only("push_to_hub", Bool, FALSE, NO_HUB),
    no_effect("hub_model_id", One, NO_HUB),
    no_effect("hub_strategy", One, NO_HUB),
    no_effect("hub_token", One, NO_HUB),
    no_effect("hub_private_repo", Bool, NO_HUB),
    no_effect("hub_always_push", Bool, NO_HUB),
    no_effect("push_to_hub_model_id", One, NO_HUB),
    no_effect("push_to_hub_organization", One, NO_HUB),
    no_effect("push_to_hub_token", One, NO_HUB),
];

/// Flags of `tevatron train` that mean nothing for a cross-encoder: `train-reranker` refuses
/// them with the reason (they share one set of clap flags).
const NOT_FOR_RERANKERS: &[Foreign] = &[
    refused("pooling", One, "a cross-encoder scores each pair with its head; there is no pooling"),
    refused("normalize", Bool, "a cross-encoder scores each pair with its head; there is no embedding to normalize"),
    refused("temperature", One, "the reranker's loss is the cross-entropy of the raw logits, as in Tevatron's reranker"),
    refused("query_max_len", One, "a pair is one input; its length is --rerank_max_len"),
    refused("passage_max_len", One, "a pair is one input; its length is --rerank_max_len"),
    refused("gc_q_chunk_size", One, "a reranker has no query side; --gc_p_chunk_size chunks the pairs"),
    refused("eval_dataset_path", One, "a reranker's validation reranks a run (--eval_run_path); eval_loss is the retriever's contrastive loss"),
    refused("distillation", Bool, "distillation trains a retriever: tevatron train --distillation"),
    refused("distil_temperature", One, "distillation trains a retriever: tevatron train --distillation"),
    refused("distil_teacher_temperature", One, "distillation trains a retriever: tevatron train --distillation"),
    refused("distil_contrastive_weight", One, "distillation trains a retriever: tevatron train --distillation"),
    refused("matryoshka_dims", One, "a reranker's output is one score, which has no prefixes"),
    refused("matryoshka_weights", One, "a reranker's output is one score, which has no prefixes"),
    refused("matryoshka_kl_weight", One, "a reranker's output is one score, which has no prefixes"),
    refused("matryoshka_kl_temperature", One, "a reranker's output is one score, which has no prefixes"),
];

/// Flags of `train-reranker` that mean nothing for a retriever: `train` refuses them.
const NOT_FOR_RETRIEVERS: &[Foreign] = &[
    refused(
        "rerank_max_len",
        One,
        "a reranker's pair length; a retriever has --query_max_len and --passage_max_len (tevatron train-reranker trains rerankers)",
    ),
    refused("eval_run_path", One, "a reranker's validation run; a retriever's validation searches --eval_corpus_path itself (tevatron train-reranker trains rerankers)"),
    refused("eval_rerank_depth", One, "a reranker's validation depth; a retriever's validation searches --eval_corpus_path itself (tevatron train-reranker trains rerankers)"),
    refused("pair_format", One, "how a cross-encoder takes its pairs; a retriever encodes queries and passages apart (tevatron train-reranker trains rerankers)"),
];

/// Flags of `tevatron train` that mean something else, or nothing, to `encode`, beyond the
/// general rule that training flags change nothing when encoding.
const FOREIGN_ENCODE: &[Foreign] = &[no_effect(
    "lora",
    Bool,
    "encoding merges the adapter named by --lora_name_or_path; --lora alone changes nothing, as in Tevatron",
)];

/// Flags `annotate` refuses though `rerank` takes them: it writes one annotated training file,
/// so a shard of it would silently be the whole.
const FOREIGN_ANNOTATE: &[Foreign] = &[
    refused(
        "dataset_number_of_shards",
        One,
        "annotate scores every row of the training file; split the file to share the work",
    ),
    refused(
        "dataset_shard_index",
        One,
        "annotate scores every row of the training file; split the file to share the work",
    ),
];

/// The command line after screening, and the log lines the screening owes the user.
#[derive(Debug)]
pub struct Screened {
    /// The arguments clap parses: the command's own flags only.
    pub argv: Vec<OsString>,
    /// One line per accepted flag that changes nothing here (logged once logging is set up).
    pub notes: Vec<String>,
}

/// The long flags clap knows for `command` (`train`, `encode`, ...), with whether each takes
/// an optional boolean value.
fn clap_flags(command: &str) -> Vec<(String, Arity)> {
    let cli = Cli::command();
    let Some(sub) = cli.find_subcommand(command) else { return Vec::new() };
    let mut flags: Vec<(String, Arity)> = Vec::new();
    for a in sub.get_arguments() {
        let arity = if a.get_num_args().is_some_and(|n| n.min_values() == 0) { Bool } else { One };
        let aliases = a.get_all_aliases().unwrap_or_default();
        for name in a.get_long().into_iter().chain(aliases) {
            flags.push((name.to_string(), arity));
        }
    }
    flags.push(("help".into(), Bool));
    flags
}

/// Screens the flags of `train`, `train-reranker`, `encode`, `search`, `rerank` and
/// `annotate` (see the module doc). Other commands pass through unchanged. `--flag-name` is read as `--flag_name`, as Hugging Face's parser
/// accepts both.
pub fn screen(argv: Vec<OsString>) -> Result<Screened> {
    let command = argv.get(1).and_then(|s| s.to_str()).unwrap_or_default().to_string();
    if !matches!(
        command.as_str(),
        "train" | "train-reranker" | "encode" | "search" | "rerank" | "annotate"
    ) {
        return Ok(Screened { argv, notes: Vec::new() });
    }
    // `train` and `train-reranker` share their clap flags; each refuses the other's own.
    let not_here: &[Foreign] = match command.as_str() {
        "train" => NOT_FOR_RETRIEVERS,
        "train-reranker" => NOT_FOR_RERANKERS,
        _ => &[],
    };
    let mut own = clap_flags(&command);
    own.retain(|(n, _)| !not_here.iter().any(|f| f.name == n));
    // The training flags `encode` (Tevatron's encode driver parses the retriever's argument
    // classes) and `rerank` and `annotate` (the reranker's) take as changing nothing.
    let train = match command.as_str() {
        "encode" => clap_flags("train"),
        "rerank" | "annotate" => clap_flags("train-reranker"),
        _ => Vec::new(),
    };
    let mut out: Vec<OsString> = argv.iter().take(2).cloned().collect();
    let mut notes = Vec::new();
    let mut refusals = Vec::new();
    let mut unknown = Vec::new();
    let mut i = 2;
    while i < argv.len() {
        let raw = &argv[i];
        i += 1;
        let Some(text) = raw.to_str() else {
            out.push(raw.clone());
            continue;
        };
        if text == "--" {
            out.extend(argv[i - 1..].iter().cloned());
            break;
        }
        let Some(flag) = text.strip_prefix("--").filter(|f| !f.is_empty()) else {
            out.push(raw.clone());
            continue;
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.replace('-', "_"), Some(v.to_string())),
            None => (flag.replace('-', "_"), None),
        };
        if own.iter().any(|(n, _)| *n == name) {
            out.push(match &inline {
                Some(v) => format!("--{name}={v}").into(),
                None => format!("--{name}").into(),
            });
            continue;
        }
        let foreign = match command.as_str() {
            "train" | "train-reranker" => FOREIGN_TRAIN
                .iter()
                .chain(not_here)
                .find(|f| f.name == name)
                .copied()
                .map(|f| reranker_reads(&command, f)),
            "encode" => FOREIGN_ENCODE
                .iter()
                .chain(FOREIGN_TRAIN.iter().filter(|f| applies_to_inference(f)))
                .find(|f| f.name == name)
                .copied()
                .or_else(|| inference_ignores(&train, &name, ENCODING_IGNORES)),
            "rerank" | "annotate" => FOREIGN_ANNOTATE
                .iter()
                .filter(|_| command == "annotate")
                .chain(FOREIGN_TRAIN.iter().filter(|f| applies_to_inference(f)))
                .find(|f| f.name == name)
                .copied()
                .or_else(|| inference_ignores(&train, &name, SCORING_IGNORES)),
            _ => None,
        };
        let Some(f) = foreign else {
            unknown.push(format!("--{name}"));
            continue;
        };
        let values = take_values(&argv, &mut i, f.arity, inline);
        let shown = if values.is_empty() {
            format!("--{name}")
        } else {
            format!("--{name} {}", values.join(" "))
        };
        let value = if f.arity == Bool && values.is_empty() {
            "true".to_string()
        } else {
            values.join(" ")
        };
        match f.rule {
            Rule::NoEffect(why) => notes.push(format!("{shown} changes nothing here: {why}")),
            Rule::Only(ok, why) => {
                if ok.iter().any(|o| o.eq_ignore_ascii_case(value.trim())) {
                    notes.push(format!("{shown} is what this tool does anyway: {why}"));
                } else {
                    refusals.push(format!("{shown} is not supported: {why}"));
                }
            }
            Rule::Refused(why) => refusals.push(format!("--{name} is not supported: {why}")),
            Rule::UseCpu => match parse_bool(&value) {
                Ok(true) => {
                    notes.push(format!("{shown}: running on the CPU, as --device cpu"));
                    out.extend(["--device".into(), "cpu".into()]);
                }
                Ok(false) => notes.push(format!("{shown} changes nothing here")),
                Err(e) => refusals.push(format!("--{name}: {e}")),
            },
        }
    }
    if !unknown.is_empty() {
        let whose = match command.as_str() {
            "search" => "Tevatron's search driver",
            "rerank" | "annotate" => "Tevatron's reranker or of Hugging Face's TrainingArguments",
            _ => "Tevatron or of Hugging Face's TrainingArguments",
        };
        let (s, are_not) = if unknown.len() == 1 { ("", "is not a") } else { ("s", "are not") };
        let mut msg = format!(
            "unknown flag{s} {}: {are_not} flag{s} of {whose} that `tevatron {command}` knows \
             (`tevatron {command} --help` lists its flags)",
            unknown.join(", ")
        );
        if !refusals.is_empty() {
            msg += &format!("; also {}", refusals.join("; "));
        }
        bail!(msg);
    }
    if !refusals.is_empty() {
        bail!(refusals.join("; "));
    }
    if command.starts_with("train") {
        notes.extend(unused_settings(&out));
    }
    Ok(Screened { argv: out, notes })
}

/// Settings of a feature another flag turns on, as (the flag, its settings, what happens
/// without it): given without it they change nothing, which the log says (Hugging Face's and
/// PEFT's parsers take them silently).
pub const SETTINGS_OF: &[(&str, &[&str], &str)] = &[
    (
        "lora",
        &["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"],
        "without --lora every weight is trained and no adapter is made",
    ),
    (
        "grad_cache",
        &["gc_q_chunk_size", "gc_p_chunk_size"],
        "without --grad_cache each batch is encoded whole",
    ),
    (
        "eval_strategy",
        &["eval_steps", "metric_for_best_model", "greater_is_better"],
        "without --eval_strategy steps or epoch nothing is evaluated",
    ),
];

/// The notes for [`SETTINGS_OF`]'s settings given in `argv` (screened: the command's own flags)
/// without the flag that turns their feature on.
fn unused_settings(argv: &[OsString]) -> Vec<String> {
    let args: Vec<&str> = argv.iter().skip(2).filter_map(|a| a.to_str()).collect();
    // Whether `--name` is given, and the value that follows it (or after `=`), if any.
    let given = |name: &str| -> Option<Option<String>> {
        let at = args.iter().position(|a| {
            a.strip_prefix("--").is_some_and(|f| f == name || f.starts_with(&format!("{name}=")))
        })?;
        let inline = args[at].split_once('=').map(|(_, v)| v.to_string());
        let next = args.get(at + 1).filter(|v| !v.starts_with("--")).map(|v| v.to_string());
        Some(inline.or(next))
    };
    let on = |flag: &str| match given(flag) {
        // Hugging Face's older spelling of the evaluation strategy, an alias here.
        None if flag == "eval_strategy" => {
            given("evaluation_strategy").is_some_and(|v| v.is_some_and(|v| v != "no"))
        }
        None => false,
        Some(value) if flag == "eval_strategy" => value.is_some_and(|v| v != "no"),
        Some(value) => value.is_none_or(|v| parse_bool(&v).unwrap_or(true)),
    };
    // An adapter to continue from turns LoRA on too, with its own settings.
    let from_adapter = given("lora_name_or_path").is_some();
    let mut notes = Vec::new();
    for (flag, settings, without) in SETTINGS_OF {
        let why = match *flag {
            "lora" if from_adapter => "the adapter of --lora_name_or_path brings its own settings",
            _ if on(flag) => continue,
            _ => without,
        };
        for setting in settings.iter().filter(|s| given(s).is_some()) {
            notes.push(format!("--{setting} changes nothing here: {why}"));
        }
    }
    notes
}

/// The flags `command` (`train` or `train-reranker`) refuses because they are the other
/// training command's own.
pub fn refused_by(command: &str) -> impl Iterator<Item = &'static str> {
    let own = match command {
        "train" => NOT_FOR_RETRIEVERS,
        "train-reranker" => NOT_FOR_RERANKERS,
        _ => &[],
    };
    own.iter().map(|f| f.name)
}

/// Tevatron's reranker reads `--positive_passage_no_shuffle` and `--negative_passage_no_shuffle`,
/// which its retriever ignores (and `train` says so): `train-reranker` refuses them, as it
/// draws the group's passages by the retriever's rule.
fn reranker_reads(command: &str, f: Foreign) -> Foreign {
    const WHY: &str = "passages are drawn per epoch by Tevatron's shuffled rule here; keeping \
                       the data's order is not supported";
    let reads = ["positive_passage_no_shuffle", "negative_passage_no_shuffle"].contains(&f.name);
    if command == "train-reranker" && reads {
        only(f.name, f.arity, FALSE, WHY)
    } else {
        f
    }
}

/// Flags of [`FOREIGN_TRAIN`] whose rule holds for `encode`, `rerank` and `annotate` too: the
/// device switch, and the model's revision (which model is loaded matters to any command).
fn applies_to_inference(f: &Foreign) -> bool {
    matches!(f.rule, Rule::UseCpu) || f.name == "model_revision"
}

/// `encode`, `rerank` and `annotate` accept every training flag, as Python's encode and
/// rerank drivers parse the training argument classes, and say why it changes nothing here.
fn inference_ignores(train: &[(String, Arity)], name: &str, why: &'static str) -> Option<Foreign> {
    let arity = train
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| *a)
        .or_else(|| FOREIGN_TRAIN.iter().find(|f| f.name == name).map(|f| f.arity))?;
    Some(no_effect("", arity, why))
}

/// Why a training flag changes nothing for `encode`.
const ENCODING_IGNORES: &str =
    "not a setting of encoding here; the vectors are the same without it";
/// Why a training flag changes nothing for `rerank` and `annotate`.
const SCORING_IGNORES: &str = "not a setting of scoring here; the scores are the same without it";

/// Takes a screened flag's values off the command line: the inline `=value`, else what its
/// arity allows of the following arguments (a boolean takes the next one only when it reads as
/// a boolean; a list runs to the next flag).
fn take_values(
    argv: &[OsString],
    i: &mut usize,
    arity: Arity,
    inline: Option<String>,
) -> Vec<String> {
    if let Some(v) = inline {
        return vec![v];
    }
    let next = |i: usize| argv.get(i).and_then(|s| s.to_str()).map(str::to_string);
    let is_flag = |s: &str| s.starts_with("--");
    let mut values = Vec::new();
    match arity {
        Bool => {
            if let Some(v) = next(*i).filter(|v| parse_bool(v).is_ok()) {
                values.push(v);
                *i += 1;
            }
        }
        One => {
            if let Some(v) = next(*i).filter(|v| !is_flag(v)) {
                values.push(v);
                *i += 1;
            }
        }
        Many => {
            while let Some(v) = next(*i).filter(|v| !is_flag(v)) {
                values.push(v);
                *i += 1;
            }
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Screened> {
        screen(
            std::iter::once("tevatron").chain(args.iter().copied()).map(OsString::from).collect(),
        )
    }
    fn argv(s: &Screened) -> Vec<String> {
        s.argv.iter().skip(1).map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn foreign_flags_are_logged_and_removed_with_their_values() {
        let s = run(&[
            "train",
            "--output_dir",
            "o",
            "--report_to",
            "none",
            "--run_name",
            "r1",
            "--logging_dir",
            "logs",
            "--ddp_find_unused_parameters",
            "False",
            "--optim",
            "adamw_torch",
            "--save_safetensors",
            "--remove_unused_columns",
            "--seed",
            "3",
        ])
        .unwrap();
        assert_eq!(argv(&s), ["train", "--output_dir", "o", "--seed", "3"]);
        assert_eq!(s.notes.len(), 7, "{:?}", s.notes);
        assert!(s.notes[0].starts_with("--report_to none is what this tool does anyway"));
        assert!(s.notes[1].starts_with("--run_name r1 changes nothing here"));
        assert!(s.notes[3].starts_with("--ddp_find_unused_parameters False changes nothing"));
    }

    #[test]
    fn values_that_ask_for_something_else_are_refused_with_the_reason() {
        let e = run(&["train", "--report_to", "wandb", "--optim", "adafactor"]).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("--report_to wandb is not supported: no experiment tracker"), "{e}");
        assert!(
            e.contains("--optim adafactor is not supported: the optimizer here is AdamW"),
            "{e}"
        );
        let e = run(&["train", "--deepspeed", "ds.json"]).unwrap_err().to_string();
        assert!(e.starts_with("--deepspeed is not supported: DeepSpeed is not used"), "{e}");
        let e = run(&["train", "--save_only_model"]).unwrap_err().to_string();
        assert!(e.contains("--save_only_model is not supported"), "{e}");
        assert!(run(&["train", "--save_only_model", "false"]).is_ok());
    }

    #[test]
    fn unknown_flags_are_named_all_at_once_without_suggestions() {
        let e =
            run(&["train", "--output_dir", "o", "--bogus", "1", "--runname", "x", "--seed", "1"])
                .unwrap_err()
                .to_string();
        assert_eq!(
            e,
            "unknown flags --bogus, --runname: are not flags of Tevatron or of Hugging Face's \
             TrainingArguments that `tevatron train` knows (`tevatron train --help` lists its flags)"
        );
        let e = run(&["search", "--temperature", "1"]).unwrap_err().to_string();
        assert!(
            e.starts_with("unknown flag --temperature: is not a flag of Tevatron's search"),
            "{e}"
        );
    }

    #[test]
    fn encode_accepts_training_flags_and_says_they_change_nothing() {
        let s = run(&[
            "encode",
            "--model_name_or_path",
            "m",
            "--temperature",
            "0.01",
            "--lora_r",
            "32",
            "--do_train",
            "--overwrite_output_dir",
            "--attn_implementation",
            "sdpa",
            "--lora",
            "--deepspeed",
            "ds.json",
            "--fp16",
            "--encode_is_query",
        ])
        .unwrap();
        assert_eq!(
            argv(&s),
            ["encode", "--model_name_or_path", "m", "--fp16", "--encode_is_query"]
        );
        assert_eq!(s.notes.len(), 7, "{:?}", s.notes);
        assert!(s.notes.iter().all(|n| n.contains("changes nothing here")), "{:?}", s.notes);
        assert!(s.notes[5].contains("--lora_name_or_path"), "{:?}", s.notes);
    }

    /// Tevatron's rerank driver parses the reranker's training arguments: `rerank` and
    /// `annotate` take them and say they change nothing, `--use_cpu` is `--device cpu`, and a
    /// flag of no argument class is named.
    #[test]
    fn rerank_and_annotate_accept_training_flags_and_say_they_change_nothing() {
        for command in ["rerank", "annotate"] {
            let args = [command, "--model_name_or_path", "m", "--report_to", "none"];
            let more = ["--dataloader_num_workers", "2", "--overwrite_output_dir", "--use_cpu"];
            let s = run(&[&args[..], &more].concat()).unwrap();
            assert_eq!(argv(&s), [command, "--model_name_or_path", "m", "--device", "cpu"]);
            assert_eq!(s.notes.len(), 4, "{:?}", s.notes);
            let e = run(&[command, "--bogus", "1"]).unwrap_err().to_string();
            assert!(e.contains("--bogus") && e.contains("Tevatron's reranker"), "{e}");
            // Which model is loaded matters here too.
            let e = run(&[command, "--model_revision", "v2"]).unwrap_err().to_string();
            assert!(e.contains("--model_revision v2 is not supported"), "{e}");
        }
        // annotate writes one file: a shard of it would silently be the whole.
        let e = run(&["annotate", "--dataset_number_of_shards", "2"]).unwrap_err().to_string();
        assert!(e.contains("annotate scores every row"), "{e}");
        // Training takes the encoding and reranking flags of Tevatron's DataArguments as changing
        // nothing, as its drivers do.
        let s = run(&["train", "--dataset_number_of_shards", "2", "--encode_is_query"]).unwrap();
        assert_eq!(argv(&s), ["train"]);
        assert!(
            s.notes[0].starts_with("--dataset_number_of_shards 2 changes nothing"),
            "{:?}",
            s.notes
        );
    }

    #[test]
    fn settings_without_the_flag_that_turns_them_on_are_noted() {
        let notes = |args: &[&str]| run(args).unwrap().notes;
        let lora = notes(&["train", "--lora_r", "4", "--gc_q_chunk_size=2", "--eval_steps", "5"]);
        assert_eq!(
            lora,
            [
                "--lora_r changes nothing here: without --lora every weight is trained and no adapter is made",
                "--gc_q_chunk_size changes nothing here: without --grad_cache each batch is encoded whole",
                "--eval_steps changes nothing here: without --eval_strategy steps or epoch nothing is evaluated",
            ]
        );
        let with = ["--lora", "--lora_r", "4", "--grad_cache", "true", "--gc_q_chunk_size", "2"];
        assert!(notes(&[&["train"][..], &with].concat()).is_empty());
        assert!(
            notes(&["train-reranker", "--eval_strategy", "steps", "--eval_steps", "5"]).is_empty()
        );
        assert!(notes(&["train", "--evaluation_strategy", "steps", "--eval_steps", "5"]).is_empty());
        assert_eq!(notes(&["train", "--lora", "false", "--lora_alpha", "8"]).len(), 1);
        assert_eq!(
            notes(&["train", "--lora", "--lora_name_or_path", "a", "--lora_r", "8"]),
            ["--lora_r changes nothing here: the adapter of --lora_name_or_path brings its own settings"]
        );
        assert_eq!(
            notes(&["train", "--eval_strategy", "no", "--metric_for_best_model", "loss"]).len(),
            1
        );
    }

    #[test]
    fn use_cpu_means_the_cpu_and_dashes_read_as_underscores() {
        let s = run(&["encode", "--use_cpu", "--model-name-or-path=m"]).unwrap();
        assert_eq!(argv(&s), ["encode", "--device", "cpu", "--model_name_or_path=m"]);
        let s = run(&["train", "--no_cuda", "false"]).unwrap();
        assert_eq!(argv(&s), ["train"]);
    }

    #[test]
    fn every_foreign_flag_is_unknown_to_clap_and_listed_once() {
        let train = clap_flags("train");
        for (i, f) in FOREIGN_TRAIN.iter().enumerate() {
            assert!(!train.iter().any(|(n, _)| n == f.name), "--{} is a clap flag too", f.name);
            assert!(
                !FOREIGN_TRAIN[..i].iter().any(|g| g.name == f.name),
                "--{} listed twice",
                f.name
            );
        }
    }
}
