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
//! On the CPU each side's sequences are first split by length (`split`, after
//! [`tevatron_model::collate::length_buckets`]), so that each part
//! pads only to its own longest sequence: the same representations for fewer padded tokens;
//! unless the backbone computes only the real tokens of a padded batch
//! ([`tevatron_model::backbone::Backbone::skips_padding`]), which runs each side as one batch.
//!
//! Dropout masks are drawn from a stream seeded by `(seed, kind, chunk, layer)` before every
//! layer (and before a cross-encoder's head, as layer `L + 1`), so a recomputation (GradCache's second pass, a checkpointed layer) replays exactly the
//! masks of the first pass, and a resumed run draws those of the run it continues.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use tevatron_model::backbone::{run_layers, Training};
use tevatron_model::collate::{collate_typed, length_buckets, PaddingSide};
use tevatron_model::rng::mix;
use tevatron_model::{Encoder, Mode};

use crate::dist::Group;
use crate::loss::{contrastive, distillation, kl_divergence, listwise};
use crate::profile;

/// How to compute a step.
#[derive(Clone, Debug)]
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
    /// On a GPU, attention as the fused kernels (`--attn_implementation flash_attention_2`;
    /// `Training::with_gpu_fused_attention`); the CPU always fuses attention.
    pub gpu_fused_attention: bool,
    /// Distillation from teacher scores, for retriever batches that carry them.
    pub distillation: Option<Distillation>,
    /// A retriever's loss taken on prefixes of its representations (Matryoshka).
    pub matryoshka: Option<Matryoshka>,
}

/// Matryoshka representation learning (sentence-transformers' `MatryoshkaLoss`): the
/// retriever's loss (contrastive, or distillation) is computed on the first `dims[i]`
/// dimensions of the query and passage representations, times `weights[i]`, and summed, so
/// that a prefix of the representation is a representation of its own.
#[derive(Clone, Debug, PartialEq)]
pub struct Matryoshka {
    /// Prefix widths, each at most the representation's width.
    pub dims: Vec<usize>,
    /// The weight of each width's loss (as many as `dims`).
    pub weights: Vec<f64>,
    /// Re-normalise each prefix to unit length (the model normalises its representations, so
    /// a truncated one is re-normalised at search time too).
    pub normalize: bool,
    /// Self-distillation of the narrower widths from the full one, if any.
    pub kl: Option<PrefixKl>,
}

/// Each width narrower than the representation also learns the full width's ranking of the
/// batch: `weight x KL(softmax(S / temperature) || softmax(S_k / temperature))`, averaged over
/// the queries, where `S` and `S_k` are the scores of every query against every passage of
/// the batch at full width (detached: the teacher) and at width `k` (re-normalised as the
/// Matryoshka loss is). The contrastive loss tells a prefix only which passage is the
/// positive; the full width's distribution tells it how the others rank too (the
/// self-distillation of 2D Matryoshka sentence embeddings, Li et al., 2024, here across
/// widths).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefixKl {
    /// The weight of each narrower width's KL term.
    pub weight: f64,
    /// The temperature both distributions are taken at.
    pub temperature: f64,
}

