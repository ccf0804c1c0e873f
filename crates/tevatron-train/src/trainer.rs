//! The training loop with Hugging Face Trainer semantics: epochs of shuffled queries cut into
//! micro-batches, `--gradient_accumulation_steps` micro-batches per optimizer step (the last
//! window of an epoch may be shorter; its loss is divided by its own length), global-norm
//! clipping, AdamW with a schedule, a log entry every `--logging_steps` and a checkpoint every
//! `--save_steps` (and at the end), auto-resume from the latest checkpoint, and the final model
//! written to `output_dir`.
//!
//! Everything random is a function of `(seed, step, ...)`, so a run resumed from a checkpoint
//! ends with the same weights, bit for bit, as one that never stopped.
//!
//! With several ranks ([`Group`]), each micro-batch is a global batch of
//! `world_size x per_device_train_batch_size` queries, cut into one contiguous slice per rank;
//! as PyTorch's DistributedSampler, each epoch's order is first padded with its own first
//! queries to a multiple of the world size so that every rank gets as many. The ranks' loss is
//! that of the global batch and their gradients are summed before clipping, so a run on W
//! ranks takes the steps of one process with a W times larger batch. Rank 0 writes
//! checkpoints and the final model; all ranks resume from the same checkpoint.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use serde_json::{json, Value};
use tevatron_ir::rerank::PairFormat;
use tevatron_model::rng::mix;
use tevatron_model::text::PreparedTokenizer;
use tevatron_model::{Encoder, TextOptions};

use crate::checkpoint::{self, ResumeState, TrainerState};
use crate::data::{epoch_order, TrainData};
use crate::dist::Group;
use crate::optim::{clip_coefficient, grad_norm, AdamW, AdamWConfig};
use crate::profile;
use crate::schedule::{warmup_steps, LrSchedule, ScheduleKind};
use crate::step::{self, Accumulator, Inputs, StepOptions};
use crate::validation::Validation;
use crate::{Error, Result};

/// torch.cuda.amp.GradScaler's initial scale and growth interval.
const INIT_LOSS_SCALE: f64 = 65536.0;
const SCALE_GROWTH_INTERVAL: usize = 2000;

/// Everything the loop needs besides the model and the data.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Where checkpoints and the final model go.
    pub output_dir: PathBuf,
    /// Queries per micro-batch (`--per_device_train_batch_size`).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// `--num_train_epochs` (fractions allowed).
    pub epochs: f64,
    /// `--max_steps` (overrides epochs when set).
    pub max_steps: Option<usize>,
    /// Learning-rate formula.
    pub schedule: ScheduleKind,
    /// `--learning_rate`.
    pub learning_rate: f64,
    /// `--warmup_steps` (used when positive).
    pub warmup_steps: usize,
    /// `--warmup_ratio`.
    pub warmup_ratio: f64,
    /// AdamW settings.
    pub adam: AdamWConfig,
    /// `--max_grad_norm` (0 disables clipping).
    pub max_grad_norm: f64,
    /// `--seed`.
    pub seed: u64,
    /// `--logging_steps`.
    pub logging_steps: usize,
    /// `--logging_first_step`: also log step 1, whatever `logging_steps` says.
    pub logging_first_step: bool,
    /// `--save_steps` (0: only at the end).
    pub save_steps: usize,
    /// `--save_total_limit`.
    pub save_total_limit: Option<usize>,
    /// Save a checkpoint after the last step (Hugging Face does unless saving is off).
    pub save_at_end: bool,
    /// `--dataloader_drop_last`.
    pub drop_last: bool,
    /// Tokenization threads working ahead of the model (`--dataloader_num_workers`).
    pub num_workers: usize,
    /// Query tokenization.
    pub query_text: TextOptions,
    /// Passage tokenization (a reranker's pairs).
    pub passage_text: TextOptions,
    /// What is trained: a retriever or a cross-encoder.
    pub objective: Objective,
    /// Loss and memory strategy.
    pub step: StepOptions,
    /// The arguments as given, saved in each checkpoint.
    pub args: Value,
    /// Validation during training (`--eval_strategy`), run by rank 0.
    pub validation: Option<std::sync::Arc<Validation>>,
}

