//! `tevatron train` and `tevatron train-reranker`: Tevatron's `driver.train` (with
//! `--distillation`, `driver.train_distil`) and `reranker.driver.train` flags → a validated
//! [`TrainConfig`], the model loaded trainable (a cross-encoder with its score head for
//! rerankers), the data indexed for random access, then the library's loop with a progress
//! bar.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use tevatron_ir::records::RecordKind;
use tevatron_ir::rerank::{pairs_from_run, PairFormat};
use tevatron_ir::trec::Qrels;
use tevatron_model::encoder::BatchOptions;
use tevatron_model::lora::{AdapterSource, LoraConfig, LoraOptions};
use tevatron_model::{EncoderOptions, PaddingSide, ScoreHeadOptions, TextOptions};
use tevatron_train::data::{Corpus, TrainData};
use tevatron_train::dist::{Group, Rendezvous, TcpTransport};
use tevatron_train::optim::AdamWConfig;
use tevatron_train::schedule::ScheduleKind;
use tevatron_train::step::{Distillation, Matryoshka, PrefixKl, StepOptions};
use tevatron_train::trainer::{prepare_output_dir, train, Objective, Plan, TrainConfig};
use tevatron_train::validation::{
    read_records, LossData, RerankData, RetrievalData, Validation, LOSS,
};

use crate::args::{PairFormatArg, StrategyArg, TrainArgs};
use crate::{launch, progress};

/// Where row indexes are cached: `--dataset_cache_dir`, else the Hugging Face datasets cache.
pub(super) fn index_cache(dataset_cache_dir: Option<&std::path::Path>) -> PathBuf {
    let root = dataset_cache_dir.map(PathBuf::from).unwrap_or_else(|| {
        if let Some(p) = std::env::var_os("HF_DATASETS_CACHE") {
            PathBuf::from(p)
        } else if let Some(p) = std::env::var_os("HF_HOME") {
            PathBuf::from(p).join("datasets")
        } else {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir)
                .join(".cache/huggingface/datasets")
        }
    });
    root.join("tevatron-rows")
}

/// The query and passage prefixes: Tevatron's retriever defaults to none, its reranker to
/// `query:` and `passage:` (inside the pair).
fn prefixes(a: &TrainArgs, reranker: bool) -> (String, String) {
    let (q, p) = if reranker { ("query:", "passage:") } else { ("", "") };
    (
        a.query_prefix.clone().unwrap_or_else(|| q.to_string()),
        a.passage_prefix.clone().unwrap_or_else(|| p.to_string()),
    )
}

/// `--warmup_ratio`, or each command's default: Tevatron's retriever arguments set 0.1, and its
/// reranker driver takes Hugging Face's `TrainingArguments` (0).
fn warmup_ratio(a: &TrainArgs, reranker: bool) -> f64 {
    a.warmup_ratio.unwrap_or(if reranker { 0.0 } else { 0.1 })
}

/// `--lora_r`, or each command's default: 16 in Tevatron's retriever arguments, 8 in its
/// reranker's.
fn lora_rank(a: &TrainArgs, reranker: bool) -> usize {
    a.lora_r.unwrap_or(if reranker { 8 } else { 16 })
}

/// `--matryoshka_dims`, `--matryoshka_weights` and the self-distillation flags
/// (`--matryoshka_kl_weight`, `--matryoshka_kl_temperature`) for representations `width` wide.
fn matryoshka(a: &TrainArgs, width: usize, normalize: bool) -> Result<Option<Matryoshka>> {
    if a.matryoshka_dims.is_empty() {
        if !a.matryoshka_weights.is_empty() {
            bail!("--matryoshka_weights needs --matryoshka_dims");
        }
        if a.matryoshka_kl_weight.is_some() || a.matryoshka_kl_temperature.is_some() {
            bail!("--matryoshka_kl_weight and --matryoshka_kl_temperature need --matryoshka_dims");
        }
        return Ok(None);
    }
    if a.matryoshka_dims.contains(&0) {
        bail!("--matryoshka_dims 0: each width must be at least 1");
    }
    if let Some((i, d)) =
        a.matryoshka_dims.iter().enumerate().find(|(i, d)| a.matryoshka_dims[..*i].contains(d))
    {
        bail!(
            "--matryoshka_dims gives {d} twice (width {} of {}): each width's loss would count \
             twice; give each once, and weigh one with --matryoshka_weights",
            i + 1,
            a.matryoshka_dims.len()
        );
    }
    if let Some(d) = a.matryoshka_dims.iter().find(|&&d| d > width) {
        bail!("--matryoshka_dims {d}: each width must be between 1 and the model's {width}");
    }
    let weights = if a.matryoshka_weights.is_empty() {
        vec![1.0; a.matryoshka_dims.len()]
    } else {
        a.matryoshka_weights.clone()
    };
    if weights.len() != a.matryoshka_dims.len() {
        bail!(
            "--matryoshka_weights gives {} weight(s) for {} --matryoshka_dims",
            weights.len(),
            a.matryoshka_dims.len()
        );
    }
    if weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
        bail!("--matryoshka_weights must be finite and not negative");
    }
    let kl = prefix_kl(a)?;
    if width == usize::MAX {
        return Ok(None);
    }
    tracing::info!(
        "Matryoshka: the loss on the first {:?} dimensions, weights {weights:?}{}",
        a.matryoshka_dims,
        if normalize { ", each prefix re-normalised" } else { "" }
    );
    if let Some(kl) = kl {
        let narrower: Vec<usize> =
            a.matryoshka_dims.iter().copied().filter(|&d| d < width).collect();
        if narrower.is_empty() {
            tracing::warn!(
                "--matryoshka_kl_weight changes nothing: no width of --matryoshka_dims is narrower than the model's {width}"
            );
        } else {
            tracing::info!(
                "Matryoshka self-distillation: widths {narrower:?} also learn the full {width}'s in-batch distribution (KL weight {}, temperature {})",
                kl.weight,
                kl.temperature
            );
        }
    }
    Ok(Some(Matryoshka { dims: a.matryoshka_dims.clone(), weights, normalize, kl }))
}