impl Matryoshka {
    /// The loss `loss(q, p)` summed over the prefixes, weighted.
    fn sum(
        &self,
        q: &Tensor,
        p: &Tensor,
        loss: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let width = q.dim(1)?;
        let prefix = |t: &Tensor, dim: usize| -> Result<Tensor> {
            let t = t.narrow(1, 0, dim)?;
            if self.normalize {
                tevatron_model::pooling::l2_normalize(&t)
            } else {
                Ok(t)
            }
        };
        // The self-distillation with the full width's in-batch scores, the teacher of the
        // narrower widths (none if no width is narrower).
        let distil = match self.kl {
            Some(kl) if !(kl.temperature > 0.0 && kl.temperature.is_finite()) => {
                candle_core::bail!("a Matryoshka KL temperature of {}", kl.temperature)
            }
            Some(kl) if self.dims.iter().any(|&d| d < width) => {
                Some((kl, prefix(q, width)?.matmul(&prefix(p, width)?.t()?)?.detach()))
            }
            _ => None,
        };
        let mut total: Option<Tensor> = None;
        for (&dim, &weight) in self.dims.iter().zip(&self.weights) {
            if dim == 0 || dim > width {
                candle_core::bail!("a Matryoshka width of {dim} for representations of {width}");
            }
            let (qk, pk) = (prefix(q, dim)?, prefix(p, dim)?);
            let mut l = (loss(&qk, &pk)? * weight)?;
            if let Some((kl, teacher)) = distil.as_ref().filter(|_| dim < width) {
                let student = qk.matmul(&pk.t()?)?;
                let t = kl.temperature;
                l = (l + (kl_divergence(&student, teacher, t, t)? * kl.weight)?)?;
            }
            total = Some(match total {
                None => l,
                Some(t) => (t + l)?,
            });
        }
        total.ok_or_else(|| candle_core::Error::Msg("no Matryoshka width".into()))
    }
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
        /// Each pair's token types, when the pairs are text pairs (sentence-transformers'
        /// form); none for Tevatron's one string.
        types: Option<&'a [Vec<u32>]>,
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
        Self { batch, seed, side, index, training: training(opts, seed) }
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

/// The training context of a step's chunk: its mixed precision and attention kernels, the
/// dropout stream at `seed`.
fn training(opts: &StepOptions, seed: u64) -> Training {
    Training::new(opts.autocast, seed).with_gpu_fused_attention(opts.gpu_fused_attention)
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
    batch: tevatron_model::Batch,
    reps: Tensor,
    /// Layer inputs (and the final step's input), only when backward can start from them.
    kept: Option<Vec<Tensor>>,
}

/// What one more forward costs beyond its tokens, in tokens' worth of work, when a side's
/// sequences are split by length on the CPU. There a token of one layer costs far more than
/// dispatching that layer's ops, so the split is decided by padding alone, short of batches of
/// a sequence or two; any cost from a few tokens to a hundred splits the same way.
pub const BUCKET_COST_TOKENS: usize = 32;

/// How a side's sequences are split for the forward, as indices into them. On the CPU, where
/// the work is proportional to the tokens computed, padding included, the sequences are sorted
/// by length and each chunk pads only to its own longest: with GradCache (`size`), chunks of
/// `size` in that order; without it, the split of [`length_buckets`] (for InsuranceQA's questions
/// and answers, about a fifth of the tokens fewer than one batch padded to its longest). Where
/// the backbone computes only the real tokens of a padded batch (`packs`: BERT and DistilBERT
/// training on the CPU), and on a GPU, where a batch's padding costs less than the launches
/// of another forward, the input order: one chunk, or chunks of `size`; so a packed CPU step
/// and a GPU step draw the same dropout masks. The representations are the same either way;
/// the dropout masks are drawn per chunk.
fn split(
    seqs: &[Vec<u32>],
    size: Option<usize>,
    opts: &StepOptions,
    (device, packs): (&candle_core::Device, bool),
) -> Vec<Vec<usize>> {
    let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    let chunks = match size {
        None if device.is_cpu() && !packs => {
            length_buckets(&lens, opts.pad_to_multiple_of, BUCKET_COST_TOKENS)
        }
        _ => {
            if device.is_cpu() && !packs {
                order.sort_by_key(|&i| (lens[i], i));
            }
            let size = size.unwrap_or(seqs.len()).max(1);
            order.chunks(size).map(<[usize]>::to_vec).collect()
        }
    };
    // An empty side still makes one (empty) batch, as it did before the split.
    if chunks.is_empty() {
        vec![Vec::new()]
    } else {
        chunks
    }
}

/// The chunks' outputs, concatenated in chunk order, put back in the order of the input
/// sequences (differentiably: the gradient flows back to each chunk's rows).
fn in_input_order(cat: &Tensor, split: &[Vec<usize>]) -> Result<Tensor> {
    let order: Vec<usize> = split.concat();
    if order.iter().enumerate().all(|(k, &i)| k == i) {
        return Ok(cat.clone());
    }
    let mut inverse = vec![0u32; order.len()];
    for (k, &i) in order.iter().enumerate() {
        inverse[i] = k as u32;
    }
    let inverse = Tensor::from_vec(inverse, order.len(), cat.device())?;
    cat.contiguous()?.index_select(&inverse, 0)
}

/// One side of a micro-batch: its sequences (with their token types, for text pairs), its
/// dropout stream, its GradCache chunk size.
type SideInput<'a> = (Sequences<'a>, Side, Option<usize>);