/// What the loop reports after each optimizer step (for a progress bar).
#[derive(Clone, Debug)]
pub struct Progress {
    /// Steps done.
    pub step: usize,
    /// Steps planned.
    pub total: usize,
    /// Loss of this step (mean over its micro-batches).
    pub loss: f64,
    /// Rate used by this step.
    pub learning_rate: f64,
    /// Fractional epoch.
    pub epoch: f64,
}

/// Sizes of the run, derived as Hugging Face derives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Micro-batches per epoch.
    pub batches_per_epoch: usize,
    /// Optimizer steps per epoch: `ceil(batches / accumulation)`.
    pub updates_per_epoch: usize,
    /// Optimizer steps in all.
    pub total_steps: usize,
}

impl Plan {
    /// Plans `rows` training rows under `cfg`, shared by `world_size` ranks (each sees
    /// `ceil(rows / world_size)` of them per epoch, as under DistributedSampler).
    pub fn new(rows: usize, world_size: usize, cfg: &TrainConfig) -> Result<Self> {
        let bs = cfg.batch_size.max(1);
        let per_rank = rows.div_ceil(world_size.max(1));
        let batches_per_epoch = if cfg.drop_last { per_rank / bs } else { per_rank.div_ceil(bs) };
        if batches_per_epoch == 0 {
            return Err(Error::Invalid(format!(
                "{per_rank} training rows per rank make no full batch of {bs} with --dataloader_drop_last"
            )));
        }
        let updates_per_epoch = batches_per_epoch.div_ceil(cfg.grad_accum.max(1)).max(1);
        let total_steps = match cfg.max_steps {
            Some(m) => m,
            None => {
                let steps = (cfg.epochs * updates_per_epoch as f64).ceil();
                // A float past any run's length saturated to usize::MAX steps: a run with no end.
                if steps > u32::MAX as f64 {
                    return Err(Error::Invalid(format!(
                        "--num_train_epochs {:e} makes {steps:e} optimizer steps of {updates_per_epoch} \
                         an epoch: give a number of epochs a run can finish",
                        cfg.epochs
                    )));
                }
                steps as usize
            }
        };
        if total_steps == 0 {
            return Err(Error::Invalid(
                "the run has 0 optimizer steps; raise --num_train_epochs or --max_steps".into(),
            ));
        }
        Ok(Self { batches_per_epoch, updates_per_epoch, total_steps })
    }

    /// The micro-batches `(epoch, batch index)` of optimizer step `step` (0-based).
    pub fn micro_batches(&self, step: usize, grad_accum: usize) -> Vec<(usize, usize)> {
        let epoch = step / self.updates_per_epoch;
        let u = step % self.updates_per_epoch;
        let ga = grad_accum.max(1);
        (u * ga..((u + 1) * ga).min(self.batches_per_epoch)).map(|b| (epoch, b)).collect()
    }
}

/// What is trained, and how a training group becomes model input.
#[derive(Clone, Debug, PartialEq)]
pub enum Objective {
    /// A retriever: queries and passages encoded apart, the contrastive loss, or distillation
    /// from the passages' teacher scores when `StepOptions::distillation` is set.
    Retriever,
    /// A cross-encoder (`tevatron train-reranker`): each passage with its query in `format`
    /// (Tevatron's `format_pair` string or sentence-transformers' text pair), tokenized with
    /// the passage options, the listwise loss.
    Reranker {
        /// How a pair becomes input (`--pair_format`).
        format: PairFormat,
        /// Put before the query inside Tevatron's string (`--query_prefix`).
        query_prefix: String,
        /// Put before the title and passage inside Tevatron's string (`--passage_prefix`).
        passage_prefix: String,
    },
}

/// One micro-batch, tokenized: queries and passages (a reranker's pairs are its passages,
/// with no queries, and their token types when they are text pairs), and the teacher's scores
/// of the passages when distilling.
struct Tokenized {
    queries: Vec<Vec<u32>>,
    passages: Vec<Vec<u32>>,
    passage_types: Option<Vec<Vec<u32>>>,
    teacher: Option<Vec<f32>>,
}

/// Builds micro-batches: query order of the epoch, this rank's slice of the global batch,
/// Tevatron's groups, tokenization.
struct BatchMaker<'a> {
    data: &'a TrainData,
    batch_size: usize,
    seed: u64,
    rank: usize,
    world_size: usize,
    query: PreparedTokenizer,
    passage: PreparedTokenizer,
    objective: &'a Objective,
    teacher: bool,
}

