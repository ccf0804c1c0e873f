//! The gradient of one micro-batch ([`Inputs`]): a retriever's queries and passages (the
//! contrastive loss, or distillation from teacher scores) or a cross-encoder's pairs (the
//! listwise loss), forward, loss, backward, with gradients summed into an [`Accumulator`].
//!
//! Three ways to get the same numbers with different memory:
//! - plain: one graph over the whole batch (fastest, most activation memory);
//! - GradCache (`--grad_cache`): representations of every chunk are computed without a graph,
//!   the loss gives their gradients, then each chunk is re-run with a graph and back-propagates
//!   `sum(reps * cached_grad)`; memory is bounded by one chunk (Gao et al., 2021);
//! - gradient checkpointing (`--gradient_checkpointing`): each layer's input is kept, its graph
//!   is not; backward recomputes one layer at a time, so activation memory is one layer's.
//!
//! Dropout masks are drawn from a stream seeded by `(seed, kind, chunk, layer)` before every
//! layer (and before a cross-encoder's head, as layer `L + 1`), so a recomputation (GradCache's second pass, a checkpointed layer) replays exactly the
//! masks of the first pass, and a resumed run draws those of the run it continues.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use tevatron_model::backbone::{run_layers, Training};
use tevatron_model::collate::{collate, PaddingSide};
use tevatron_model::rng::mix;
use tevatron_model::{Encoder, Mode};

use crate::dist::Group;
use crate::loss::{contrastive, distillation, listwise};
use crate::profile;

/// How to compute a step.
#[derive(Clone, Copy, Debug)]
pub struct StepOptions {
    /// Logits are `scores / temperature`.
    pub temperature: f64,
    /// GradCache chunk sizes `(queries, passages)`, or `None` for a single pass.
    pub grad_cache: Option<(usize, usize)>,
    /// Recompute layers in backward instead of keeping their activations.
    pub checkpointing: bool,
    /// Pad to a multiple of this.
    pub pad_to_multiple_of: usize,
    /// Padding side.
    pub padding_side: PaddingSide,
    /// Mixed precision (`--bf16`, `--fp16`): the dtype matrix products run in, on F32 weights.
    pub autocast: Option<DType>,
    /// Distillation from teacher scores, for retriever batches that carry them.
    pub distillation: Option<Distillation>,
}

/// How a retriever learns from a teacher's scores (Tevatron's `train_distil`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Distillation {
    /// The student's scores are divided by this (`--distil_temperature`).
    pub student_temperature: f64,
    /// The teacher's scores are divided by this (Tevatron: the same as the student's).
    pub teacher_temperature: f64,
    /// Weight of the contrastive loss added to the KL term (0: pure distillation, Tevatron's).
    pub contrastive_weight: f64,
}

/// What one micro-batch holds, by what is trained.
#[derive(Clone, Copy, Debug)]
pub enum Inputs<'a> {
    /// A retriever's queries and their groups of passages (`queries[i]` with
    /// `passages[i*G..(i+1)*G]`, the positive first), with the teacher's scores of those
    /// passages (`G` per query) when distilling.
    Retriever {
        /// Query token ids.
        queries: &'a [Vec<u32>],
        /// Passage token ids, query-major.
        passages: &'a [Vec<u32>],
        /// The teacher's score of each passage.
        teacher: Option<&'a [f32]>,
    },
    /// A cross-encoder's pairs, `group` per query, the positive first.
    Reranker {
        /// Pair token ids, query-major.
        pairs: &'a [Vec<u32>],
        /// Pairs per query (`--train_group_size`).
        group: usize,
    },
}

/// Gradients summed over micro-batches, one slot per trainable variable.
pub struct Accumulator {
    vars: Vec<Var>,
    grads: Vec<Option<Tensor>>,
}

impl Accumulator {
    /// An empty accumulator for `vars` (in the optimizer's order).
    pub fn new(vars: Vec<Var>) -> Self {
        let grads = vec![None; vars.len()];
        Self { vars, grads }
    }