/// `--matryoshka_kl_weight` and `--matryoshka_kl_temperature` (the latter defaulting to
/// `--temperature`); a weight of 0 is no self-distillation.
fn prefix_kl(a: &TrainArgs) -> Result<Option<PrefixKl>> {
    let Some(weight) = a.matryoshka_kl_weight else {
        if a.matryoshka_kl_temperature.is_some() {
            bail!("--matryoshka_kl_temperature needs --matryoshka_kl_weight");
        }
        return Ok(None);
    };
    if !(weight.is_finite() && weight >= 0.0) {
        bail!("--matryoshka_kl_weight must be finite and not negative, not {weight}");
    }
    let temperature = a.matryoshka_kl_temperature.unwrap_or(a.temperature);
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("--matryoshka_kl_temperature must be positive, not {temperature}");
    }
    Ok((weight > 0.0).then_some(PrefixKl { weight, temperature }))
}

/// `--distillation` and its settings.
fn distillation(a: &TrainArgs) -> Result<Option<Distillation>> {
    let given = [a.distil_temperature, a.distil_teacher_temperature, a.distil_contrastive_weight];
    if !a.distillation {
        if given.iter().any(Option::is_some) {
            bail!("--distil_temperature, --distil_teacher_temperature and --distil_contrastive_weight need --distillation");
        }
        return Ok(None);
    }
    let student = a.distil_temperature.unwrap_or(0.02);
    let teacher = a.distil_teacher_temperature.unwrap_or(student);
    let weight = a.distil_contrastive_weight.unwrap_or(0.0);
    if !(student > 0.0 && teacher > 0.0 && student.is_finite() && teacher.is_finite()) {
        bail!("--distil_temperature and --distil_teacher_temperature must be positive");
    }
    if !(weight >= 0.0 && weight.is_finite()) {
        bail!("--distil_contrastive_weight must be a non-negative number");
    }
    Ok(Some(Distillation {
        student_temperature: student,
        teacher_temperature: teacher,
        contrastive_weight: weight,
    }))
}

fn check(a: &TrainArgs, reranker: bool) -> Result<()> {
    if a.fp16 && a.bf16 {
        bail!("--fp16 and --bf16 are exclusive");
    }
    if a.per_device_train_batch_size == 0 || a.gradient_accumulation_steps == 0 {
        bail!("--per_device_train_batch_size and --gradient_accumulation_steps must be at least 1");
    }
    if a.train_group_size == 0 {
        bail!("--train_group_size must be at least 1");
    }
    // Both losses are over each query's group alone: one passage leaves them nothing to rank
    // (a loss of 0 at every step, an unchanged model).
    if a.train_group_size < 2 && (reranker || a.distillation) {
        let what = if reranker { "a reranker's listwise loss" } else { "--distillation's KL" };
        bail!("{what} ranks each query's group of passages: --train_group_size must be at least 2");
    }
    if a.temperature <= 0.0 || !a.temperature.is_finite() {
        bail!("--temperature must be positive, got {}", a.temperature);
    }
    if a.grad_cache && (a.gc_q_chunk_size == 0 || a.gc_p_chunk_size == 0) {
        bail!("--gc_q_chunk_size and --gc_p_chunk_size must be at least 1");
    }
    if a.warmup_ratio.is_some_and(|r| !(0.0..1.0).contains(&r)) {
        bail!("--warmup_ratio must be in [0, 1), got {}", a.warmup_ratio.unwrap_or_default());
    }
    if a.learning_rate < 0.0 || !a.learning_rate.is_finite() {
        bail!("--learning_rate must be a non-negative number");
    }
    // PyTorch's AdamW refuses these; an epsilon of 0 divides by zero where a moment is 0.
    for (name, beta) in [("adam_beta1", a.adam_beta1), ("adam_beta2", a.adam_beta2)] {
        if !(0.0..1.0).contains(&beta) {
            bail!("--{name} must be in [0, 1), not {beta}");
        }
    }
    if !(a.adam_epsilon > 0.0 && a.adam_epsilon.is_finite()) {
        bail!("--adam_epsilon must be a positive number, not {}", a.adam_epsilon);
    }
    if !(a.weight_decay >= 0.0 && a.weight_decay.is_finite()) {
        bail!("--weight_decay must be a non-negative number, not {}", a.weight_decay);
    }
    if a.max_grad_norm.is_nan() {
        bail!("--max_grad_norm must be a number (0 or less: no clipping)");
    }
    if !a.num_train_epochs.is_finite() {
        bail!("--num_train_epochs must be a finite number, not {}", a.num_train_epochs);
    }
    if a.max_steps <= 0 && a.num_train_epochs <= 0.0 {
        bail!("give --num_train_epochs > 0 or --max_steps > 0");
    }
    if let Some(b) = a.ddp_backend.as_deref().filter(|b| !["nccl", "gloo"].contains(b)) {
        bail!("--ddp_backend {b:?}: supported are nccl (GPU ranks) and gloo (TCP, any device)");
    }
    let retrieval_data = [&a.eval_query_path, &a.eval_corpus_path, &a.eval_qrels_path];
    // A reranker's validation reranks a run over the three retrieval files.
    if reranker
        && a.eval_strategy != StrategyArg::No
        && (a.eval_run_path.is_none() || retrieval_data.iter().any(|p| p.is_none()))
    {
        bail!("a reranker's validation reranks a first-stage run: give --eval_run_path with --eval_query_path, --eval_corpus_path and --eval_qrels_path");
    }
    if reranker && !a.add_special_tokens {
        bail!("--add_special_tokens false: a reranker's pairs are tokenized with the special tokens, as rerank gives them (a text pair needs its separator)");
    }
    if a.eval_run_path.is_some() && a.eval_strategy == StrategyArg::No {
        bail!("--eval_run_path needs --eval_strategy steps or epoch");
    }
    if a.eval_rerank_depth.is_some() && a.eval_run_path.is_none() {
        bail!("--eval_rerank_depth needs --eval_run_path (the run whose candidates validation reranks)");
    }
    if a.eval_rerank_depth == Some(0) {
        bail!("--eval_rerank_depth must be at least 1");
    }
    let any_data = retrieval_data.iter().any(|p| p.is_some()) || a.eval_dataset_path.is_some();
    if a.eval_strategy == StrategyArg::No {
        if any_data {
            bail!("--eval_query_path, --eval_corpus_path, --eval_qrels_path and --eval_dataset_path need --eval_strategy steps or epoch");
        }
        if a.load_best_model_at_end {
            bail!("--load_best_model_at_end needs validation: --eval_strategy steps or epoch with the eval data");
        }
    } else {
        let some = retrieval_data.iter().filter(|p| p.is_some()).count();
        if some != 3 && !(some == 0 && a.eval_dataset_path.is_some()) {
            bail!(
                "--eval_strategy {} needs --eval_query_path, --eval_corpus_path and --eval_qrels_path (retrieval measures), --eval_dataset_path (eval_loss), or both",
                format!("{:?}", a.eval_strategy).to_lowercase()
            );
        }
        if a.eval_steps == Some(0) || a.per_device_eval_batch_size == 0 {
            bail!("--eval_steps and --per_device_eval_batch_size must be at least 1");
        }
        if a.eval_strategy == StrategyArg::Steps && a.eval_steps.is_none() && a.logging_steps == 0 {
            // The interval would be 0: no evaluation would ever run.
            bail!("--eval_strategy steps with --logging_steps 0 needs --eval_steps (at least 1)");
        }
    }
    // As Hugging Face: a strategy by steps needs an interval (0 logged or saved nothing).
    for (name, strategy, steps) in
        [("logging", a.logging_strategy, a.logging_steps), ("save", a.save_strategy, a.save_steps)]
    {
        if strategy == StrategyArg::Steps && steps == 0 {
            bail!("--{name}_strategy steps needs --{name}_steps of at least 1");
        }
    }
    if a.load_best_model_at_end && a.save_strategy != a.eval_strategy {
        bail!(
            "--load_best_model_at_end needs --save_strategy equal to --eval_strategy ({} and {}), as in Hugging Face",
            format!("{:?}", a.save_strategy).to_lowercase(),
            format!("{:?}", a.eval_strategy).to_lowercase()
        );
    }
    let eval_steps = a.eval_steps.unwrap_or(a.logging_steps);
    let by_steps = a.eval_strategy == StrategyArg::Steps && a.save_strategy == StrategyArg::Steps;
    if a.load_best_model_at_end
        && by_steps
        && a.save_steps > 0
        && !eval_steps.is_multiple_of(a.save_steps)
    {
        tracing::info!(
            "evaluations fall between saves (every {eval_steps} and {} steps): a new best \
             evaluation between saves is saved as a checkpoint of its own, so that the run can \
             end on it (Hugging Face would lose it)",
            a.save_steps
        );
    }
    if let Some(attn) = &a.attn_implementation {
        if !["eager", "sdpa", "flash_attention_2"].contains(&attn.as_str()) {
            bail!("--attn_implementation {attn:?}: expected eager, sdpa or flash_attention_2");
        }
    }
    Ok(())
}

