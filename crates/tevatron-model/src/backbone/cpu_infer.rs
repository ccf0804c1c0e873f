//! Transformer layers for inference on the CPU in F32, computed on raw buffers instead of
//! candle ops: the post-norm encoder layer of BERT, RoBERTa, XLM-RoBERTa and DistilBERT, and the
//! pre-norm decoder layer of Llama, Mistral, Qwen2 and Qwen3.
//!
//! Why it exists: composed from candle ops, a MiniLM layer spent about 40% of `encode`'s time
//! outside its matrix products (broadcast bias and residual adds, copies that split and merge
//! heads, one small batched product per head, single-threaded strided copies), and left one of
//! two cores idle a quarter of the time. Here each projection is one multithreaded `gemm` whose
//! output starts as the bias; attention runs one task per (sequence, head), reading Q, K and V in
//! place through strides (grouped-query heads included) and writing its slice of the context in
//! place; residual adds are fused into the norms, activations and rotary positions run in place.
//! Only `Mode::Eval` takes this path; training keeps the differentiable ops.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::activation::activate;
use super::attention::kernel::{forward as attention, Heads, Sequences};
use super::fast::{par_fill, simd, Data, CHUNK};
use super::layers::{Activation, LayerNorm, Linear};
use super::norm::{add_layer_norm, rms_norm_rows, RmsNormRef};
use super::rotary::rotate;

/// The weights of one post-norm encoder layer, borrowed from the backbone:
/// `x1 = LN(x + O(attn(Q x, K x, V x)))`, `out = LN(x1 + down(act(up(x1))))`.
pub(super) struct PostNormLayer<'a> {
    pub query: &'a Linear,
    pub key: &'a Linear,
    pub value: &'a Linear,
    pub attn_out: &'a Linear,
    pub attn_norm: &'a LayerNorm,
    pub up: &'a Linear,
    pub down: &'a Linear,
    pub out_norm: &'a LayerNorm,
    pub act: Activation,
    pub heads: usize,
}

/// Whether `t` is contiguous F32 on the CPU (what this module reads).
fn plain(t: &Tensor) -> bool {
    Data::of(t).is_ok()
}

/// Whether a linear layer can run here: plain weights (and bias, if any), no unmerged adapter.
fn plain_linear(lin: &Linear) -> bool {
    lin.lora.is_none() && plain(&lin.weight) && lin.bias.as_ref().is_none_or(plain)
}

impl PostNormLayer<'_> {
    /// Whether this path can run the layer on `x` with attention bias `bias`: F32 on the CPU,
    /// plain weights with biases (no unmerged LoRA adapter), and a padding-only bias `(b,1,1,l)`.
    pub fn applies(&self, x: &Tensor, bias: &Tensor) -> bool {
        let Ok((b, l, _)) = x.dims3() else { return false };
        let linears = [self.query, self.key, self.value, self.attn_out, self.up, self.down];
        plain(x)
            && plain(bias)
            && bias.elem_count() == b * l
            && linears.iter().all(|lin| plain_linear(lin) && lin.bias.is_some())
            && [self.attn_norm, self.out_norm].iter().all(|n| plain(&n.weight) && plain(&n.bias))
    }

    /// Runs the layer on hidden states `x` `(b, l, h)` with the additive padding bias
    /// `(b, 1, 1, l)`. Call only where [`PostNormLayer::applies`] holds.
    pub fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (_, l, h) = x.dims3()?;
        if !h.is_multiple_of(self.heads) {
            candle_core::bail!("hidden size {h} is not a multiple of {} heads", self.heads);
        }
        let linears = [self.query, self.key, self.value, self.attn_out, self.up, self.down];
        by_sequences((x, bias), linears, |x, mask, b| self.sequences(x, mask, (b, l, h)))
    }

    /// The layer over `b` whole sequences of `l` rows, `h` wide, and their part of the bias.
    fn sequences(
        &self,
        x: &[f32],
        mask: &[f32],
        (b, l, h): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let [q, k, v] = Linear::infer_shared(x, [self.query, self.key, self.value])?;
        let heads = Heads { query: self.heads, kv: self.heads, dim: h / self.heads };
        let ctx = attention((&q, &k, &v), Sequences::Padded { b, l, mask }, heads, None)?;
        drop((q, k, v));
        let mut a = linear(&ctx, self.attn_out)?;
        drop(ctx);
        add_layer_norm(&mut a, x, h, self.attn_norm)?;
        let mut out = mlp(&a, h, (self.up, self.act, self.down))?;
        add_layer_norm(&mut out, &a, h, self.out_norm)?;
        Ok(out)
    }
}