/// A side's token ids and, for text pairs, their token types.
type Sequences<'a> = (&'a [Vec<u32>], Option<&'a [Vec<u32>]>);

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
            let teacher = match (teacher, opts.distillation) {
                (Some(scores), Some(d)) => {
                    let g = passages.len() / queries.len().max(1);
                    let t = Tensor::from_slice(scores, (queries.len(), g), outputs[0].device())?;
                    Some((gather(&t)?, d))
                }
                _ => None,
            };
            let loss = |q: &Tensor, p: &Tensor| {
                let Some((teacher, d)) = &teacher else {
                    return contrastive(q, p, opts.temperature);
                };
                let kl = distillation(q, p, teacher, d.student_temperature, d.teacher_temperature)?;
                if d.contrastive_weight > 0.0 {
                    kl + (contrastive(q, p, opts.temperature)? * d.contrastive_weight)?
                } else {
                    Ok(kl)
                }
            };
            match &opts.matryoshka {
                None => loss(&q, &p),
                Some(m) => m.sum(&q, &p, loss),
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
    let make = |(seqs, types): Sequences, which: &[usize]| {
        let rows: Vec<&[u32]> = which.iter().map(|&i| seqs[i].as_slice()).collect();
        let types: Option<Vec<&[u32]>> =
            types.map(|t| which.iter().map(|&i| t[i].as_slice()).collect());
        collate_typed(
            &rows,
            types.as_deref(),
            pad,
            opts.pad_to_multiple_of,
            opts.padding_side,
            &device,
        )
    };
    let (qc, pc) = match opts.grad_cache {
        Some((q, p)) => (Some(q), Some(p)),
        None => (None, None),
    };
    // Each side's sequences, its dropout stream and its GradCache chunk size.
    let sides: Vec<SideInput> = match *inputs {
        Inputs::Retriever { queries, passages, .. } => {
            vec![((queries, None), Side::Query, qc), ((passages, None), Side::Passage, pc)]
        }
        Inputs::Reranker { pairs, types, .. } => vec![((pairs, types), Side::Pair, pc)],
    };
    for &((seqs, _), _, _) in &sides {
        enc.check_token_ids(seqs).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    }
    // Whether the backbone runs a padded batch on its real tokens only (see `split`).
    let packs = device.is_cpu() && enc.backbone().skips_padding(Mode::Train(&training(opts, 0)));
    if opts.grad_cache.is_none() && !opts.checkpointing {
        let mut collated = Vec::with_capacity(sides.len());
        for &(seqs, _, size) in &sides {
            let split = split(seqs.0, size, opts, (&device, packs));
            let batches = split.iter().map(|w| make(seqs, w)).collect::<Result<Vec<_>>>()?;
            collated.push((split, batches));
        }
        profile::mark("fetch and collate", &device)?;
        let mut outputs = Vec::with_capacity(sides.len());
        for ((_, side, _), (split, batches)) in sides.iter().zip(&collated) {
            let mut reps = Vec::with_capacity(batches.len());
            for (c, batch) in batches.iter().enumerate() {
                let chunk = Chunk::new(batch, seed, *side, c, opts);
                let (h, _) = run(enc, &chunk, false, false)?;
                reps.push(represent(enc, &chunk, &h)?);
            }
            outputs.push(in_input_order(&Tensor::cat(&reps, 0)?, split)?);
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
    // each part (a length bucket on the CPU, unless the backbone packs) keeps its layer inputs,
    // so backward need not run
    // the forward again; otherwise nothing but the outputs is kept.
    let keep = opts.grad_cache.is_none() && opts.checkpointing;
    let mut passes = Vec::new();
    for &(seqs, side, size) in &sides {
        let split = split(seqs.0, size, opts, (&device, packs));
        let mut parts = Vec::new();
        for (c, which) in split.iter().enumerate() {
            let batch = make(seqs, which)?;
            let chunk = Chunk::new(&batch, seed, side, c, opts);
            let (h, inputs) = run(enc, &chunk, true, keep)?;
            let reps = represent(enc, &chunk, &h)?.detach();
            parts.push(FirstPass { batch, reps, kept: keep.then_some(inputs) });
        }
        passes.push((side, split, parts));
    }
    // Each side's outputs in chunk order (what the second pass slices its gradient from), and
    // in the input order (what the loss takes).
    let all = passes
        .iter()
        .map(|(_, _, parts)| {
            Var::from_tensor(&Tensor::cat(
                &parts.iter().map(|p| p.reps.clone()).collect::<Vec<_>>(),
                0,
            )?)
        })
        .collect::<Result<Vec<Var>>>()?;
    let outputs = all
        .iter()
        .zip(&passes)
        .map(|(v, (_, split, _))| in_input_order(v.as_tensor(), split))
        .collect::<Result<Vec<Tensor>>>()?;
    let loss = objective(inputs, &outputs, opts, group)?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let store = (loss * scale)?.backward()?;
    let cached: Vec<Option<Tensor>> =
        all.iter().map(|v| store.get(v.as_tensor()).cloned()).collect();
    profile::mark("first pass and loss", &device)?;

    // Second pass: each chunk back-propagates its slice of the cached output gradient.
    for ((side, split, parts), cached) in passes.into_iter().zip(cached) {
        let cached =
            cached.ok_or_else(|| candle_core::Error::Msg("the loss passed no gradient".into()))?;
        let mut start = 0;
        for (c, (part, which)) in parts.into_iter().zip(&split).enumerate() {
            let grad = cached.narrow(0, start, which.len())?;
            start += which.len();
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn plain_options() -> StepOptions {
        StepOptions {
            temperature: 1.0,
            grad_cache: None,
            checkpointing: false,
            pad_to_multiple_of: 1,
            padding_side: PaddingSide::Right,
            autocast: None,
            gpu_fused_attention: false,
            distillation: None,
            matryoshka: None,
        }
    }

    /// On the CPU a side of short and long sequences is split by length (out of input order),
    /// GradCache's chunks are cut from the length-sorted order, and the outputs of the chunks
    /// come back in input order: row i is input i's, a cycle of three included (which a
    /// reversed permutation would get wrong).
    #[test]
    fn sides_are_split_by_length_on_the_cpu_and_put_back_in_input_order() {
        let seqs: Vec<Vec<u32>> = [120, 3, 118, 4, 2, 119].iter().map(|&n| vec![7; n]).collect();
        let o = plain_options();
        let cpu = (&Device::Cpu, false);
        let buckets = split(&seqs, None, &o, cpu);
        assert_eq!(buckets, [vec![4, 1, 3], vec![2, 5, 0]]);
        assert_eq!(split(&seqs, Some(4), &o, cpu), [vec![4, 1, 3, 2], vec![5, 0]]);
        // A backbone that computes only real tokens keeps the input order, as a GPU does.
        assert_eq!(split(&seqs, None, &o, (&Device::Cpu, true)), [vec![0, 1, 2, 3, 4, 5]]);
        let packed = split(&seqs, Some(4), &o, (&Device::Cpu, true));
        assert_eq!(packed, [vec![0, 1, 2, 3], vec![4, 5]]);
        let cycle = [vec![2], vec![0, 1]];
        let rows: Vec<f32> = [2.0, 0.0, 1.0].to_vec();
        let cat = Tensor::from_vec(rows, 3, &Device::Cpu).unwrap();
        let back = in_input_order(&cat, &cycle).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(back, [0.0, 1.0, 2.0]);
        let outputs: Vec<f32> = buckets.concat().iter().map(|&i| i as f32).collect();
        let cat = Tensor::from_vec(outputs, seqs.len(), &Device::Cpu).unwrap();
        let back = in_input_order(&cat, &buckets).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(back, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    /// The Matryoshka loss written out in f64 without candle: for each width, the prefixes
    /// (re-normalised or not), InfoNCE against each query's positive at `i * G`, weighted;
    /// with `m.kl`, each narrower width's KL from the full width's distribution, whose
    /// queries are `fixed` (the teacher is detached: a finite difference moves `q` alone).
    fn reference(
        q: &[Vec<f64>],
        fixed: &[Vec<f64>],
        p: &[Vec<f64>],
        m: &Matryoshka,
        temperature: f64,
    ) -> f64 {
        let g = p.len() / q.len();
        let cut = |v: &Vec<f64>, d: usize| {
            let v = &v[..d];
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.iter().map(|x| if m.normalize { x / norm } else { *x }).collect::<Vec<_>>()
        };
        // Each query's scores against every passage at width d, divided by t.
        let scores = |qi: &Vec<f64>, d: usize, t: f64| -> Vec<f64> {
            let qi = cut(qi, d);
            p.iter()
                .map(|pj| cut(pj, d).iter().zip(&qi).map(|(a, b)| a * b).sum::<f64>() / t)
                .collect()
        };
        let log_softmax = |l: Vec<f64>| -> Vec<f64> {
            let max = l.iter().cloned().fold(f64::MIN, f64::max);
            let lse = max + l.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            l.iter().map(|x| x - lse).collect()
        };
        let width = q[0].len();
        let mut total = 0.0;
        for (&d, &w) in m.dims.iter().zip(&m.weights) {
            let mut loss = 0.0;
            for (i, qi) in q.iter().enumerate() {
                loss -= w * log_softmax(scores(qi, d, temperature))[i * g];
                if let (Some(kl), true) = (&m.kl, d < width) {
                    let teacher = log_softmax(scores(&fixed[i], width, kl.temperature));
                    let student = log_softmax(scores(qi, d, kl.temperature));
                    let divergence: f64 =
                        teacher.iter().zip(&student).map(|(t, s)| t.exp() * (t - s)).sum();
                    loss += kl.weight * divergence;
                }
            }
            total += loss / q.len() as f64;
        }
        total
    }

    /// The loss equals the written-out formula, and its gradient a central finite difference,
    /// with and without re-normalisation and the self-distillation terms, at widths that
    /// include the full one; the difference holds the teacher fixed, as its detachment does.
    #[test]
    fn matryoshka_loss_and_gradient_match_the_formula() {
        let (b, g, width, t) = (3, 2, 6, 0.5);
        let value = |i: usize| ((i * 7919 % 113) as f64 - 56.0) / 40.0;
        let q: Vec<Vec<f64>> =
            (0..b).map(|i| (0..width).map(|j| value(i * width + j)).collect()).collect();
        let p: Vec<Vec<f64>> =
            (0..b * g).map(|i| (0..width).map(|j| value(1000 + i * width + j)).collect()).collect();
        let flat = |rows: &[Vec<f64>]| rows.concat();
        let kl = PrefixKl { weight: 0.7, temperature: 0.8 };
        for (normalize, kl) in [(false, None), (true, None), (false, Some(kl)), (true, Some(kl))] {
            let (dims, weights) = (vec![6, 3, 1], vec![1.0, 0.5, 0.25]);
            let m = Matryoshka { dims, weights, normalize, kl };
            let qt = Var::from_slice(&flat(&q), (b, width), &Device::Cpu).unwrap();
            let pt = Tensor::from_slice(&flat(&p), (b * g, width), &Device::Cpu).unwrap();
            let loss = m.sum(qt.as_tensor(), &pt, |q, p| contrastive(q, p, t)).unwrap();
            let got = loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            let want = reference(&q, &q, &p, &m, t);
            let case = format!("normalize {normalize}, kl {kl:?}");
            assert!((got - want).abs() < 1e-10, "{case}: {got} vs {want}");
            if kl.is_some() {
                let plain = Matryoshka { kl: None, ..m.clone() };
                let without = reference(&q, &q, &p, &plain, t);
                assert!(want - without > 1e-3, "{case}: the KL terms add {}", want - without);
            }
            let grad =
                loss.backward().unwrap().get(qt.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
            for (i, j) in [(0, 0), (1, 2), (2, 5), (0, 4)] {
                let h = 1e-6;
                let mut up = q.clone();
                up[i][j] += h;
                let mut down = q.clone();
                down[i][j] -= h;
                let fd =
                    (reference(&up, &q, &p, &m, t) - reference(&down, &q, &p, &m, t)) / (2.0 * h);
                assert!(
                    (grad[i][j] - fd).abs() < 1e-7,
                    "{case}: d/dq[{i}][{j}]: {} vs {fd}",
                    grad[i][j]
                );
            }
        }
        // A width beyond the representation is an error, not a silent cut.
        let q = Tensor::zeros((2, 4), DType::F64, &Device::Cpu).unwrap();
        let m = Matryoshka { dims: vec![5], weights: vec![1.0], normalize: false, kl: None };
        let e = m.sum(&q, &q, |q, p| contrastive(q, p, 1.0)).unwrap_err().to_string();
        assert!(e.contains("a Matryoshka width of 5 for representations of 4"), "{e}");
    }
}