/// Whether attention runs as the fused kernels on a GPU: `--attn_implementation
/// flash_attention_2` (`eager` and `sdpa` keep the composed products and softmax there). On
/// the CPU attention is always the fused kernel, which the log says when the flag is given.
fn gpu_fused_attention(a: &TrainArgs, device: &candle_core::Device) -> bool {
    let Some(attn) = a.attn_implementation.as_deref() else { return false };
    if device.is_cpu() {
        tracing::info!(
            "--attn_implementation {attn} changes nothing on the CPU: attention there is always one fused op"
        );
        return false;
    }
    attn == "flash_attention_2"
}

/// The candidates per query a reranker's validation rescores: `--eval_rerank_depth`, 100 by
/// default (`tevatron rerank`'s depth).
fn eval_rerank_depth(a: &TrainArgs) -> usize {
    a.eval_rerank_depth.unwrap_or(100)
}

/// Validation during training from the `--eval_*` flags: the data read up front (a bad file
/// stops the run before any step), batches and texts as `tevatron encode` would use them.
/// `corpus` is the training corpus (already opened), through which an ids-form
/// --eval_dataset_path resolves.
fn validation(
    a: &TrainArgs,
    encoder: &tevatron_model::Encoder,
    padding_side: PaddingSide,
    corpus: Option<Arc<Corpus>>,
    cache: &Path,
    pair_format: Option<PairFormat>,
) -> Result<Option<Validation>> {
    let reranker = pair_format.is_some();
    if a.eval_strategy == StrategyArg::No {
        return Ok(None);
    }
    let (mut retrieval, mut rerank) = (None, None);
    if let (Some(queries), Some(corpus), Some(qrels)) =
        (&a.eval_query_path, &a.eval_corpus_path, &a.eval_qrels_path)
    {
        let qrels = Qrels::read(qrels).context("reading --eval_qrels_path")?;
        match (&a.eval_run_path, pair_format) {
            (Some(run), Some(format)) => {
                let pairs = pairs_from_run(
                    run,
                    std::slice::from_ref(queries),
                    std::slice::from_ref(corpus),
                    eval_rerank_depth(a),
                )
                .with_context(|| {
                    format!("reading --eval_run_path {} and its texts", run.display())
                })?;
                if pairs.is_empty() {
                    bail!("--eval_run_path {}: the run has no pairs to rerank", run.display());
                }
                let judged: std::collections::HashSet<&str> =
                    qrels.queries.iter().map(|(q, _)| q.as_str()).collect();
                if !pairs.query_ids().any(|q| judged.contains(q)) {
                    bail!(
                        "--eval_run_path {}: none of its queries is judged in --eval_qrels_path",
                        run.display()
                    );
                }
                let (query_prefix, passage_prefix) = prefixes(a, true);
                rerank = Some(RerankData { pairs, qrels, format, query_prefix, passage_prefix });
            }
            _ => {
                // Matryoshka training is validated at each of its narrower widths too.
                let width = encoder.output_width();
                let mut widths: Vec<usize> =
                    a.matryoshka_dims.iter().copied().filter(|&k| k < width).collect();
                widths.sort_unstable_by(|x, y| y.cmp(x));
                widths.dedup();
                let queries_read = read_records(queries, RecordKind::Query)?;
                let judged: std::collections::HashSet<&str> =
                    qrels.queries.iter().map(|(q, _)| q.as_str()).collect();
                if !queries_read.iter().any(|q| judged.contains(q.id.as_str())) {
                    // Every logged measure would be 0, as a reranker's validation refuses.
                    bail!(
                        "--eval_query_path {}: none of its queries is judged in --eval_qrels_path",
                        queries.display()
                    );
                }
                retrieval = Some(RetrievalData {
                    queries: queries_read,
                    corpus: read_records(corpus, RecordKind::Doc)?,
                    qrels,
                    widths,
                })
            }
        }
    }
    let loss = match &a.eval_dataset_path {
        None => None,
        Some(path) => {
            let data = TrainData::open(
                std::slice::from_ref(path),
                corpus,
                cache,
                a.train_group_size,
                a.seed,
            )
            .with_context(|| format!("reading --eval_dataset_path {}", path.display()))?;
            Some(LossData {
                data,
                temperature: a.temperature,
                batch_queries: a.per_device_eval_batch_size,
            })
        }
    };
    if retrieval.is_none() && rerank.is_none() && loss.is_none() {
        return Ok(None);
    }
    let default_metric = if retrieval.is_some() || rerank.is_some() { "ndcg@10" } else { LOSS };
    let metric = a.metric_for_best_model.as_deref().unwrap_or(default_metric);
    let metric = metric.strip_prefix("eval_").unwrap_or(metric).to_string();
    let text = |max_len, prefix: &str| TextOptions {
        max_len,
        prefix: prefix.to_string(),
        append_eos: a.append_eos_token,
        add_special_tokens: a.add_special_tokens,
    };
    let batch = |max_len| {
        BatchOptions::for_encoding(
            a.per_device_eval_batch_size,
            max_len,
            a.pad_to_multiple_of,
            padding_side,
            encoder.device(),
        )
    };
    // A reranker's pairs are inputs and batches as `tevatron rerank` makes them (in the
    // training's pair format, special tokens added, right padding).
    let (passage_text, passage_batch) = if reranker {
        let text = TextOptions { add_special_tokens: true, ..text(a.rerank_max_len, "") };
        let batch = BatchOptions::for_encoding(
            a.per_device_eval_batch_size,
            a.rerank_max_len,
            a.pad_to_multiple_of,
            PaddingSide::Right,
            encoder.device(),
        );
        (text, batch)
    } else {
        (text(a.passage_max_len, &prefixes(a, false).1), batch(a.passage_max_len))
    };
    let v = Validation {
        every: 0,
        retrieval,
        rerank,
        loss,
        query_text: text(a.query_max_len, &prefixes(a, false).0),
        passage_text,
        query_batch: batch(a.query_max_len),
        passage_batch,
        greater_is_better: a.greater_is_better.unwrap_or(metric != LOSS),
        metric,
        load_best_model_at_end: a.load_best_model_at_end,
    };
    if !v.measures().contains(&v.metric) {
        bail!(
            "--metric_for_best_model {:?}: validation here measures {}",
            v.metric,
            v.measures().join(", ")
        );
    }
    if let Some(r) = &v.retrieval {
        tracing::info!(
            "validating on {} queries over {} passages ({})",
            r.queries.len(),
            r.corpus.len(),
            a.eval_corpus_path.as_deref().unwrap_or(Path::new("")).display(),
        );
    }
    if let Some(r) = &v.rerank {
        tracing::info!(
            "validating by reranking the top {} of {} ({} pairs)",
            eval_rerank_depth(a),
            a.eval_run_path.as_deref().unwrap_or(Path::new("")).display(),
            r.pairs.len(),
        );
    }
    if let Some(l) = &v.loss {
        tracing::info!("validation loss on {} training-format rows", l.data.len());
    }
    tracing::info!("{} picks the best model", v.metric);
    Ok(Some(v))
}