impl BatchMaker<'_> {
    fn make(&self, order: &[usize], epoch: usize, batch: usize) -> Result<Tokenized> {
        let items = rank_slice(order, batch, self.batch_size, self.rank, self.world_size);
        let mut queries = Vec::with_capacity(items.len());
        let mut passages = Vec::with_capacity(items.len() * self.data.group_size());
        let mut groups = Vec::with_capacity(items.len());
        let mut teacher = Vec::new();
        for &item in items {
            let g = self.data.group(item, epoch)?;
            if self.teacher {
                for p in &g.passages {
                    let Some(score) = p.score else {
                        let (path, line) = self.data.location(item);
                        return Err(Error::Invalid(format!(
                            "{}:{line}: a passage has no teacher `score`, which distillation needs",
                            path.display()
                        )));
                    };
                    teacher.push(score as f32);
                }
            }
            match self.objective {
                Objective::Retriever => {
                    passages.extend(g.joined());
                    queries.push(g.query);
                }
                Objective::Reranker { .. } => groups.push(g),
            }
        }
        let (queries, (passages, passage_types)) = match self.objective {
            Objective::Retriever => {
                (self.query.tokenize(&queries)?, (self.passage.tokenize(&passages)?, None))
            }
            Objective::Reranker { format, query_prefix, passage_prefix } => {
                let pairs = groups.iter().flat_map(|g| {
                    g.passages.iter().map(|p| {
                        (g.query.as_str(), p.title.as_deref().unwrap_or(""), p.text.as_str())
                    })
                });
                let prefixes = (query_prefix.as_str(), passage_prefix.as_str());
                (Vec::new(), self.passage.tokenize_cross(*format, prefixes, pairs)?)
            }
        };
        Ok(Tokenized { queries, passages, passage_types, teacher: self.teacher.then_some(teacher) })
    }

    /// The epoch's shuffled order, padded with its first queries to a multiple of the world
    /// size.
    fn order(&self, epoch: usize) -> Vec<usize> {
        pad_order(epoch_order(self.data.len(), self.seed, epoch), self.world_size)
    }
}

/// Pads an epoch's order with its own first items to a multiple of `world_size`
/// (DistributedSampler's padding), so that every rank gets as many queries.
fn pad_order(mut order: Vec<usize>, world_size: usize) -> Vec<usize> {
    let padded = order.len().div_ceil(world_size) * world_size;
    let extra: Vec<usize> = order.iter().cycle().take(padded - order.len()).copied().collect();
    order.extend(extra);
    order
}

/// Rank `rank`'s queries of global batch `batch`: one contiguous slice per rank, `batch_size`
/// each in a full batch; the last, shorter batch of a padded order is split evenly.
fn rank_slice(
    order: &[usize],
    batch: usize,
    batch_size: usize,
    rank: usize,
    world_size: usize,
) -> &[usize] {
    let global = batch_size * world_size;
    let all = &order[batch * global..((batch + 1) * global).min(order.len())];
    let per = all.len() / world_size;
    &all[rank * per..(rank + 1) * per]
}