    /// Adds the gradients a backward pass left for our variables.
    pub fn add(&mut self, store: &GradStore) -> Result<()> {
        for (slot, var) in self.grads.iter_mut().zip(&self.vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }

    /// The summed gradients (zeros for variables that received none) and a reset.
    pub fn take(&mut self) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(self.vars.len());
        for (slot, var) in self.grads.iter_mut().zip(&self.vars) {
            out.push(match slot.take() {
                Some(g) => g,
                None => var.as_tensor().zeros_like()?,
            });
        }
        Ok(out)
    }
}

/// Queries, passages or a cross-encoder's pairs: a different dropout stream for each.
#[derive(Clone, Copy)]
enum Side {
    Query = 1,
    Passage = 2,
    Pair = 3,
}

impl Side {
    /// The profile's name of this side's forward.
    fn forward_mark(self) -> &'static str {
        match self {
            Side::Query => "forward q",
            Side::Passage => "forward p",
            Side::Pair => "forward pairs",
        }
    }
}

/// One chunk of queries or passages and its training context: mixed precision, and the
/// dropout stream reseeded from `(seed, side, chunk, layer)`.
struct Chunk<'a> {
    batch: &'a tevatron_model::Batch,
    seed: u64,
    side: Side,
    index: usize,
    training: Training,
}

impl<'a> Chunk<'a> {
    fn new(
        batch: &'a tevatron_model::Batch,
        seed: u64,
        side: Side,
        index: usize,
        opts: &StepOptions,
    ) -> Self {
        Self { batch, seed, side, index, training: Training::new(opts.autocast, seed) }
    }

    /// Restarts dropout for the embeddings (layer 0), transformer layer `layer - 1`, or the
    /// score head (`layer = L + 1`).
    fn seed_layer(&self, layer: usize) {
        let key = mix(self.seed, &[self.side as u64, self.index as u64, layer as u64]);
        self.training.reseed(key);
    }

    /// The training forward of this chunk.
    fn mode(&self) -> Mode<'_> {
        Mode::Train(&self.training)
    }
}

/// Runs the backbone in training mode, reseeding dropout before the embeddings and every
/// layer. With `detach`, no graph is kept; with `keep`, every layer's input is returned.
fn run(enc: &Encoder, chunk: &Chunk, detach: bool, keep: bool) -> Result<(Tensor, Vec<Tensor>)> {
    let reseed = &mut |layer| chunk.seed_layer(layer);
    run_layers(enc.backbone(), chunk.batch, chunk.mode(), reseed, detach, keep)
}

/// The representations (or a cross-encoder's scores) of a chunk's last hidden states, with
/// the head's dropout drawn from its own reseeded stream (after the last layer's), so that
/// every pass over the chunk draws the same mask.
fn represent(enc: &Encoder, chunk: &Chunk, hidden: &Tensor) -> Result<Tensor> {
    chunk.seed_layer(enc.backbone().num_layers() + 1);
    enc.represent(hidden, chunk.batch, chunk.mode())
}

/// Back-propagates `grad_reps` through a chunk one layer at a time from the kept layer
/// inputs (the last one being the input of the backbone's final step, such as a decoder's
/// closing norm), adding parameter gradients to `acc`.
fn backward_checkpointed(
    enc: &Encoder,
    chunk: &Chunk,
    inputs: &[Tensor],
    grad_reps: &Tensor,
    acc: &mut Accumulator,
) -> Result<()> {
    let bb = enc.backbone();
    let batch = chunk.batch;
    let top = Var::from_tensor(&inputs[bb.num_layers()])?;
    let reps = represent(enc, chunk, &bb.finish(top.as_tensor(), chunk.mode())?)?;
    let store = (reps * grad_reps)?.sum_all()?.backward()?;
    acc.add(&store)?;
    let mut grad = store
        .get(top.as_tensor())
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg("pooling passed no gradient".into()))?;
    let bias = bb.attention_bias(batch, top.dtype())?;
    for i in (0..bb.num_layers()).rev() {
        let input = Var::from_tensor(&inputs[i])?;
        chunk.seed_layer(i + 1);
        let out = bb.layer(i, input.as_tensor(), &bias, chunk.mode())?;
        let store = (out * &grad)?.sum_all()?.backward()?;
        acc.add(&store)?;
        grad = store
            .get(input.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("layer {i} passed no gradient")))?;
    }
    chunk.seed_layer(0);
    let x0 = bb.embed(batch, chunk.mode())?;
    let store = (x0 * grad)?.sum_all()?.backward()?;
    acc.add(&store)
}