/// The mixed precision `--bf16` or `--fp16` asks for, saying in the log what it computes on
/// the CPU: bf16 products on AMX-BF16 or AVX-512 BF16 where the CPU has it (`Mode::cpu_bf16` in the model
/// crate; a warning where they are slower than F32, as `vdpbf16ps` on Intel's CPUs), else
/// candle's products widened to F32 (slower than F32, kept for its numerics).
fn cpu_autocast_note(a: &TrainArgs, device: &candle_core::Device) -> Option<DType> {
    let autocast = if a.bf16 {
        Some(DType::BF16)
    } else if a.fp16 {
        Some(DType::F16)
    } else {
        None
    };
    if autocast.is_some() && device.is_cpu() {
        let kernels = tevatron_model::Training::new(autocast, 0).cpu_bf16_kernels();
        match kernels {
            Some(k) if k.faster_than_f32() => tracing::info!(
                "--bf16 on the CPU: the linear layers' products (forward and both gradients) as bf16 products with {}, F32 sums; the rest in F32",
                k.name()
            ),
            Some(k) => tracing::warn!(
                "--bf16 on the CPU: the linear layers' products as bf16 products with {}, which on this Intel CPU do no more multiply-adds a cycle than its F32 FMAs (AMX-BF16 is not usable here): slower than F32 training, kept for autocast's rounding; train without --bf16 for speed (docs/bf16.md#training)",
                k.name()
            ),
            None => tracing::warn!(
                "{} on the CPU: candle widens each half-precision product to F32, slower than F32 training{}",
                if a.bf16 { "--bf16" } else { "--fp16" },
                if a.bf16 { " (this CPU has neither AMX-BF16 nor AVX-512 BF16, one of which the bf16 kernels need)" } else { "" }
            ),
        }
    }
    autocast
}