/// Prepares the output folder: resume from its latest checkpoint, or refuse a non-empty
/// folder without checkpoints unless `overwrite` (as Hugging Face refuses it). As Tevatron's
/// `driver.train`, the latest checkpoint is resumed with `overwrite` too (its recipes pass
/// `--overwrite_output_dir`, so a rerun after a crash goes on from where it stopped); nothing
/// is deleted but the temporary folders of a save that was stopped. Returns the checkpoint to
/// resume from.
pub fn prepare_output_dir(output_dir: &Path, overwrite: bool) -> Result<Option<PathBuf>> {
    let io = |source| Error::Io { path: output_dir.to_path_buf(), source };
    if !output_dir.exists() {
        std::fs::create_dir_all(output_dir).map_err(io)?;
        return Ok(None);
    }
    // A run killed while it wrote a checkpoint (or its final model) leaves that temporary
    // folder: nothing can be resumed from it, so it is removed (a first checkpoint's made a
    // rerun of the same command refuse the folder as not empty).
    for entry in std::fs::read_dir(output_dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let partial = name == ".final.tmp"
            || name.strip_prefix(".checkpoint-").and_then(|n| n.strip_suffix(".tmp")).is_some();
        if partial && path.is_dir() {
            tracing::info!("removing {}, left by a run stopped while it saved", path.display());
            std::fs::remove_dir_all(&path).map_err(io)?;
        }
    }
    if let Some((step, dir)) = checkpoint::list(output_dir).last() {
        let flag =
            if overwrite { ", as Tevatron does with --overwrite_output_dir too" } else { "" };
        tracing::info!(
            "resuming from {} (step {step}){flag}; to start afresh, remove its checkpoint-* \
             folders or give another --output_dir",
            dir.display()
        );
        return Ok(Some(dir.clone()));
    }
    let non_empty = std::fs::read_dir(output_dir).map_err(io)?.next().is_some();
    if non_empty && !overwrite {
        return Err(Error::Invalid(format!(
            "output directory {} already exists and is not empty (and holds no checkpoint-* to resume from); use --overwrite_output_dir to overcome",
            output_dir.display()
        )));
    }
    Ok(None)
}

fn check_finite(value: f64, what: &str, step: usize, epoch: f64, output_dir: &Path) -> Result<()> {
    if value.is_finite() {
        return Ok(());
    }
    let last_checkpoint = match checkpoint::list(output_dir).last() {
        Some((_, dir)) => format!("The last good checkpoint, {}, is intact.", dir.display()),
        None => "No checkpoint had been saved yet.".to_string(),
    };
    Err(Error::Diverged { what: format!("{what} is {value}"), step, epoch, last_checkpoint })
}