/// The weights of one pre-norm decoder layer (Llama family), borrowed from the backbone:
/// `x1 = x + O(attn(rope(Q n1(x)), rope(K n1(x)), V n1(x)))`,
/// `out = x1 + down(act(gate(n2(x1))) * up(n2(x1)))`; Qwen3 also norms each head of Q and K.
pub(super) struct DecoderLayer<'a> {
    pub q: &'a Linear,
    pub k: &'a Linear,
    pub v: &'a Linear,
    pub o: &'a Linear,
    pub q_norm: Option<RmsNormRef<'a>>,
    pub k_norm: Option<RmsNormRef<'a>>,
    pub gate: &'a Linear,
    pub up: &'a Linear,
    pub down: &'a Linear,
    pub input_norm: RmsNormRef<'a>,
    pub post_norm: RmsNormRef<'a>,
    pub act: Activation,
    pub heads: Heads,
}

impl DecoderLayer<'_> {
    /// Whether this path can run the layer on `x` with the attention bias `(b, 1, l, l)` and
    /// rotary tables `(l, head_dim)`: all F32 on the CPU, no unmerged LoRA adapter.
    pub fn applies(&self, x: &Tensor, bias: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
        let Ok((b, l, _)) = x.dims3() else { return false };
        let linears = [self.q, self.k, self.v, self.o, self.gate, self.up, self.down];
        let norms = [Some(&self.input_norm), Some(&self.post_norm)];
        let head_norms = [self.q_norm.as_ref(), self.k_norm.as_ref()];
        plain(x)
            && plain(bias)
            && bias.elem_count() == b * l * l
            && plain(cos)
            && plain(sin)
            && cos.elem_count() == l * self.heads.dim
            && sin.elem_count() == l * self.heads.dim
            && linears.iter().all(|lin| plain_linear(lin))
            && norms.iter().chain(&head_norms).flatten().all(|n| plain(n.weight))
    }

    /// Runs the layer. Call only where [`DecoderLayer::applies`] holds.
    pub fn forward(&self, x: &Tensor, bias: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (_, l, h) = x.dims3()?;
        let Heads { query, kv, .. } = self.heads;
        if kv == 0 || !query.is_multiple_of(kv) {
            candle_core::bail!("{query} query heads are not a multiple of {kv} key/value heads");
        }
        let (cd, sd) = (Data::of(cos)?, Data::of(sin)?);
        let table = (cd.slice(), sd.slice());
        let linears = [self.q, self.k, self.v, self.o, self.gate, self.up, self.down];
        by_sequences((x, bias), linears, |x, mask, b| self.sequences(x, mask, table, (b, l, h)))
    }

    /// The layer over `b` whole sequences of `l` rows, `h` wide, their part of the bias and the
    /// rotary tables `(cos, sin)`.
    fn sequences(
        &self,
        x: &[f32],
        mask: &[f32],
        table: (&[f32], &[f32]),
        (b, l, h): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let Heads { query, kv, dim } = self.heads;
        let normed = rms_norm_rows(x, h, &self.input_norm)?;
        let [mut q, mut k, v] = Linear::infer_shared(&normed, [self.q, self.k, self.v])?;
        drop(normed);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = rms_norm_rows(&q, dim, qn)?;
            k = rms_norm_rows(&k, dim, kn)?;
        }
        rotate(&mut q, query * dim, l, dim, table, false);
        rotate(&mut k, kv * dim, l, dim, table, false);
        let ctx = attention((&q, &k, &v), Sequences::Padded { b, l, mask }, self.heads, None)?;
        drop((q, k, v));
        let mut x1 = linear(&ctx, self.o)?;
        drop(ctx);
        add_in_place(&mut x1, x);
        let normed = rms_norm_rows(&x1, h, &self.post_norm)?;
        let mut out = gated_mlp(&normed, h, (self.gate, self.up, self.act, self.down))?;
        drop(normed);
        add_in_place(&mut out, &x1);
        Ok(out)
    }
}