/// The flags as a JSON object, saved beside checkpoints (`training_args.json`): those of this
/// command, so that the file can be given back as its arguments file (the flags of the other
/// training command, which this one refuses, are left out).
fn args_json(a: &TrainArgs, reranker: bool) -> serde_json::Value {
    let mut args = serde_json::to_value(a).unwrap_or(serde_json::Value::Null);
    if let Some(map) = args.as_object_mut() {
        // The values in force, each command's default where none was given.
        map.insert("warmup_ratio".into(), warmup_ratio(a, reranker).into());
        map.insert("lora_r".into(), lora_rank(a, reranker).into());
        let (query_prefix, passage_prefix) = prefixes(a, reranker);
        map.insert("query_prefix".into(), query_prefix.into());
        map.insert("passage_prefix".into(), passage_prefix.into());
        for name in crate::flags::refused_by(if reranker { "train-reranker" } else { "train" }) {
            map.remove(name);
        }
        // Nor the settings of a feature that is off (given back, each would be noted as
        // changing nothing); LoRA settings are the adapter's own when one is continued.
        let off = |flag: &str| match flag {
            "lora" => !a.lora || a.lora_name_or_path.is_some(),
            "grad_cache" => !a.grad_cache,
            "eval_strategy" => a.eval_strategy == StrategyArg::No,
            _ => false,
        };
        for (flag, settings, _) in crate::flags::SETTINGS_OF {
            if off(flag) {
                for s in *settings {
                    map.remove(*s);
                }
            }
        }
    }
    args
}

/// `--lora` and its settings; `--lora_name_or_path` alone also turns LoRA on (continuing from
/// that adapter, whose own settings then apply), as in Tevatron. On a GPU under `--bf16` or
/// `--fp16` the frozen base is kept in that half precision, as Tevatron loads it there (half
/// the memory of an F32 base; the products are in half precision either way).
fn lora_options(
    a: &TrainArgs,
    reranker: bool,
    device: &candle_core::Device,
) -> Result<Option<LoraOptions>> {
    if !a.lora && a.lora_name_or_path.is_none() {
        return Ok(None);
    }
    let source = match &a.lora_name_or_path {
        Some(l) => {
            AdapterSource::Saved(tevatron_model::hub::resolve_adapter(l, a.cache_dir.as_deref())?)
        }
        None => {
            // A scale that is not finite diverges at the first step.
            if !a.lora_alpha.is_finite() || !(0.0..1.0).contains(&a.lora_dropout) {
                bail!(
                    "--lora_alpha must be a finite number and --lora_dropout in [0, 1), not {} and {}",
                    a.lora_alpha,
                    a.lora_dropout
                );
            }
            let target_modules: Vec<String> = (a.lora_target_modules.split(','))
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect();
            if target_modules.is_empty() {
                bail!("--lora_target_modules names no module");
            }
            AdapterSource::Fresh(LoraConfig {
                r: lora_rank(a, reranker),
                lora_alpha: a.lora_alpha,
                lora_dropout: a.lora_dropout,
                target_modules,
                use_rslora: false,
            })
        }
    };
    let half = if a.bf16 {
        Some(DType::BF16)
    } else if a.fp16 {
        Some(DType::F16)
    } else {
        None
    };
    let base_dtype = half.filter(|_| device.is_cuda());
    Ok(Some(LoraOptions { source, merge: false, seed: a.seed, base_dtype }))
}

/// This process's place in a data-parallel run: torchrun's variables when set, else alone.
fn join_group(a: &TrainArgs) -> Result<Group> {
    let var = |k: &str| std::env::var(k).ok();
    let Some(rv) = Rendezvous::from_env(var, Duration::from_secs(a.ddp_timeout))? else {
        return Ok(Group::single());
    };
    tracing::info!(
        "rank {} of {}: meeting the others at {}:{}",
        rv.rank,
        rv.world_size,
        rv.master_addr,
        rv.master_port
    );
    Ok(Group::new(Arc::new(TcpTransport::connect(&rv)?)))
}

/// `--ddp_backend`: NCCL for GPU ranks when the binary has it (unless `gloo` is asked for),
/// else the TCP transport; `nccl` that cannot be honoured is refused.
fn choose_backend(a: &TrainArgs, group: Group, device: &candle_core::Device) -> Result<Group> {
    let want = a.ddp_backend.as_deref();
    if want == Some("gloo") || group.world_size() == 1 {
        return Ok(group);
    }
    #[cfg(feature = "nccl")]
    let group = group.with_nccl(device, Duration::from_secs(a.ddp_timeout))?;
    if want == Some("nccl") && !group.uses_nccl() {
        let why = if !cfg!(feature = "nccl") {
            "this binary was built without NCCL (scripts/build-cuda.sh builds it)"
        } else if device.is_cpu() {
            "the ranks run on the CPU"
        } else {
            "several ranks share a GPU"
        };
        bail!("--ddp_backend nccl: {why}; use --ddp_backend gloo");
    }
    Ok(group)
}

/// The rank on this machine: LOCAL_RANK, else `--local_rank`, else 0.
fn local_rank(a: &TrainArgs) -> Result<usize> {
    match std::env::var("LOCAL_RANK") {
        Ok(v) => v.trim().parse().with_context(|| format!("LOCAL_RANK={v:?} is not a number")),
        Err(_) => Ok(a.local_rank.max(0) as usize),
    }
}

