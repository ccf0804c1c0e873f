//! Training on the real tokens only. A batch is padded to its longest sequence (10-30% of the
//! token rows of a training batch of InsuranceQA answers are padding), and every part of a
//! layer costs as much on a padding row as on a real one, though nothing reads what a padding
//! row computes: attention masks padded keys, and pooling masks padded positions. [`Packing`]
//! moves a layer's hidden states `(b, l, h)` to the packed rows `(n, h)` of its `n` real
//! tokens, runs the layer there (the projections, the MLP, the norms and dropout on `n` rows;
//! attention sequence by sequence over each one's real tokens, `kernel::packed_attention`)
//! and moves the result back, zeros on the padding. The real tokens' values are those of the
//! padded layout up to the order of float sums, and so are their gradients; a padding
//! position's output is zero instead of the value transformers computes there, which no loss
//! reads (but for a sequence without any real token, whose pooled output then comes from
//! zeros). Dropout draws its mask for the padded layout, as the padded layer does, and applies
//! it to the real tokens' entries: the same values are dropped either way, so the CPU's packed
//! step and every other path (F64, a GPU) agree under dropout too. LoRA's dropout on a
//! projection's input (`--lora_dropout`, drawn inside the fused LoRA op) is the exception: it
//! is drawn for the packed rows, which also moves every later draw of that layer, so with LoRA
//! dropout a packed layer drops other values than a padded one (each run still replays
//! itself exactly).
//!
//! The layers of BERT, RoBERTa, XLM-RoBERTa and DistilBERT use it (decoders and ModernBERT do
//! not). It applies when training on the CPU in F32 where the fused attention kernel runs
//! (without autocast, or under `--bf16` on the CPU's bf16 kernels), with a padding mask `(b, 1,
//! 1, l)` (as [`super::attention::mask_bias`] makes it) that masks something and a real token in
//! the batch; elsewhere (inference, which has its own kernels; a GPU; F64 gradient checks;
//! autocast composed by candle) the layer runs padded.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::attention::fused_attention_applies;
use super::attention::kernel::{packed_attention, Dropout, Sequences};
use super::dropout::{draw_keep_mask, ByteMask};
use super::fast::contiguous_f32;
use super::{layers, Mode};

/// How a layer's hidden states are laid out: packed to the real tokens, or as they come (see
/// the module's doc).
pub(crate) struct Packing(Option<Rows>);

/// The real tokens of a padded batch: for each packed row, its row in the padded `(b * l)`
/// layout, in order, and each sequence's first packed row and length.
#[derive(Clone)]
struct Rows {
    real: Arc<[u32]>,
    spans: Arc<[(usize, usize)]>,
    /// `b * l`.
    padded: usize,
    /// `(b, l)`.
    dims: (usize, usize),
}

impl Packing {
    /// The packing of hidden states `x` `(b, l, h)` under the additive mask `bias` (0 on real
    /// tokens) for a layer with attention dropout `attention_dropout` running in `mode`: the
    /// real tokens where packing applies (the module's doc: training, the fused attention
    /// kernel, which also needs `attention_dropout < 1`) and the mask masks something, none
    /// otherwise.
    pub(crate) fn of(
        x: &Tensor,
        bias: &Tensor,
        attention_dropout: f64,
        mode: Mode,
    ) -> Result<Self> {
        if !(x.rank() == 3 && applies(&[x, bias], attention_dropout, mode)) {
            return Ok(Self(None));
        }
        let (b, l, _) = x.dims3()?;
        if bias.dims() != [b, 1, 1, l] {
            return Ok(Self(None));
        }
        let keep = bias.flatten_all()?.to_vec1::<f32>()?;
        // The real tokens' padded rows, and each sequence's share of them, in one pass.
        let (mut real, mut spans) = (Vec::new(), Vec::with_capacity(b));
        for (seq, mask) in keep.chunks(l.max(1)).take(b).enumerate() {
            let start = real.len();
            let rows = mask.iter().enumerate().filter(|&(_, &v)| v == 0.0);
            real.extend(rows.map(|(i, _)| (seq * l + i) as u32));
            spans.push((start, real.len() - start));
        }
        if real.len() == b * l || real.is_empty() {
            return Ok(Self(None));
        }
        let rows = Rows { real: real.into(), spans: spans.into(), padded: b * l, dims: (b, l) };
        Ok(Self(Some(rows)))
    }