/// Result of one micro-batch.
#[derive(Clone, Copy, Debug)]
pub struct StepOutput {
    /// The contrastive loss of the batch (unscaled).
    pub loss: f64,
}

/// What the first pass keeps of one chunk.
struct FirstPass {
    range: std::ops::Range<usize>,
    batch: tevatron_model::Batch,
    reps: Tensor,
    /// Layer inputs (and the final step's input), only when backward can start from them.
    kept: Option<Vec<Tensor>>,
}

fn chunks(n: usize, size: Option<usize>) -> Vec<std::ops::Range<usize>> {
    let size = size.unwrap_or(n).max(1);
    (0..n.div_ceil(size)).map(|c| c * size..((c + 1) * size).min(n)).collect()
}

/// One side of a micro-batch: its sequences, its dropout stream, its GradCache chunk size.
type SideInput<'a> = (&'a [Vec<u32>], Side, Option<usize>);

/// The loss of a micro-batch from its outputs, over every rank's (Tevatron's DDP forward): a
/// retriever scores its queries against all ranks' passages (contrastive) or its own groups
/// against the teacher (distillation); a reranker's groups give the listwise loss. The
/// gradient reaches only the local rows. Tevatron multiplies its loss by the world size and DDP
/// then averages gradients over ranks; summing the ranks' gradients of the unscaled loss (the
/// trainer's all-reduce) is the same gradient, that of the loss of the whole global batch.
fn objective(
    inputs: &Inputs,
    outputs: &[Tensor],
    opts: &StepOptions,
    group: &Group,
) -> Result<Tensor> {
    let gather =
        |t: &Tensor| group.gather_rows(t).map_err(|e| candle_core::Error::Msg(e.to_string()));
    match *inputs {
        Inputs::Reranker { group: g, .. } => listwise(&gather(&outputs[0])?, g),
        Inputs::Retriever { teacher, queries, passages } => {
            let (q, p) = (gather(&outputs[0])?, gather(&outputs[1])?);
            let (Some(scores), Some(d)) = (teacher, opts.distillation) else {
                return contrastive(&q, &p, opts.temperature);
            };
            let g = passages.len() / queries.len().max(1);
            let device = outputs[0].device();
            let teacher = gather(&Tensor::from_slice(scores, (queries.len(), g), device)?)?;
            let kl = distillation(&q, &p, &teacher, d.student_temperature, d.teacher_temperature)?;
            if d.contrastive_weight > 0.0 {
                kl + (contrastive(&q, &p, opts.temperature)? * d.contrastive_weight)?
            } else {
                Ok(kl)
            }
        }
    }
}

/// Computes the loss of one retriever micro-batch (`queries[i]` with passages
/// `passages[i*G..(i+1)*G]`) and adds `scale * d(loss)` to `acc`: [`step`] without a teacher.
#[allow(clippy::too_many_arguments)]
pub fn micro_step(
    enc: &Encoder,
    queries: &[Vec<u32>],
    passages: &[Vec<u32>],
    opts: &StepOptions,
    scale: f64,
    seed: u64,
    group: &Group,
    acc: &mut Accumulator,
) -> Result<StepOutput> {
    let inputs = Inputs::Retriever { queries, passages, teacher: None };
    step(enc, &inputs, opts, scale, seed, group, acc)
}