/// Rows a chunk of sequences of [`by_sequences`] aims at (at least one sequence a chunk). A
/// MiniLM chunk of 128 rows holds its input, its rounded copy, Q, K, V and the context in
/// about a megabyte, within a core's L2 cache on the CPUs measured (1 MB on AMD Zen 4 and 5,
/// 2 MB on Intel's Sapphire and Emerald Rapids); a wider model's spills to L3, still not to
/// memory.
const SEQUENCE_ROWS: usize = 128;

/// `layer(x, mask, n)` over the `b` sequences of `l` rows of hidden states `x` `(b, l, h)`
/// (contiguous F32) with their part of the attention bias (the same share of it per sequence),
/// as a tensor of the same shape: when all of `layers` (the
/// projections `layer` runs) are int8 or bf16, a few sequences at a time in parallel (as many
/// as make [`SEQUENCE_ROWS`] rows), so that a layer's intermediates (Q, K and V alone are three
/// times its input) go from one op to the next in cache instead of through memory: over all
/// rows at once, writing and reading them back took about a third of each bf16 projection's
/// time on an AMX Xeon. Every op treats rows (or, attention, sequences) alone, so the chunks
/// give the bits of the whole. In F32 over all sequences at once (one `gemm` per projection
/// packs its weight once).
fn by_sequences<const N: usize>(
    (x, bias): (&Tensor, &Tensor),
    layers: [&Linear; N],
    layer: impl Fn(&[f32], &[f32], usize) -> Result<Vec<f32>> + Sync,
) -> Result<Tensor> {
    let (b, l, h) = x.dims3()?;
    let (xd, mask) = (Data::of(x)?, Data::of(bias)?);
    let out = chunked_sequences(SEQUENCE_ROWS, (xd.slice(), mask.slice()), (b, l), layers, layer)?;
    Tensor::from_vec(out, (b, l, h), &Device::Cpu)
}

/// [`by_sequences`] with chunks of about `rows` rows.
fn chunked_sequences<const N: usize>(
    rows: usize,
    (x, mask): (&[f32], &[f32]),
    (b, l): (usize, usize),
    layers: [&Linear; N],
    layer: impl Fn(&[f32], &[f32], usize) -> Result<Vec<f32>> + Sync,
) -> Result<Vec<f32>> {
    let per_chunk = (rows / l.max(1)).max(1);
    if b <= per_chunk || !all_reduced(&layers) {
        return layer(x, mask, b);
    }
    if !x.len().is_multiple_of(b) || !mask.len().is_multiple_of(b) {
        candle_core::bail!("{} values or a bias of {} for {b} sequences", x.len(), mask.len());
    }
    let (x_seq, mask_seq) = (x.len() / b, mask.len() / b);
    by_chunks(x, per_chunk * x_seq, |start, x| {
        let (s0, n) = (start / x_seq, x.len() / x_seq);
        layer(x, &mask[s0 * mask_seq..(s0 + n) * mask_seq], n)
    })
}

/// Whether every one of `layers` runs int8 or bf16 products (weights packed once, so that a
/// call on a few rows costs no packing).
fn all_reduced(layers: &[&Linear]) -> bool {
    layers.iter().all(|l| l.reduced.is_some())
}