    /// `x` `(b, l, h)` as the layer takes it: its real tokens' rows `(n, h)` when packing, `x`
    /// itself otherwise.
    pub(crate) fn pack(&self, x: &Tensor) -> Result<Tensor> {
        match &self.0 {
            Some(rows) => x.contiguous()?.apply_op1(Pack(rows.clone())),
            None => Ok(x.clone()),
        }
    }

    /// The inverse of [`Packing::pack`]: packed rows `(n, h)` back to `(b, l, h)`, zeros on the
    /// padding.
    pub(crate) fn unpack(&self, x: Tensor) -> Result<Tensor> {
        match &self.0 {
            Some(rows) => x.contiguous()?.apply_op1(Unpack(rows.clone())),
            None => Ok(x),
        }
    }

    /// Self-attention over projections laid out as [`Packing::pack`] lays them out, `heads`
    /// heads, dropout `dropout_p` on the probabilities: sequence by sequence over the real
    /// tokens when packing, [`layers::attention`] under `bias` otherwise.
    pub(crate) fn attention(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        bias: &Tensor,
        heads: usize,
        dropout_p: f64,
        mode: Mode,
    ) -> Result<Tensor> {
        let Some(rows) = &self.0 else {
            return layers::attention(q, k, v, bias, heads, dropout_p, mode);
        };
        let (n, h) = q.dims2()?;
        let split = |t: &Tensor| t.reshape((n, heads, h / heads));
        let dropout = match mode {
            Mode::Train(training) if dropout_p > 0.0 => {
                // The padded layout's mask `(b, heads, l, l)`, as the padded op draws it, cut
                // to the real tokens' probabilities: the same values dropped.
                let (b, l) = rows.dims;
                let (padded, scale) = draw_keep_mask(training, b * heads * l * l, dropout_p);
                let mut keep = Vec::with_capacity(Sequences::Packed(&rows.spans).probs(heads));
                for (seq, &(start, len)) in rows.spans.iter().enumerate() {
                    // The sequence's real positions; one run of them (any padding on one side)
                    // is copied a row at a time.
                    let at: Vec<usize> =
                        rows.real[start..start + len].iter().map(|&r| r as usize % l).collect();
                    let run = at.first().filter(|&&a| at.last() == Some(&(a + len - 1)));
                    for head in 0..heads {
                        let block = (seq * heads + head) * l * l;
                        for &i in &at {
                            let row = &padded[block + i * l..][..l];
                            match run {
                                Some(&a) => keep.extend_from_slice(&row[a..a + len]),
                                None => keep.extend(at.iter().map(|&j| row[j])),
                            }
                        }
                    }
                }
                Some(Dropout { keep, scale })
            }
            _ => None,
        };
        packed_attention(&split(q)?, &split(k)?, &split(v)?, rows.spans.clone(), dropout)
    }

    /// Dropout with probability `p` on hidden states laid out as [`Packing::pack`] lays them
    /// out: when packing, the padded layout's mask (as [`layers::dropout`] draws it for `(b,
    /// l, h)`) on the real tokens' rows, so the same values are dropped either way.
    pub(crate) fn dropout(&self, x: &Tensor, p: f64, mode: Mode) -> Result<Tensor> {
        match (&self.0, mode) {
            (Some(rows), Mode::Train(training)) if p > 0.0 && p < 1.0 => {
                let h = x.dims2()?.1;
                let (padded, scale) = draw_keep_mask(training, rows.padded * h, p);
                let real = &rows.real;
                let keep = gather_rows(&padded, h, real.len(), |r| Some(real[r] as usize));
                x.contiguous()?.apply_op1(ByteMask::new(keep, scale))
            }
            _ => layers::dropout(x, p, mode),
        }
    }
}