/// Refuses, on each rank other than 0, flags that shape the run (those a resume compares, and
/// the seed) other than rank 0's: ranks started by hand (torchrun's variables) with another
/// learning rate trained apart without a word, their weights drifting, and only rank 0's saved.
/// `--nproc_per_node` starts every rank with the same flags. The failing rank names the flags;
/// rank 0 then sees it leave.
fn same_flags_as_rank_0(a: &TrainArgs, reranker: bool, group: &Group) -> Result<()> {
    if group.world_size() < 2 {
        return Ok(());
    }
    let mine = args_json(a, reranker);
    let shared = group.broadcast_bytes(mine.to_string().as_bytes())?;
    let first: serde_json::Value = serde_json::from_slice(&shared).unwrap_or_default();
    let mut differ = changed_settings(&first, &mine);
    if first.get("seed") != mine.get("seed") {
        differ.push(format!("seed: {} -> {}", first["seed"], mine["seed"]));
    }
    if !differ.is_empty() {
        bail!(
            "rank {}: its flags differ from rank 0's ({}): start every rank with the same flags",
            group.rank(),
            differ.join(", ")
        );
    }
    Ok(())
}

/// The checkpoint to resume from, decided by rank 0 (which makes the output folder) and shared
/// with every rank.
fn resume_point(a: &TrainArgs, group: &Group) -> Result<Option<PathBuf>> {
    let mine = if group.is_main() { resume_here(a)? } else { None };
    let path = mine.as_deref().map(Path::to_string_lossy).unwrap_or_default();
    let shared = group.broadcast_bytes(path.as_bytes())?;
    Ok((!shared.is_empty()).then(|| PathBuf::from(String::from_utf8_lossy(&shared).into_owned())))
}

fn resume_here(a: &TrainArgs) -> Result<Option<PathBuf>> {
    Ok(match &a.resume_from_checkpoint {
        Some(dir) => {
            if !dir.join("trainer_state.json").is_file() {
                bail!(
                    "--resume_from_checkpoint {}: not a checkpoint folder (no trainer_state.json)",
                    dir.display()
                );
            }
            std::fs::create_dir_all(&a.output_dir)
                .with_context(|| format!("creating {}", a.output_dir.display()))?;
            // As Hugging Face: the checkpoint named is resumed, and the output folder's own
            // checkpoints are neither resumed nor removed.
            let overwrite = if a.overwrite_output_dir {
                " (--overwrite_output_dir changes nothing with it: nothing is removed)"
            } else {
                ""
            };
            tracing::info!("resuming from {} (--resume_from_checkpoint){overwrite}", dir.display());
            Some(dir.clone())
        }
        None => prepare_output_dir(&a.output_dir, a.overwrite_output_dir)?,
    })
}

/// Flags that leave the batches, the model and the optimisation of a resumed run as they were:
/// where things are written and read from, how often the run logs, saves and validates, and
/// how a step is computed (the same numbers either way).
const RESUME_NEUTRAL: &[&str] = &[
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "cache_dir",
    "dataset_cache_dir",
    "quiet",
    "disable_tqdm",
    "report_to",
    "run_name",
    "do_train",
    "local_rank",
    "device",
    "ddp_backend",
    "ddp_timeout",
    "dataloader_num_workers",
    "logging_steps",
    "logging_strategy",
    "logging_first_step",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "eval_strategy",
    "eval_steps",
    "eval_dataset_path",
    "eval_query_path",
    "eval_corpus_path",
    "eval_qrels_path",
    "eval_run_path",
    "eval_rerank_depth",
    "per_device_eval_batch_size",
    "metric_for_best_model",
    "greater_is_better",
    "load_best_model_at_end",
    "gradient_checkpointing",
    "grad_cache",
    "gc_q_chunk_size",
    "gc_p_chunk_size",
    "attn_implementation",
];

/// The settings, other than [`RESUME_NEUTRAL`] ones and the seed (another seed is refused by
/// the trainer), in which `now` differs from the `saved` flags of the run that wrote a
/// checkpoint, each as `name: was -> now`.
fn changed_settings(saved: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    let (Some(saved), Some(now)) = (saved.as_object(), now.as_object()) else { return vec![] };
    let mut names: Vec<&String> = saved.keys().chain(now.keys()).collect();
    names.sort();
    names.dedup();
    let shown = |v: Option<&serde_json::Value>| v.map_or("(not set)".into(), |v| v.to_string());
    names
        .into_iter()
        .filter(|n| *n != "seed" && !RESUME_NEUTRAL.contains(&n.as_str()))
        .filter(|n| saved.get(*n) != now.get(*n))
        .map(|n| format!("{n}: {} -> {}", shown(saved.get(n)), shown(now.get(n))))
        .collect()
}

/// Warns when a run resumes with settings that change its batches, model or optimisation:
/// a resumed run equals an uninterrupted one only with the flags that wrote the checkpoint
/// (the seed alone is refused when it differs).
fn warn_of_changed_settings(checkpoint: &Path, now: &serde_json::Value) {
    let path = checkpoint.join("training_args.json");
    let Some(saved) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    else {
        tracing::warn!(
            "{} is missing or unreadable: the settings of the run being resumed are unknown",
            path.display()
        );
        return;
    };
    let changed = changed_settings(&saved, now);
    if !changed.is_empty() {
        tracing::warn!(
            "resuming {} with settings other than the run that wrote it ({}): the run goes on \
             with the new ones, so its batches or optimisation differ from a run that never \
             stopped",
            checkpoint.display(),
            changed.join(", ")
        );
    }
}

/// Runs `tevatron train` (a retriever) or, with `reranker`, `tevatron train-reranker`. A run
/// that fails leaves no empty output folder behind: the folder is made before the validation
/// data and the model are read (the resume point decides what to load), so a refusal there
/// would otherwise leave it; a folder holding anything (checkpoints to resume) is kept.
pub fn run(a: &TrainArgs, reranker: bool) -> Result<()> {
    let existed = a.output_dir.exists();
    let result = run_training(a, reranker);
    if result.is_err() && !existed {
        // Removes the folder only if it is empty.
        let _ = std::fs::remove_dir(&a.output_dir);
    }
    result
}