/// `f(start, chunk)` for the chunks of `x` of `per_task` values (the last part), in parallel,
/// each giving as many values as it gets, written in place of its chunk: [`by_sequences`]'
/// and [`by_row_blocks`]' loop. The first error found is returned (the other chunks still run).
fn by_chunks(
    x: &[f32],
    per_task: usize,
    f: impl Fn(usize, &[f32]) -> Result<Vec<f32>> + Sync,
) -> Result<Vec<f32>> {
    let failed = std::sync::Mutex::new(None);
    let out = par_fill(x.len(), per_task, |start, out| {
        let result = f(start, &x[start..start + out.len()]).and_then(|y| match y.len() {
            n if n == out.len() => Ok(y),
            n => Err(candle_core::Error::Msg(format!("{n} values for a chunk of {}", out.len()))),
        });
        match result {
            Ok(y) => out.copy_from_slice(&y),
            Err(e) => {
                // par_fill's contract: every value written.
                out.fill(0.0);
                failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
            }
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// `x W^T (+ b)` over the rows of `x` with a linear layer's weights, in F32, int8 or bf16
/// ([`Linear::infer_rows`]).
fn linear(x: &[f32], lin: &Linear) -> Result<Vec<f32>> {
    lin.infer_rows(x)
}

/// Rows per block of [`by_row_blocks`]: two of the int8 kernels' 48-row tasks, a 64-row and a
/// 32-row task of the bf16 kernels'. Sized
/// for MiniLM: its intermediate (1,536 F32 values a row and their bf16 copy) is then under a
/// megabyte, within a core's L2 cache on the CPUs measured (1 MB on AMD Zen 4 and 5, 2 MB on
/// Intel's Sapphire and Emerald Rapids); a wider model's spills to L3, still not to memory.
const MLP_ROWS: usize = 96;

/// `f(x)` for a function of the rows of `x` (`h` wide) that treats each row alone, such as an
/// MLP: when all of `layers` (the projections `f` runs) are int8 or bf16, block by block of
/// [`MLP_ROWS`] rows in parallel, so that an MLP's intermediate, four times as wide as `x` in
/// BERT's models, goes from one product through the activation into the next while in cache
/// instead of through memory (those passes, the activation and rounding the second product's
/// input, were about an eighth of `encode --bf16`'s time on an AMX Xeon); in F32 over all rows
/// at once (one `gemm` per projection packs its weight once).
fn by_row_blocks<const N: usize>(
    x: &[f32],
    h: usize,
    layers: [&Linear; N],
    f: impl Fn(&[f32]) -> Result<Vec<f32>> + Sync,
) -> Result<Vec<f32>> {
    if !all_reduced(&layers) {
        return f(x);
    }
    by_chunks(x, MLP_ROWS * h, |_, x| f(x))
}

/// `down(act(gate(x)) * up(x))` over the rows of `x` (`h` wide), the Llama family's MLP, by
/// [`by_row_blocks`].
fn gated_mlp(
    x: &[f32],
    h: usize,
    (gate, up, act, down): (&Linear, &Linear, Activation, &Linear),
) -> Result<Vec<f32>> {
    by_row_blocks(x, h, [gate, up, down], |x| {
        let [mut g, u] = Linear::infer_shared(x, [gate, up])?;
        activate(&mut g, act);
        g.par_chunks_mut(CHUNK).zip(u.par_chunks(CHUNK)).for_each(|(g, u)| {
            g.iter_mut().zip(u).for_each(|(g, u)| *g *= u);
        });
        drop(u);
        linear(&g, down)
    })
}

/// `down(act(up(x)))` over the rows of `x` (`h` wide), BERT's MLP, by [`by_row_blocks`].
fn mlp(x: &[f32], h: usize, (up, act, down): (&Linear, Activation, &Linear)) -> Result<Vec<f32>> {
    by_row_blocks(x, h, [up, down], |x| {
        let mut f = linear(x, up)?;
        activate(&mut f, act);
        linear(&f, down)
    })
}

/// `y += x`, in place.
fn add_in_place(y: &mut [f32], x: &[f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| simd(|| y.iter_mut().zip(x).for_each(|(y, x)| *y += x)));
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use super::*;
    use crate::backbone::layers::{self, Linears};
    use crate::backbone::Mode;

    /// Normal values from a seeded stream (`SplitMix64::normal`), the same on every run:
    /// unseeded random inputs once made a bound on bf16's error fail one run in forty.
    fn randn<S: Into<candle_core::Shape>>(shape: S, mean: f32, std: f32, seed: u64) -> Tensor {
        let shape = shape.into();
        let mut rng = crate::rng::SplitMix64::new(seed);
        let values: Vec<f32> =
            (0..shape.elem_count()).map(|_| mean + std * rng.normal() as f32).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// The same layer composed of candle ops (the path GPUs and half precision take).
    fn composed(p: &PostNormLayer, x: &Tensor, bias: &Tensor) -> Tensor {
        let e = Mode::Eval;
        let q = p.query.forward(x, e).unwrap();
        let k = p.key.forward(x, e).unwrap();
        let v = p.value.forward(x, e).unwrap();
        let ctx = layers::attention(&q, &k, &v, bias, p.heads, 0.0, e).unwrap();
        let a = (p.attn_out.forward(&ctx, e).unwrap() + x).unwrap();
        let a = p.attn_norm.forward(&a, e).unwrap();
        let f = p.act.forward(&p.up.forward(&a, e).unwrap(), e).unwrap();
        let out = (p.down.forward(&f, e).unwrap() + &a).unwrap();
        p.out_norm.forward(&out, e).unwrap()
    }

    /// Random weights of a post-norm layer of width `h` and MLP width `inter`: projections
    /// `q`, `k`, `v`, `o`, `up`, `down` with biases, layer norms `n1` and `n2`.
    fn layer_weights(h: usize, inter: usize) -> VarBuilder<'static> {
        let dev = Device::Cpu;
        let mut w = HashMap::new();
        let mut seed = 0u64;
        let mut add = |name: &str, shape: &[usize], std: f32| {
            seed += 1;
            w.insert(name.to_string(), randn(shape, 0.0, std, seed));
        };
        for n in ["q", "k", "v", "o"] {
            add(&format!("{n}.weight"), &[h, h], 0.3);
            add(&format!("{n}.bias"), &[h], 0.1);
        }
        add("up.weight", &[inter, h], 0.3);
        add("up.bias", &[inter], 0.1);
        add("down.weight", &[h, inter], 0.3);
        add("down.bias", &[h], 0.1);
        for n in ["n1", "n2"] {
            add(&format!("{n}.weight"), &[h], 1.0);
            add(&format!("{n}.bias"), &[h], 0.1);
        }
        VarBuilder::from_tensors(w, DType::F32, &dev)
    }

    /// The projections and norms of a post-norm layer, loaded from [`layer_weights`] with `lin`.
    struct LayerParts {
        qkvo: [Linear; 4],
        up: Linear,
        down: Linear,
        norms: [LayerNorm; 2],
    }

    impl LayerParts {
        fn load(vb: &VarBuilder, lin: Linears, h: usize, inter: usize) -> Self {
            Self {
                qkvo: ["q", "k", "v", "o"].map(|n| lin.with_bias(vb.pp(n), h, h).unwrap()),
                up: lin.with_bias(vb.pp("up"), h, inter).unwrap(),
                down: lin.with_bias(vb.pp("down"), inter, h).unwrap(),
                norms: ["n1", "n2"].map(|n| LayerNorm::load(vb.pp(n), h, 1e-12).unwrap()),
            }
        }

        fn layer(&self, act: Activation, heads: usize) -> PostNormLayer<'_> {
            let [query, key, value, attn_out] = &self.qkvo;
            let [attn_norm, out_norm] = &self.norms;
            PostNormLayer {
                query,
                key,
                value,
                attn_out,
                attn_norm,
                up: &self.up,
                down: &self.down,
                out_norm,
                act,
                heads,
            }
        }
    }

    /// A layer whose projections run as bf16 products (on the emulated instruction, so on any
    /// CPU): the raw-buffer path and the composed ops both take them (each differs from the F32
    /// layer, and by less than bf16's rounding allows), and the two agree with each other.
    #[test]
    fn a_layer_with_bf16_projections_stays_near_f32_on_both_paths() {
        use crate::backbone::bf16::Bf16Kernels;
        use crate::backbone::layers::ReducedKernels;
        let dev = Device::Cpu;
        let (b, l, h, inter, heads) = (2, 5, 16, 24, 4);
        let vb = layer_weights(h, inter);
        let x = randn((b, l, h), 0.0, 1.0, 101);
        let mask = Tensor::from_vec(vec![1u32, 1, 1, 1, 1, 1, 1, 1, 0, 0], (b, l), &dev).unwrap();
        let bias = layers::mask_bias(&mask, DType::F32).unwrap();
        let run = |lin: Linears| {
            let parts = LayerParts::load(&vb, lin, h, inter);
            let p = parts.layer(Activation::Gelu, heads);
            assert!(p.applies(&x, &bias));
            (p.forward(&x, &bias).unwrap(), composed(&p, &x, &bias))
        };
        let (f32_fast, _) = run(Linears::default());
        let bf16 = Some(ReducedKernels::Bf16(Bf16Kernels::emulated()));
        let (fast, slow) = run(Linears { lora: None, reduced: bf16 });
        let d = crate::testing::max_abs_diff(&fast, &slow).unwrap();
        assert!(d < 1e-5, "the raw-buffer and composed bf16 layers differ by {d}");
        let d = crate::testing::max_abs_diff(&fast, &f32_fast).unwrap();
        // Outputs are layer-normed (about unit scale); two roundings of 2^-9 per product.
        assert!(d > 0.0 && d < 5e-2, "bf16 against F32: {d}");
    }

    /// In int8 and bf16 the MLP runs block by block of rows ([`by_row_blocks`]): each row's
    /// outputs are the bits of the same MLP over all rows at once (its products treat rows
    /// alone), the last block part.
    #[test]
    fn the_mlp_in_blocks_of_rows_gives_the_bits_of_the_whole() {
        let (h, inter, rows) = (16, 40, 2 * MLP_ROWS + 37);
        let vb = layer_weights(h, inter);
        let x: Vec<f32> = randn(rows * h, 0.0, 1.0, 102).to_vec1().unwrap();
        for k in reduced_kernels() {
            let parts = LayerParts::load(&vb, Linears { lora: None, reduced: Some(k) }, h, inter);
            let (up, down) = (&parts.up, &parts.down);
            let got = mlp(&x, h, (up, Activation::Gelu, down)).unwrap();
            let mut f = linear(&x, up).unwrap();
            activate(&mut f, Activation::Gelu);
            let want = linear(&f, down).unwrap();
            assert_eq!(got.len(), rows * h);
            assert!(same_bits(&got, &want), "{k:?}");
            // The gated MLP (the Llama family's), with the one up projection as gate and up.
            let got = gated_mlp(&x, h, (up, up, Activation::Silu, down)).unwrap();
            let mut g = linear(&x, up).unwrap();
            activate(&mut g, Activation::Silu);
            let u = linear(&x, up).unwrap();
            g.iter_mut().zip(&u).for_each(|(g, u)| *g *= u);
            let want = linear(&g, down).unwrap();
            assert_eq!(got.len(), rows * h);
            assert!(same_bits(&got, &want), "gated, {k:?}");
        }
    }

    /// The reduced kernels whose layers run by chunks ([`by_sequences`], [`by_row_blocks`]):
    /// int8 (the CPU's) and bf16 on AMX's emulated tiles and on the emulated `vdpbf16ps`
    /// (AMD's Zen 4 and 5).
    fn reduced_kernels() -> [crate::backbone::layers::ReducedKernels; 3] {
        use crate::backbone::bf16::Bf16Kernels;
        use crate::backbone::int8::Int8Kernels;
        use crate::backbone::layers::ReducedKernels;
        [
            ReducedKernels::Int8(Int8Kernels::detect()),
            ReducedKernels::Bf16(Bf16Kernels::emulated_amx()),
            ReducedKernels::Bf16(Bf16Kernels::emulated()),
        ]
    }

    /// Bitwise equality of two outputs.
    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
    }

    /// In int8 and bf16 a post-norm layer runs a few sequences at a time
    /// ([`by_sequences`]): chunks of one, two and three sequences (the last part), and the
    /// layer's own chunks, give the bits of the layer over all of them at once, padding
    /// included.
    #[test]
    fn a_post_norm_layer_by_chunks_of_sequences_gives_the_bits_of_the_whole() {
        let dev = Device::Cpu;
        // 140 rows: more than SEQUENCE_ROWS, so that `forward` chunks too.
        let (b, l, h, inter, heads) = (20, 7, 16, 24, 4);
        assert!(b * l > SEQUENCE_ROWS);
        let vb = layer_weights(h, inter);
        let x = randn((b, l, h), 0.0, 1.0, 103);
        let mask: Vec<u32> = (0..b)
            .flat_map(|s| (0..l).map(move |i| u32::from(i < [7, 4, 1, 6, 7][s % 5])))
            .collect();
        let bias =
            layers::mask_bias(&Tensor::from_vec(mask, (b, l), &dev).unwrap(), DType::F32).unwrap();
        let (xs, masks) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            bias.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for k in reduced_kernels() {
            let parts = LayerParts::load(&vb, Linears { lora: None, reduced: Some(k) }, h, inter);
            let p = parts.layer(Activation::Gelu, heads);
            let whole = p.sequences(&xs, &masks, (b, l, h)).unwrap();
            let linears = [p.query, p.key, p.value, p.attn_out, p.up, p.down];
            for rows in [l, 2 * l, 3 * l + 1] {
                let got = chunked_sequences(rows, (&xs, &masks), (b, l), linears, |x, m, n| {
                    assert!(n <= rows / l, "a chunk of {n} sequences");
                    p.sequences(x, m, (n, l, h))
                })
                .unwrap();
                assert!(same_bits(&got, &whole), "{k:?}, chunks of {rows} rows");
            }
            // The layer itself takes this path and gives the same bits.
            let out =
                p.forward(&x, &bias).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(same_bits(&out, &whole), "{k:?}");
        }
    }

    /// The same for a decoder layer (its bias `(b, 1, l, l)`, rotary positions by row within
    /// each sequence, Qwen3's head norms).
    #[test]
    fn a_decoder_layer_by_chunks_of_sequences_gives_the_bits_of_the_whole() {
        use crate::backbone::norm::RmsNormRef;
        let dev = Device::Cpu;
        let (b, l, h, inter) = (4, 6, 16, 24);
        let heads = Heads { query: 4, kv: 2, dim: 4 };
        let kv_width = heads.kv * heads.dim;
        let mut w = HashMap::new();
        let mut seed = 0u64;
        let mut add = |name: &str, shape: &[usize], std: f32| {
            seed += 1;
            w.insert(name.to_string(), randn(shape, 0.0, std, seed));
        };
        for (n, out, inp) in [("q", h, h), ("k", kv_width, h), ("v", kv_width, h), ("o", h, h)] {
            add(&format!("{n}.weight"), &[out, inp], 0.3);
        }
        add("gate.weight", &[inter, h], 0.3);
        add("up.weight", &[inter, h], 0.3);
        add("down.weight", &[h, inter], 0.3);
        let vb = VarBuilder::from_tensors(w, DType::F32, &dev);
        let norm = |n: usize, seed: u64| randn(n, 1.0, 0.1, seed);
        let (n1, n2, qn, kn) =
            (norm(h, 111), norm(h, 112), norm(heads.dim, 113), norm(heads.dim, 114));
        let angles: Vec<f32> =
            (0..l * heads.dim).map(|i| (i / heads.dim) as f32 * 0.3 + (i % 2) as f32).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let xs: Vec<f32> = randn(b * l * h, 0.0, 1.0, 105).to_vec1().unwrap();
        // Causal, the second sequence's last two keys padding (as `f32::MIN`, HF's value).
        let masks: Vec<f32> = (0..b * l * l)
            .map(|i| {
                let (seq, qi, ki) = (i / (l * l), i / l % l, i % l);
                if ki > qi || (seq == 1 && ki >= l - 2) {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        for k in reduced_kernels() {
            let lin = Linears { lora: None, reduced: Some(k) };
            let [q, kk, v, o] = [("q", h, h), ("k", h, kv_width), ("v", h, kv_width), ("o", h, h)]
                .map(|(n, inp, out)| lin.no_bias(vb.pp(n), inp, out).unwrap());
            let gate = lin.no_bias(vb.pp("gate"), h, inter).unwrap();
            let up = lin.no_bias(vb.pp("up"), h, inter).unwrap();
            let down = lin.no_bias(vb.pp("down"), inter, h).unwrap();
            let layer = DecoderLayer {
                q: &q,
                k: &kk,
                v: &v,
                o: &o,
                q_norm: Some(RmsNormRef { weight: &qn, eps: 1e-6 }),
                k_norm: Some(RmsNormRef { weight: &kn, eps: 1e-6 }),
                gate: &gate,
                up: &up,
                down: &down,
                input_norm: RmsNormRef { weight: &n1, eps: 1e-6 },
                post_norm: RmsNormRef { weight: &n2, eps: 1e-6 },
                act: Activation::Silu,
                heads,
            };
            let table = (&cos[..], &sin[..]);
            let whole = layer.sequences(&xs, &masks, table, (b, l, h)).unwrap();
            assert!(whole.iter().all(|v| v.is_finite()));
            let linears = [&q, &kk, &v, &o, &gate, &up, &down];
            for rows in [l, 3 * l] {
                let got = chunked_sequences(rows, (&xs, &masks), (b, l), linears, |x, m, n| {
                    layer.sequences(x, m, table, (n, l, h))
                })
                .unwrap();
                assert!(same_bits(&got, &whole), "{k:?}, chunks of {rows} rows");
            }
        }
    }

    #[test]
    fn raw_buffer_layer_equals_the_composed_layer_with_padding() {
        let dev = Device::Cpu;
        let (b, l, h, inter, heads) = (3, 7, 16, 24, 4);
        let parts = LayerParts::load(&layer_weights(h, inter), Linears::default(), h, inter);
        let x = randn((b, l, h), 0.0, 1.0, 106);
        // Sequences of 7, 4 and 1 real tokens: padded keys must get no weight.
        let mask: Vec<u32> =
            [7, 4, 1].iter().flat_map(|&n| (0..l).map(move |i| u32::from(i < n))).collect();
        let mask = Tensor::from_vec(mask, (b, l), &dev).unwrap();
        let bias = layers::mask_bias(&mask, DType::F32).unwrap();
        for act in [Activation::Gelu, Activation::GeluNew, Activation::Relu, Activation::Silu] {
            let p = parts.layer(act, heads);
            assert!(p.applies(&x, &bias));
            let fast = p.forward(&x, &bias).unwrap();
            let want = composed(&p, &x, &bias);
            let d = crate::testing::max_abs_diff(&fast, &want).unwrap();
            assert!(d < 1e-5, "{act:?}: differs by {d}");
            // Half precision is not this path's to take.
            assert!(!p.applies(&x.to_dtype(DType::BF16).unwrap(), &bias));
        }
    }
}