/// Whether packing applies to a layer over `operands` (its input and mask) with attention
/// dropout `attention_dropout` in `mode`: training on the CPU in F32 where the fused attention
/// kernel runs.
fn applies(operands: &[&Tensor], attention_dropout: f64, mode: Mode) -> bool {
    mode.is_train()
        && operands.iter().all(|t| t.device().is_cpu())
        && fused_attention_applies(operands, 0, attention_dropout, mode)
}

/// Whether the layers of a backbone that packs (BERT, DistilBERT) run an F32 batch on the CPU
/// on its real tokens only in `mode` (with attention dropout `attention_dropout`), so that the
/// trainer need not split a batch by length to spare padding
/// ([`super::Backbone::skips_padding`]). It answers for F32 on the CPU whatever the model's
/// dtype: an F64 model (gradient checks) is then split as the F32 one is and runs padded, so
/// both draw the same dropout masks.
pub(crate) fn packs(attention_dropout: f64, mode: Mode) -> bool {
    let probe = Tensor::zeros(0, candle_core::DType::F32, &candle_core::Device::Cpu);
    probe.is_ok_and(|t| applies(&[&t], attention_dropout, mode))
}

/// `(b, l, h)` to the real tokens' rows `(n, h)`; its backward is [`Unpack`].
struct Pack(Rows);

/// `(n, h)` to `(b, l, h)` with zero rows on the padding; its backward is [`Pack`].
struct Unpack(Rows);

/// Rows of `h` values gathered from `src` into a new buffer of `rows` rows: row `r` is
/// `src`'s row `from(r)`, or zeros (the default value) where that is `None`: hidden states,
/// and the dropout masks cut to the real tokens.
fn gather_rows<T: Copy + Default + Send + Sync>(
    src: &[T],
    h: usize,
    rows: usize,
    from: impl Fn(usize) -> Option<usize> + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); rows * h];
    out.par_chunks_mut(h.max(1)).enumerate().for_each(|(r, o)| {
        if let Some(s) = from(r) {
            o.copy_from_slice(&src[s * h..(s + 1) * h]);
        }
    });
    out
}

/// [`gather_rows`] on an F32 storage.
fn gather_storage(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    h: usize,
    rows: usize,
    from: impl Fn(usize) -> Option<usize> + Sync,
) -> Result<CpuStorage> {
    let x = contiguous_f32(s, l, op)?;
    Ok(CpuStorage::F32(gather_rows(x, h, rows, from)))
}

impl CustomOp1 for Pack {
    fn name(&self) -> &'static str {
        "pack-real-tokens"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, len, h) = l.shape().dims3()?;
        if (b, len) != self.0.dims {
            candle_core::bail!("pack-real-tokens: {:?} for a mask of {:?}", l.dims(), self.0.dims);
        }
        let real = &self.0.real;
        let out = gather_storage(s, l, self.name(), h, real.len(), |r| Some(real[r] as usize))?;
        Ok((out, Shape::from((real.len(), h))))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Unpack(self.0.clone()))?))
    }
}