/// Computes the loss of one micro-batch and adds `scale * d(loss)` to `acc`. `seed` fixes the
/// dropout masks. With several ranks in `group`, the batch is this rank's slice, the loss is
/// that of the global batch, and `acc` receives this rank's share of its gradient (to be summed
/// over ranks): Tevatron multiplies its loss by the world size and DDP averages gradients over
/// ranks, which is the same gradient, so the trainer's all-reduce sums without dividing.
pub fn step(
    enc: &Encoder,
    inputs: &Inputs,
    opts: &StepOptions,
    scale: f64,
    seed: u64,
    group: &Group,
    acc: &mut Accumulator,
) -> Result<StepOutput> {
    let device = enc.device().clone();
    let pad = enc.tokenizer().pad_id();
    let make = |seqs: &[Vec<u32>]| {
        let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        collate(&rows, pad, opts.pad_to_multiple_of, opts.padding_side, &device)
    };
    let (qc, pc) = match opts.grad_cache {
        Some((q, p)) => (Some(q), Some(p)),
        None => (None, None),
    };
    // Each side's sequences, its dropout stream and its GradCache chunk size.
    let sides: Vec<SideInput> = match *inputs {
        Inputs::Retriever { queries, passages, .. } => {
            vec![(queries, Side::Query, qc), (passages, Side::Passage, pc)]
        }
        Inputs::Reranker { pairs, .. } => vec![(pairs, Side::Pair, pc)],
    };
    if opts.grad_cache.is_none() && !opts.checkpointing {
        let batches = sides.iter().map(|(seqs, _, _)| make(seqs)).collect::<Result<Vec<_>>>()?;
        profile::mark("fetch and collate", &device)?;
        let mut outputs = Vec::with_capacity(sides.len());
        for ((_, side, _), batch) in sides.iter().zip(&batches) {
            let chunk = Chunk::new(batch, seed, *side, 0, opts);
            let (h, _) = run(enc, &chunk, false, false)?;
            outputs.push(represent(enc, &chunk, &h)?);
            profile::mark(side.forward_mark(), &device)?;
        }
        let loss = objective(inputs, &outputs, opts, group)?;
        profile::mark("loss", &device)?;
        acc.add(&(&loss * scale)?.backward()?)?;
        profile::mark("backward", &device)?;
        // Read after backward is issued: reading waits for the device, which would otherwise
        // idle while the host issues backward.
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        return Ok(StepOutput { loss: value });
    }

    // First pass: outputs without a graph, chunk by chunk. With checkpointing but no GradCache
    // the single chunk keeps its last hidden states and layer inputs, so backward need not run
    // the forward again; otherwise nothing but the outputs is kept.
    let keep = opts.grad_cache.is_none() && opts.checkpointing;
    let mut passes = Vec::new();
    for &(seqs, side, size) in &sides {
        let mut parts = Vec::new();
        for (c, range) in chunks(seqs.len(), size).into_iter().enumerate() {
            let batch = make(&seqs[range.clone()])?;
            let chunk = Chunk::new(&batch, seed, side, c, opts);
            let (h, inputs) = run(enc, &chunk, true, keep)?;
            let reps = represent(enc, &chunk, &h)?.detach();
            parts.push(FirstPass { range, batch, reps, kept: keep.then_some(inputs) });
        }
        passes.push((side, parts));
    }
    let all = passes
        .iter()
        .map(|(_, parts)| {
            Var::from_tensor(&Tensor::cat(
                &parts.iter().map(|p| p.reps.clone()).collect::<Vec<_>>(),
                0,
            )?)
        })
        .collect::<Result<Vec<Var>>>()?;
    let outputs: Vec<Tensor> = all.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = objective(inputs, &outputs, opts, group)?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let store = (loss * scale)?.backward()?;
    let cached: Vec<Option<Tensor>> =
        all.iter().map(|v| store.get(v.as_tensor()).cloned()).collect();
    profile::mark("first pass and loss", &device)?;

    // Second pass: each chunk back-propagates its slice of the cached output gradient.
    for ((side, parts), cached) in passes.into_iter().zip(cached) {
        let cached =
            cached.ok_or_else(|| candle_core::Error::Msg("the loss passed no gradient".into()))?;
        for (c, part) in parts.into_iter().enumerate() {
            let grad = cached.narrow(0, part.range.start, part.range.len())?;
            let chunk = Chunk::new(&part.batch, seed, side, c, opts);
            if opts.checkpointing {
                let inputs = match part.kept {
                    Some(inputs) => inputs,
                    None => run(enc, &chunk, true, true)?.1,
                };
                backward_checkpointed(enc, &chunk, &inputs, &grad, acc)?;
            } else {
                let (h, _) = run(enc, &chunk, false, false)?;
                let reps = represent(enc, &chunk, &h)?;
                acc.add(&(reps * grad)?.sum_all()?.backward()?)?;
            }
        }
    }
    profile::mark("second pass and backward", &device)?;
    Ok(StepOutput { loss: value })
}