/// Trains `encoder` (loaded trainable) on `data` as one rank of `group`, resuming from
/// `resume` when given, and writes checkpoints and the final model (rank 0). `on_step` sees
/// every optimizer step.
pub fn train(
    encoder: &Encoder,
    data: &TrainData,
    cfg: &TrainConfig,
    group: &Group,
    resume: Option<&Path>,
    on_step: &mut dyn FnMut(&Progress),
) -> Result<TrainerState> {
    let vars = encoder
        .varmap()
        .ok_or_else(|| Error::Invalid("the encoder was not loaded trainable".into()))?;
    let named: Vec<(String, candle_core::Var)> = vars
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut opt = AdamW::new(named, cfg.adam)?;
    let plan = Plan::new(data.len(), group.world_size(), cfg)?;
    let mut warmup = warmup_steps(plan.total_steps, cfg.warmup_steps, cfg.warmup_ratio);
    if cfg.schedule == ScheduleKind::Constant && warmup > 0 {
        // Hugging Face's `constant` does not warm up; `constant_with_warmup` does. (A note,
        // not a warning: `train`'s default --warmup_ratio 0.1 is in force whenever none is
        // given.)
        tracing::info!(
            "--warmup_steps/--warmup_ratio change nothing under --lr_scheduler_type constant \
             (constant_with_warmup warms up)"
        );
        warmup = 0;
    }
    let schedule =
        LrSchedule { kind: cfg.schedule, base: cfg.learning_rate, warmup, total: plan.total_steps };
    let mut state = match resume {
        Some(dir) => {
            let s = checkpoint::load(
                dir,
                encoder.weights_file(),
                encoder.config().weight_prefixes(),
                &mut opt,
            )?;
            if s.tevatron.seed != cfg.seed {
                return Err(Error::Invalid(format!(
                    "{} was trained with --seed {}, not {}; resume with the same seed, or start afresh in another --output_dir (or after removing its checkpoint-* folders)",
                    dir.display(),
                    s.tevatron.seed,
                    cfg.seed
                )));
            }
            match s.tevatron.world_size {
                Some(saved) if saved != group.world_size() && group.is_main() => tracing::warn!(
                    "{} was trained on {saved} rank(s), and this run has {}: the global batch \
                     and the place in the data differ from a run that never stopped",
                    dir.display(),
                    group.world_size()
                ),
                _ => {}
            }
            s
        }
        None => TrainerState {
            is_local_process_zero: group.is_main(),
            is_world_process_zero: group.is_main(),
            tevatron: ResumeState { seed: cfg.seed, ..ResumeState::default() },
            ..TrainerState::default()
        },
    };
    state.tevatron.world_size = Some(group.world_size());
    if resume.is_some() && state.global_step >= plan.total_steps {
        tracing::warn!(
            "the checkpoint resumed is at step {}, and this run has {} steps: nothing is left to \
             train, and the model is written as it is; to train afresh, give another --output_dir \
             (or remove its checkpoint-* folders)",
            state.global_step,
            plan.total_steps
        );
    }
    state.max_steps = plan.total_steps;
    state.logging_steps = cfg.logging_steps;
    state.save_steps = cfg.save_steps;
    state.train_batch_size = cfg.batch_size;
    state.num_train_epochs = plan.total_steps.div_ceil(plan.updates_per_epoch);
    tracing::info!(
        "{} queries, {} micro-batches of {} x {} rank(s) per epoch, {} optimizer steps (warmup {}), group size {}",
        data.len(),
        plan.batches_per_epoch,
        cfg.batch_size,
        group.world_size(),
        plan.total_steps,
        schedule.warmup,
        data.group_size()
    );

    let maker = BatchMaker {
        data,
        batch_size: cfg.batch_size,
        seed: cfg.seed,
        rank: group.rank(),
        world_size: group.world_size(),
        query: encoder.tokenizer().prepare(&cfg.query_text)?,
        passage: encoder.tokenizer().prepare(&cfg.passage_text)?,
        objective: &cfg.objective,
        teacher: cfg.step.distillation.is_some(),
    };
    let keys: Vec<(usize, usize)> = (state.global_step..plan.total_steps)
        .flat_map(|s| plan.micro_batches(s, cfg.grad_accum))
        .collect();
    let mut acc = Accumulator::new(opt.vars().into_iter().cloned().collect());
    let start = Instant::now();
    let first_step = state.global_step;

    std::thread::scope(|scope| -> Result<()> {
        // Workers tokenize ahead: worker w makes micro-batches w, w + W, ...; each sends in
        // order on its own bounded channel, and the loop reads the channels round-robin.
        let workers = cfg.num_workers;
        let mut receivers = Vec::new();
        for w in 0..workers {
            let (tx, rx) = mpsc::sync_channel::<Result<Tokenized>>(2);
            receivers.push(rx);
            let (maker, keys) = (&maker, &keys);
            scope.spawn(move || {
                let mut cached: Option<(usize, Vec<usize>)> = None;
                for &(epoch, batch) in keys.iter().skip(w).step_by(workers) {
                    if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                        cached = Some((epoch, maker.order(epoch)));
                    }
                    let order = &cached.as_ref().expect("set above").1;
                    if tx.send(maker.make(order, epoch, batch)).is_err() {
                        return;
                    }
                }
            });
        }
        let mut inline_order: Option<(usize, Vec<usize>)> = None;
        let mut next = 0usize;
        let mut fetch = |epoch: usize, batch: usize| -> Result<Tokenized> {
            let k = next;
            next += 1;
            if workers > 0 {
                return receivers[k % workers]
                    .recv()
                    .map_err(|_| Error::Invalid("a tokenization worker stopped".into()))?;
            }
            if inline_order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                inline_order = Some((epoch, maker.order(epoch)));
            }
            maker.make(&inline_order.as_ref().expect("set above").1, epoch, batch)
        };

        let fp16 = cfg.step.autocast == Some(candle_core::DType::F16);
        if fp16 && state.tevatron.loss_scale.is_none() {
            state.tevatron.loss_scale = Some(INIT_LOSS_SCALE);
        }
        while state.global_step < plan.total_steps {
            let watch = group.watch(|| {
                format!("rank {}: training step {}", group.rank(), state.global_step + 1)
            });
            let loss_scale =
                if fp16 { state.tevatron.loss_scale.unwrap_or(INIT_LOSS_SCALE) } else { 1.0 };
            let step = state.global_step;
            let micro = plan.micro_batches(step, cfg.grad_accum);
            let window = micro.len();
            let mut loss_sum = 0.0;
            let (epoch, last_batch) = *micro.last().expect("a step has micro-batches");
            let epoch_f = epoch as f64 + (last_batch + 1) as f64 / plan.batches_per_epoch as f64;
            for (k, &(e, b)) in micro.iter().enumerate() {
                let batch = fetch(e, b)?;
                // Each rank draws its own dropout masks; rank 0 those of a one-process run.
                let mut seed = mix(cfg.seed, &[step as u64, k as u64]);
                if group.rank() > 0 {
                    seed = mix(seed, &[group.rank() as u64]);
                }
                let inputs = match cfg.objective {
                    Objective::Retriever => Inputs::Retriever {
                        queries: &batch.queries,
                        passages: &batch.passages,
                        teacher: batch.teacher.as_deref(),
                    },
                    Objective::Reranker { .. } => Inputs::Reranker {
                        pairs: &batch.passages,
                        types: batch.passage_types.as_deref(),
                        group: data.group_size(),
                    },
                };
                let out = step::step(
                    encoder,
                    &inputs,
                    &cfg.step,
                    loss_scale / window as f64,
                    seed,
                    group,
                    &mut acc,
                )?;
                if !fp16 {
                    check_finite(out.loss, "the loss", step + 1, epoch_f, &cfg.output_dir)?;
                }
                loss_sum += out.loss;
            }
            let grads = group.all_reduce_sum(acc.take()?)?;
            // The gradients carry the loss scale (1 but under fp16), a power of two, so the
            // norm and the update unscale them exactly by dividing it out; clipping's
            // coefficient joins it in the update (`step_scaled`), where PyTorch scales each
            // gradient in place first: the same numbers, without two passes over them.
            let grad_norm = grad_norm(&grads)? / loss_scale;
            let grad_scale = clip_coefficient(grad_norm, cfg.max_grad_norm) / loss_scale;
            profile::mark("reduce and clip", encoder.device())?;
            let lr = schedule.lr(step);
            if fp16 && !(grad_norm.is_finite() && loss_sum.is_finite()) {
                // As torch's GradScaler: skip the update, halve the scale.
                let scale = loss_scale * 0.5;
                tracing::warn!(
                    "fp16 overflow at step {}: update skipped, loss scale now {scale}",
                    step + 1
                );
                state.tevatron.loss_scale = Some(scale);
                state.tevatron.scale_growth_tracker = 0;
            } else {
                check_finite(grad_norm, "the gradient norm", step + 1, epoch_f, &cfg.output_dir)?;
                opt.step_scaled(&grads, lr, grad_scale)?;
                if fp16 {
                    state.tevatron.scale_growth_tracker += 1;
                    if state.tevatron.scale_growth_tracker == SCALE_GROWTH_INTERVAL {
                        state.tevatron.loss_scale = Some(loss_scale * 2.0);
                        state.tevatron.scale_growth_tracker = 0;
                    }
                }
            }
            drop(grads);
            profile::mark("optimizer", encoder.device())?;
            drop(watch);
            profile::report(step + 1);
            let loss = loss_sum / window as f64;
            state.global_step += 1;
            state.epoch = epoch_f;
            state.tevatron.loss_since_log += loss;
            state.tevatron.total_loss += loss;
            on_step(&Progress {
                step: state.global_step,
                total: plan.total_steps,
                loss,
                learning_rate: lr,
                epoch: epoch_f,
            });
            let log_due = cfg.logging_steps > 0 && state.global_step % cfg.logging_steps == 0;
            if log_due || (cfg.logging_first_step && state.global_step == 1) {
                let n = (state.global_step - state.tevatron.last_logged_step) as f64;
                let entry = json!({
                    "epoch": epoch_f,
                    "grad_norm": grad_norm,
                    "learning_rate": lr,
                    "loss": state.tevatron.loss_since_log / n,
                    "step": state.global_step,
                });
                tracing::info!("{entry}");
                state.log_history.push(entry);
                state.tevatron.loss_since_log = 0.0;
                state.tevatron.last_logged_step = state.global_step;
            }
            let at_end = cfg.save_at_end && state.global_step == plan.total_steps;
            let due = at_end || (cfg.save_steps > 0 && state.global_step % cfg.save_steps == 0);
            let validation = cfg.validation.as_deref().filter(|v| group.is_main() && v.every > 0);
            let mut new_best = false;
            if let Some(v) = validation.filter(|v| state.global_step % v.every == 0) {
                let metrics = v.evaluate(encoder, &cfg.output_dir)?;
                let mut entry = serde_json::Map::new();
                entry.insert("epoch".into(), json!(epoch_f));
                for (k, value) in &metrics {
                    entry.insert(k.clone(), json!(value));
                }
                entry.insert("step".into(), json!(state.global_step));
                let entry = Value::Object(entry);
                tracing::info!("{entry}");
                state.log_history.push(entry);
                let value = metrics[&format!("eval_{}", v.metric)];
                // Hugging Face's rule: the best metric follows every evaluation; the best
                // checkpoint is the one saved at the step of the best evaluation.
                if v.improves(value, state.best_metric) {
                    state.best_metric = Some(value);
                    new_best = true;
                }
            }
            // A new best the model is to end on is saved even off the save interval, so that
            // it has a checkpoint to be loaded from (Hugging Face loses such a best).
            let keep_best = new_best && validation.is_some_and(|v| v.load_best_model_at_end);
            if (due || keep_best) && group.is_main() {
                if new_best {
                    let dir = cfg.output_dir.join(format!("checkpoint-{}", state.global_step));
                    state.best_model_checkpoint = Some(dir.display().to_string());
                }
                let dir = checkpoint::save(
                    &cfg.output_dir,
                    encoder,
                    &opt,
                    &state,
                    &cfg.args,
                    cfg.save_total_limit,
                )?;
                tracing::info!("saved {}", dir.display());
            }
        }
        drop(receivers);
        Ok(())
    })?;

    let runtime = start.elapsed().as_secs_f64();
    let steps_run = (state.global_step - first_step).max(1) as f64;
    state.log_history.push(json!({
        "epoch": state.epoch,
        "step": state.global_step,
        "train_loss": state.tevatron.total_loss / state.global_step.max(1) as f64,
        "train_runtime": runtime,
        "train_steps_per_second": steps_run / runtime.max(1e-9),
        "train_samples_per_second": steps_run * (cfg.batch_size * cfg.grad_accum * group.world_size()) as f64 / runtime.max(1e-9),
        "total_flos": 0.0,
    }));
    if group.is_main() {
        let best = cfg.validation.as_deref().filter(|v| v.load_best_model_at_end);
        if let (Some(_), Some(dir)) = (best, &state.best_model_checkpoint) {
            // In this run's output folder, however the run that saved it spelled that folder;
            // else where it was recorded (a run resumed from another folder's checkpoint).
            let here = Path::new(dir).file_name().map(|name| cfg.output_dir.join(name));
            let dir = here.filter(|d| d.is_dir()).unwrap_or_else(|| PathBuf::from(dir));
            tracing::info!(
                "loading the best model, {} ({} {}), before writing the final one",
                dir.display(),
                cfg.validation.as_deref().map_or("", |v| v.metric.as_str()),
                state.best_metric.map_or("unknown".into(), |m| format!("{m:.4}"))
            );
            checkpoint::load_weights(
                &dir,
                encoder.weights_file(),
                encoder.config().weight_prefixes(),
                &opt,
            )?;
        }
        checkpoint::save_final(&cfg.output_dir, encoder)?;
        checkpoint::write_json(&cfg.output_dir.join("trainer_state.json"), &state)?;
        checkpoint::write_json(&cfg.output_dir.join("training_args.json"), &cfg.args)?;
    }
    // No rank reports success before the output is complete.
    group.barrier()?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_its_own_equal_slice_of_each_global_batch() {
        // 11 queries on 3 ranks: padded to 12 with the first, batches of 3 x 3 then 3 x 1.
        let order = pad_order((0..11).collect(), 3);
        assert_eq!(order, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]);
        let slices: Vec<Vec<&[usize]>> =
            (0..2).map(|b| (0..3).map(|r| rank_slice(&order, b, 3, r, 3)).collect()).collect();
        assert_eq!(slices[0], [&[0, 1, 2][..], &[3, 4, 5], &[6, 7, 8]]);
        assert_eq!(slices[1], [&[9][..], &[10], &[0]]);
        // One rank: the plain batches of a single process.
        let one = pad_order((0..5).collect(), 1);
        assert_eq!(rank_slice(&one, 1, 2, 0, 1), &[2, 3]);
        assert_eq!(rank_slice(&one, 2, 2, 0, 1), &[4]);
    }
}