fn run_training(a: &TrainArgs, reranker: bool) -> Result<()> {
    if a.nproc_per_node == 0 {
        bail!("--nproc_per_node must be at least 1");
    }
    if a.nproc_per_node > 1 && !launch::is_launched_rank() {
        return launch::spawn_ranks(a.nproc_per_node);
    }
    crate::tune_allocator_for_training();
    check(a, reranker)?;
    let distil = distillation(a)?;
    // The flags alone, before the output folder is made; the widths once the model is loaded.
    matryoshka(a, usize::MAX, false)?;
    if reranker && a.rerank_max_len < 2 {
        bail!("--rerank_max_len must leave room for a pair (at least 2 tokens)");
    }
    let schedule = ScheduleKind::parse(&a.lr_scheduler_type).with_context(|| {
        format!(
            "--lr_scheduler_type {:?}: supported are linear, cosine, constant, constant_with_warmup",
            a.lr_scheduler_type
        )
    })?;
    let group = join_group(a)?;
    same_flags_as_rank_0(a, reranker, &group)?;
    let resume = resume_point(a, &group)?;

    let files = a.data.files().context("resolving the training data")?;
    let cache = index_cache(a.data.dataset_cache_dir.as_deref());
    let corpus_files =
        a.corpus.files(a.data.dataset_cache_dir.as_deref()).context("resolving the corpus")?;
    let corpus = match &corpus_files {
        None => None,
        Some(files) => {
            tracing::info!(
                "indexing the corpus ({} file(s)) under {}",
                files.len(),
                cache.display()
            );
            Some(Arc::new(Corpus::open(files, &cache)?))
        }
    };
    tracing::info!("indexing {} training file(s) under {}", files.len(), cache.display());
    let data = TrainData::open(&files, corpus, &cache, a.train_group_size, a.seed)?;
    if distil.is_some() {
        data.check_scores().context("--distillation reads the teacher's score of every passage")?;
    } else if data.first_row_scored()? {
        let hint = if reranker { "tevatron train --distillation" } else { "--distillation" };
        tracing::warn!(
            "the training rows carry teacher scores (`score`, as tevatron annotate writes them), \
             which only {hint} trains on (Tevatron's train_distil): here they change nothing"
        );
    }

    // Each rank of a multi-GPU run takes the GPU of its local rank.
    let device_spec = match a.device.as_deref() {
        None | Some("cuda")
            if group.world_size() > 1 && candle_core::utils::cuda_is_available() =>
        {
            Some(format!("cuda:{}", local_rank(a)?))
        }
        spec => spec.map(str::to_string),
    };
    let device = tevatron_model::device::select(device_spec.as_deref())?;
    let group = choose_backend(a, group, &device)?;
    if group.world_size() > 1 {
        let how = if group.uses_nccl() { "NCCL" } else { "TCP through rank 0" };
        tracing::info!(
            "{} ranks exchanging representations and gradients over {how}",
            group.world_size()
        );
    }
    let lora = lora_options(a, reranker, &device)?;
    let mut encoder = super::load_encoder(
        &a.model_name_or_path,
        a.tokenizer_name.as_deref(),
        a.cache_dir.as_deref(),
        &EncoderOptions {
            pooling: a.pooling,
            normalize: a.normalize,
            dtype: DType::F32,
            device,
            trainable: true,
            disable_dropout: a.disable_dropout,
            lora,
            score_head: reranker.then_some(ScoreHeadOptions { init_missing: true, seed: a.seed }),
            cpu_products: tevatron_model::CpuProducts::F32,
        },
    )?;
    if !encoder.initialised_head().is_empty() {
        tracing::info!(
            "the model has no score head: {} initialised as transformers initialises a new one",
            encoder.initialised_head().join(", ")
        );
    }
    let padding_side = PaddingSide::from(a.padding_side);
    encoder.check_padding(padding_side)?;
    let (query_prefix, passage_prefix) = prefixes(a, reranker);
    // A cross-encoder's pairs as `rerank` would take them from the same flags and folders;
    // recorded in training_args.json and in the saved config.
    let pair_format = reranker.then(|| {
        super::rerank::resolve_pair_format(
            a.pair_format.and_then(PairFormatArg::named),
            a.lora_name_or_path.as_deref(),
            a.cache_dir.as_deref(),
            encoder.model_dir(),
        )
    });
    let mut args = args_json(a, reranker);
    if let Some(format) = pair_format {
        encoder.set_pair_format(format);
        args["pair_format"] = format.name().into();
    }
    if let Some(dir) = resume.as_deref().filter(|_| group.is_main()) {
        warn_of_changed_settings(dir, &args);
    }

    let text = |max_len, prefix: &str| TextOptions {
        max_len,
        prefix: prefix.to_string(),
        append_eos: a.append_eos_token,
        add_special_tokens: a.add_special_tokens,
    };
    let save_steps = match a.save_strategy {
        StrategyArg::Steps => a.save_steps,
        StrategyArg::No | StrategyArg::Epoch => 0,
    };
    let mut cfg = TrainConfig {
        output_dir: a.output_dir.clone(),
        batch_size: a.per_device_train_batch_size,
        grad_accum: a.gradient_accumulation_steps,
        epochs: a.num_train_epochs,
        max_steps: (a.max_steps > 0).then_some(a.max_steps as usize),
        schedule,
        learning_rate: a.learning_rate,
        warmup_steps: a.warmup_steps,
        warmup_ratio: warmup_ratio(a, reranker),
        adam: AdamWConfig {
            beta1: a.adam_beta1,
            beta2: a.adam_beta2,
            eps: a.adam_epsilon,
            weight_decay: a.weight_decay,
        },
        max_grad_norm: a.max_grad_norm,
        seed: a.seed,
        logging_steps: match a.logging_strategy {
            StrategyArg::Steps => a.logging_steps,
            StrategyArg::No | StrategyArg::Epoch => 0,
        },
        logging_first_step: a.logging_first_step,
        save_steps,
        save_total_limit: a.save_total_limit,
        save_at_end: a.save_strategy != StrategyArg::No,
        drop_last: a.dataloader_drop_last,
        num_workers: a.dataloader_num_workers,
        query_text: text(a.query_max_len, &query_prefix),
        // A reranker's pair is one text, the prefixes inside it (Tevatron's format_pair), or a
        // text pair without them.
        passage_text: if reranker {
            text(a.rerank_max_len, "")
        } else {
            text(a.passage_max_len, &passage_prefix)
        },
        objective: match pair_format {
            Some(format) => Objective::Reranker {
                format,
                query_prefix: query_prefix.clone(),
                passage_prefix: passage_prefix.clone(),
            },
            None => Objective::Retriever,
        },
        step: StepOptions {
            temperature: a.temperature,
            grad_cache: a.grad_cache.then_some((a.gc_q_chunk_size, a.gc_p_chunk_size)),
            checkpointing: a.gradient_checkpointing,
            pad_to_multiple_of: a.pad_to_multiple_of.max(1),
            padding_side,
            autocast: cpu_autocast_note(a, encoder.device()),
            gpu_fused_attention: gpu_fused_attention(a, encoder.device()),
            distillation: distil,
            matryoshka: if reranker {
                None
            } else {
                matryoshka(a, encoder.output_width(), encoder.normalize())?
            },
        },
        args,
        validation: validation(
            a,
            &encoder,
            padding_side,
            data.corpus().cloned(),
            &cache,
            pair_format,
        )?
        .map(std::sync::Arc::new),
    };
    // Epoch strategies become step intervals of one epoch's updates.
    let plan = Plan::new(data.len(), group.world_size(), &cfg)?;
    if a.save_strategy == StrategyArg::Epoch {
        cfg.save_steps = plan.updates_per_epoch;
    }
    if a.logging_strategy == StrategyArg::Epoch {
        cfg.logging_steps = plan.updates_per_epoch;
    }
    if let Some(v) = cfg.validation.as_mut().and_then(std::sync::Arc::get_mut) {
        v.every = match a.eval_strategy {
            StrategyArg::Epoch => plan.updates_per_epoch,
            _ => a.eval_steps.unwrap_or(a.logging_steps),
        };
    }
    let device_name = format!("{:?}", encoder.device().location());
    if let Some(format) = pair_format {
        super::rerank::log_format(format, &query_prefix, &passage_prefix);
        if format == PairFormat::Tevatron {
            tracing::info!(
                "the saved folders score with tevatron rerank and transformers; \
                 sentence-transformers' CrossEncoder.predict feeds text pairs, not this one \
                 string, so its scores will differ (train with --pair_format pair for it)"
            );
        }
        tracing::info!(
            "training the reranker {} (pairs of at most {} tokens, groups of {}) on {device_name}",
            a.model_name_or_path,
            a.rerank_max_len,
            a.train_group_size
        );
    } else if let Some(d) = distil {
        tracing::info!(
            "distilling into {} ({} pooling, normalize {}): KL at temperatures {} (student) and {} (teacher){} on {device_name}",
            a.model_name_or_path,
            encoder.pooling().name(),
            encoder.normalize(),
            d.student_temperature,
            d.teacher_temperature,
            if d.contrastive_weight > 0.0 {
                format!(", plus {} x the contrastive loss at temperature {}", d.contrastive_weight, a.temperature)
            } else {
                String::new()
            }
        );
    } else {
        tracing::info!(
            "training {} ({} pooling, normalize {}, temperature {}) on {device_name}",
            a.model_name_or_path,
            encoder.pooling().name(),
            encoder.normalize(),
            a.temperature
        );
    }

    let quiet = a.quiet || !group.is_main();
    let bar = progress::bar(Some(plan.total_steps as u64), "steps", quiet || a.disable_tqdm);
    let mut log = progress::LogProgress::new(plan.total_steps, "steps", quiet);
    let mut first = true;
    let mut on_step = |p: &tevatron_train::trainer::Progress| {
        if first {
            bar.set_position(p.step as u64 - 1);
            log.resume_at(p.step - 1);
            first = false;
        }
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} epoch {:.2}",
            p.loss, p.learning_rate, p.epoch
        ));
        bar.inc(1);
        log.advance(1);
    };
    let result = train(&encoder, &data, &cfg, &group, resume.as_deref(), &mut on_step);
    bar.finish_and_clear();
    let state = result?;
    if !group.is_main() {
        return Ok(());
    }
    if let Some(summary) = state.log_history.last() {
        tracing::info!("{summary}");
    }
    tracing::info!("model saved to {}", a.output_dir.display());
    // The pictures are a view of trainer_state.json: a training run that cannot draw them has
    // still succeeded. A short run that logged no loss at all is said as information; any
    // other failure (losses that are not numbers, a full disk) is a warning.
    let logged = state.log_history.iter().any(|e| e.get("loss").is_some());
    match crate::plot::plot_training(&a.output_dir) {
        Ok(files) => tracing::info!("training curves in {}", files[0].display()),
        Err(e) if !logged => tracing::info!("no training curves: {e:#}"),
        Err(e) => tracing::warn!("no training curves: {e:#}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_settings_name_what_shapes_the_run_only() {
        let saved = serde_json::json!({"per_device_train_batch_size": 8, "logging_steps": 2,
            "output_dir": "a", "query_prefix": null, "lora_r": 16, "seed": 1});
        let now = serde_json::json!({"per_device_train_batch_size": 16, "logging_steps": 5,
            "output_dir": "b", "query_prefix": "q: ", "seed": 2});
        assert_eq!(
            changed_settings(&saved, &now),
            [
                "lora_r: 16 -> (not set)",
                "per_device_train_batch_size: 8 -> 16",
                "query_prefix: null -> \"q: \""
            ]
        );
        assert!(changed_settings(&saved, &saved).is_empty());
    }
}