impl CustomOp1 for Unpack {
    fn name(&self) -> &'static str {
        "unpack-real-tokens"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h) = l.shape().dims2()?;
        let rows = &self.0;
        if n != rows.real.len() {
            candle_core::bail!("unpack-real-tokens: {n} rows for {} real tokens", rows.real.len());
        }
        // Each padded row's packed row, if it is a real token.
        let mut slot = vec![None; rows.padded];
        for (i, &r) in rows.real.iter().enumerate() {
            slot[r as usize] = Some(i);
        }
        let out = gather_storage(s, l, self.name(), h, rows.padded, |r| slot[r])?;
        Ok((out, Shape::from((rows.dims.0, rows.dims.1, h))))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Pack(self.0.clone()))?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::backbone::attention::mask_bias;
    use crate::backbone::Training;
    use crate::testing::max_abs_diff;

    /// Hidden states `(2, 3, 2)` with distinct values, the second sequence padded after one
    /// token, and its mask.
    fn batch() -> (Tensor, Tensor) {
        let x = Tensor::arange(1f32, 13.0, &Device::Cpu).unwrap().reshape((2, 3, 2)).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1], [1, 0, 0]], &Device::Cpu).unwrap();
        (x, mask_bias(&mask, DType::F32).unwrap())
    }

    #[test]
    fn packs_the_real_rows_and_unpacks_with_zeros_on_padding() {
        let training = Training::new(None, 0);
        let (x, bias) = batch();
        let packing = Packing::of(&x, &bias, 0.1, Mode::Train(&training)).unwrap();
        let packed = packing.pack(&x).unwrap();
        assert_eq!(packed.to_vec2::<f32>().unwrap(), [[1., 2.], [3., 4.], [5., 6.], [7., 8.]]);
        let back = packing.unpack(packed).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(back[0], [[1., 2.], [3., 4.], [5., 6.]]);
        assert_eq!(back[1], [[7., 8.], [0., 0.], [0., 0.]]);
        assert_eq!(packing.0.as_ref().map(|r| r.spans.to_vec()), Some(vec![(0, 3), (3, 1)]));
    }

    #[test]
    fn gradients_flow_to_real_tokens_only() {
        let training = Training::new(None, 0);
        let (x, bias) = batch();
        let x = Var::from_tensor(&x).unwrap();
        let packing = Packing::of(&x, &bias, 0.0, Mode::Train(&training)).unwrap();
        // A loss on the packed rows, weighted by position so each row's gradient differs.
        let w = Tensor::arange(1f32, 9.0, &Device::Cpu).unwrap().reshape((4, 2)).unwrap();
        let packed = packing.pack(&x).unwrap();
        let unpacked = packing.unpack((packed * &w).unwrap()).unwrap();
        let loss = unpacked.sqr().unwrap().sum_all().unwrap();
        let grad = loss.backward().unwrap().get(&x).unwrap().to_vec3::<f32>().unwrap();
        // d/dx of (x w)^2 = 2 x w^2 on real rows, 0 on padding.
        let xs = x.as_tensor().to_vec3::<f32>().unwrap();
        let ws = w.to_vec2::<f32>().unwrap();
        let real = [(0, 0), (0, 1), (0, 2), (1, 0)];
        for (i, &(s, t)) in real.iter().enumerate() {
            for j in 0..2 {
                assert_eq!(grad[s][t][j], 2.0 * xs[s][t][j] * ws[i][j] * ws[i][j]);
            }
        }
        assert_eq!(grad[1][1], [0.0, 0.0]);
        assert_eq!(grad[1][2], [0.0, 0.0]);
    }

    #[test]
    fn applies_only_when_training_on_the_cpu_in_f32_with_padding() {
        let training = Training::new(None, 0);
        let train = Mode::Train(&training);
        let (x, bias) = batch();
        let packs = |x: &Tensor, bias: &Tensor, mode| Packing::of(x, bias, 0.1, mode).unwrap().0;
        assert!(packs(&x, &bias, train).is_some());
        assert!(packs(&x, &bias, Mode::Eval).is_none());
        let full = Tensor::ones((2, 3), DType::U32, &Device::Cpu).unwrap();
        assert!(packs(&x, &mask_bias(&full, DType::F32).unwrap(), train).is_none());
        // No real token at all: nothing to pack, the layer runs padded.
        let empty = Tensor::zeros((2, 3), DType::U32, &Device::Cpu).unwrap();
        assert!(packs(&x, &mask_bias(&empty, DType::F32).unwrap(), train).is_none());
        let f64 = x.to_dtype(DType::F64).unwrap();
        assert!(packs(&f64, &bias.to_dtype(DType::F64).unwrap(), train).is_none());
        // bf16 autocast composed by candle: padded; on the CPU's bf16 kernels (emulated here,
        // so on any CPU), whose attention stays F32: packed.
        let composed = Training::new(Some(DType::BF16), 0).with_cpu_bf16(None);
        assert!(packs(&x, &bias, Mode::Train(&composed)).is_none());
        let kernels = Training::new(Some(DType::BF16), 0)
            .with_cpu_bf16(Some(crate::backbone::bf16::Bf16Kernels::emulated()));
        assert!(packs(&x, &bias, Mode::Train(&kernels)).is_some());
        // A pair mask (b, 1, l, l), as decoders' causal masks are.
        let pairs = bias.broadcast_as((2, 1, 3, 3)).unwrap().contiguous().unwrap();
        assert!(packs(&x, &pairs, train).is_none());
    }

    /// Attention over the packed real tokens equals the padded op on the real rows, values and
    /// gradients, with two heads, sequences of 5, 2 and 3 real tokens (unpadded,
    /// left-padded, and with a hole) and an output gradient on the real rows only (padding
    /// rows feed nothing downstream); with dropout too, the same seed dropping the same
    /// probabilities, and the hidden states' dropout likewise.
    #[test]
    fn packed_attention_and_dropout_equal_the_padded_ops_on_real_tokens() -> Result<()> {
        let dev = Device::Cpu;
        let (b, l, heads, d) = (3, 5, 2, 4);
        // Unpadded, left-padded, and with a hole (a masked key between real ones).
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [0, 0, 0, 1, 1], [1, 0, 1, 1, 0]], &dev)?;
        let bias = mask_bias(&mask, DType::F32)?;
        let var = || Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, l, heads * d), &dev)?);
        let (q, k, v) = (var()?, var()?, var()?);
        let g = Tensor::randn(0f32, 1.0, (10, heads * d), &dev)?;
        for p in [0.0, 0.4] {
            let run = |packed: bool| -> Result<(Tensor, Vec<Tensor>)> {
                let training = Training::new(None, 7);
                let train = Mode::Train(&training);
                let packing = Packing::of(q.as_tensor(), &bias, p, train)?;
                let real = Packing::of(q.as_tensor(), &bias, p, train)?;
                let packing = if packed { packing } else { Packing(None) };
                let [pq, pk, pv] = [&q, &k, &v].map(|t| packing.pack(t.as_tensor()));
                let ctx = packing.attention((&pq?, &pk?, &pv?), &bias, heads, p, train)?;
                let ctx = packing.dropout(&ctx, p, train)?;
                // Real rows only, packed, whichever way the context came.
                let ctx = if packed { ctx } else { real.pack(&ctx)? };
                let store = (&ctx * &g)?.sum_all()?.backward()?;
                let grads = [&q, &k, &v].map(|t| store.get(t.as_tensor()).expect("a gradient"));
                Ok((ctx, grads.iter().map(|&t| t.clone()).collect()))
            };
            let (packed, packed_grads) = run(true)?;
            let (padded, padded_grads) = run(false)?;
            assert_eq!(packed.dims(), [10, heads * d]);
            assert!(max_abs_diff(&packed, &padded)? < 1e-5, "values (dropout {p})");
            let dropped =
                packed.flatten_all()?.to_vec1::<f32>()?.iter().filter(|&&v| v == 0.0).count();
            assert_eq!(dropped > 0, p > 0.0, "dropout {p} dropped {dropped} values");
            for (name, (a, c)) in ["q", "k", "v"].iter().zip(packed_grads.iter().zip(&padded_grads))
            {
                let diff = max_abs_diff(a, c)?;
                assert!(diff < 1e-5, "gradient of {name} differs by {diff} (dropout {p})");
                assert!(max_abs_diff(a, &a.zeros_like()?)? > 0.0, "gradient of {name} is zero");
            }
        }
        Ok(())
    }

    /// With dropout the packed op draws its mask from the training stream: the same seed the
    /// same context, another seed another one (which entries it drops is the test above).
    #[test]
    fn packed_attention_dropout_follows_the_stream() -> Result<()> {
        let dev = Device::Cpu;
        let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 0, 0]], &dev)?;
        let bias = mask_bias(&mask, DType::F32)?;
        let x = Tensor::randn(0f32, 1.0, (2, 4, 8), &dev)?;
        let ctx = |seed: u64| -> Result<Tensor> {
            let training = Training::new(None, seed);
            let train = Mode::Train(&training);
            let packing = Packing::of(&x, &bias, 0.5, train)?;
            let p = packing.pack(&x)?;
            packing.attention((&p, &p, &p), &bias, 2, 0.5, train)
        };
        assert_eq!(max_abs_diff(&ctx(3)?, &ctx(3)?)?, 0.0);
        assert!(max_abs_diff(&ctx(3)?, &ctx(4)?)? > 1e-3);
        Ok(())
    }
}
