//! One reranker training step against PyTorch (`testdata/train/rerank`, made by
//! `scripts/fixtures/make_rerank_step.py`): Tevatron's listwise loss over groups of pairs on
//! the tiny BERT, Llama and ModernBERT (mean-pooled head) cross-encoders, its value and every gradient in f64, the loss and
//! grad norm in f32 (what training runs), and GradCache and gradient checkpointing giving the
//! plain step's numbers with dropout on.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use tevatron_model::collate::length_buckets;
use tevatron_model::encoder::BatchOptions;
use tevatron_model::testing::{max_abs, max_abs_diff_f64};
use tevatron_model::{Encoder, EncoderOptions, PaddingSide, ScoreHeadOptions};
use tevatron_train::dist::Group;
use tevatron_train::step::{step, Accumulator, Inputs, StepOptions, BUCKET_COST_TOKENS};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn encoder(model: &str, dtype: DType, dropout: bool) -> Encoder {
    let opts = EncoderOptions {
        dtype,
        trainable: true,
        disable_dropout: !dropout,
        score_head: Some(ScoreHeadOptions { init_missing: false, seed: 0 }),
        ..EncoderOptions::default()
    };
    Encoder::load(&root().join("tiny-reranker").join(model), None, &opts).unwrap()
}

struct Fixture {
    tensors: HashMap<String, Tensor>,
    meta: serde_json::Value,
    pairs: Vec<Vec<u32>>,
}

fn fixture(model: &str) -> Fixture {
    let dir = root().join("train/rerank");
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{model}.safetensors")), &Device::Cpu)
            .unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("rerank.json")).unwrap()).unwrap();
    let ids = tensors["ids"].to_vec1::<i64>().unwrap();
    let mut pairs = Vec::new();
    let mut at = 0;
    for n in tensors["lens"].to_vec1::<i64>().unwrap() {
        pairs.push(ids[at..at + n as usize].iter().map(|&x| x as u32).collect());
        at += n as usize;
    }
    Fixture { tensors, meta: meta[model].clone(), pairs }
}

fn opts() -> StepOptions {
    StepOptions {
        temperature: 1.0,
        grad_cache: None,
        checkpointing: false,
        pad_to_multiple_of: 16,
        padding_side: PaddingSide::Right,
        autocast: None,
        gpu_fused_attention: false,
        distillation: None,
        matryoshka: None,
    }
}

/// The trainable variables by name, in name order.
fn sorted_vars(enc: &Encoder) -> Vec<(String, candle_core::Var)> {
    let mut vars: Vec<(String, candle_core::Var)> =
        enc.varmap().unwrap().data().lock().unwrap().clone().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// The loss and each variable's gradient, by variable name.
fn run(enc: &Encoder, pairs: &[Vec<u32>], o: &StepOptions) -> (f64, Vec<(String, Tensor)>) {
    run_typed(enc, pairs, None, o)
}

/// [`run`] with each pair's token types (text pairs).
fn run_typed(
    enc: &Encoder,
    pairs: &[Vec<u32>],
    types: Option<&[Vec<u32>]>,
    o: &StepOptions,
) -> (f64, Vec<(String, Tensor)>) {
    let vars = sorted_vars(enc);
    let mut acc = Accumulator::new(vars.iter().map(|(_, v)| v.clone()).collect());
    let inputs = Inputs::Reranker { pairs, types, group: 3 };
    let out = step(enc, &inputs, o, 1.0, 5, &Group::single(), &mut acc).unwrap();
    let grads = acc.take().unwrap();
    (out.loss, vars.into_iter().map(|(n, _)| n).zip(grads).collect())
}

fn norm(grads: &[(String, Tensor)]) -> f64 {
    grads
        .iter()
        .map(|(_, g)| g.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap())
        .map(|t| t.to_scalar::<f64>().unwrap())
        .sum::<f64>()
        .sqrt()
}

#[test]
fn a_reranker_step_matches_pytorch() {
    for model in ["bert", "llama", "modernbert-mean"] {
        let f = fixture(model);
        // f64: the loss and every gradient, by transformers' weight name.
        let enc = encoder(model, DType::F64, false);
        let (loss, grads) = run(&enc, &f.pairs, &opts());
        // transformers computes the rotary tables (Llama's, ModernBERT's) in f32 even in an f64
        // model, which bounds the agreement there (BERT agrees to rounding).
        let (loss_tol, grad_tol) = if model == "bert" { (1e-9, 1e-6) } else { (1e-7, 5e-6) };
        let want = f.meta["loss"].as_f64().unwrap();
        assert!((loss - want).abs() <= loss_tol * want, "{model}: loss {loss} vs {want}");
        let prefix = enc.config().weight_prefixes()[0];
        for (name, g) in &grads {
            let theirs = f
                .tensors
                .get(&format!("grad.{name}"))
                .or_else(|| f.tensors.get(&format!("grad.{prefix}{name}")))
                .unwrap_or_else(|| panic!("{model}: PyTorch has no gradient for {name}"));
            let d = max_abs_diff_f64(g, theirs).unwrap() / max_abs(theirs).unwrap().max(1e-4);
            assert!(d <= grad_tol, "{model} {name}: gradients differ by {d} (relative)");
        }
        let n_theirs = f.tensors.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(grads.len(), n_theirs, "{model}: every weight PyTorch trains gets a gradient");
        // f32, as training runs: loss and grad norm to relative 1e-4.
        let enc = encoder(model, DType::F32, false);
        let (loss, grads) = run(&enc, &f.pairs, &opts());
        let want = f.meta["loss_f32"].as_f64().unwrap();
        assert!((loss - want).abs() <= 1e-4 * want, "{model}: f32 loss {loss} vs {want}");
        let (got, want) = (norm(&grads), f.meta["grad_norm_f32"].as_f64().unwrap());
        assert!((got - want).abs() <= 1e-4 * want, "{model}: f32 grad norm {got} vs {want}");
    }
}

/// Memory strategies change no number: checkpointing recomputes each layer (and the head)
/// with the masks of the first pass, so with dropout on it equals the plain step, and GradCache
/// with or without it; without dropout GradCache's chunks equal the plain step too (with
/// dropout they draw other masks, one stream per chunk).
#[test]
fn grad_cache_and_checkpointing_give_the_plain_reranker_step() {
    let f = fixture("bert");
    // BERT skips the padding on the CPU (`Backbone::skips_padding`, whatever the dtype), so the
    // trainer keeps the pairs in query order here: the plain step runs them whole, GradCache in
    // chunks in input order. The fixture's pairs have lengths a split by length would reorder,
    // as a model that does not skip padding splits them (checked for the retriever with
    // ModernBERT in step.rs).
    let lens: Vec<usize> = f.pairs.iter().map(Vec::len).collect();
    let buckets = length_buckets(&lens, opts().pad_to_multiple_of, BUCKET_COST_TOKENS);
    assert!(buckets.len() > 1, "the pairs are not split by length: {lens:?}");
    assert_ne!(buckets.concat(), (0..lens.len()).collect::<Vec<_>>(), "split in order");
    let same = |(l1, g1): &(f64, Vec<(String, Tensor)>),
                (l2, g2): &(f64, Vec<(String, Tensor)>),
                what: &str| {
        assert!((l1 - l2).abs() <= 1e-12, "{what}: loss {l1} vs {l2}");
        for ((name, a), (_, b)) in g1.iter().zip(g2) {
            let d = max_abs_diff_f64(a, b).unwrap();
            assert!(d <= 1e-10, "{what} {name}: {d}");
        }
    };
    let with = |gc, ckpt| StepOptions { grad_cache: gc, checkpointing: ckpt, ..opts() };
    let noisy = encoder("bert", DType::F64, true);
    let plain = run(&noisy, &f.pairs, &opts());
    same(&run(&noisy, &f.pairs, &with(None, true)), &plain, "checkpointing, dropout on");
    let chunked = run(&noisy, &f.pairs, &with(Some((1, 2)), false));
    same(
        &run(&noisy, &f.pairs, &with(Some((1, 2)), true)),
        &chunked,
        "GradCache + checkpointing, dropout on",
    );
    let quiet = encoder("bert", DType::F64, false);
    let plain_quiet = run(&quiet, &f.pairs, &opts());
    same(
        &run(&quiet, &f.pairs, &with(Some((1, 4)), false)),
        &plain_quiet,
        "GradCache, dropout off",
    );
    // Dropout is on in the first case: it changed the step.
    assert!((plain_quiet.0 - plain.0).abs() > 1e-6, "dropout changed nothing");
}

/// Text pairs (sentence-transformers' form, `--pair_format pair`) train on their token types:
/// the step's loss is the listwise loss of the scores inference gives the same typed pairs
/// (inference with token types equals transformers: `tevatron-model`'s reranker tests), it
/// differs from the loss of the same ids without types, and GradCache with checkpointing
/// gives the same loss and gradients.
#[test]
fn text_pairs_train_on_their_token_types() {
    let f = fixture("bert");
    let enc = encoder("bert", DType::F64, false);
    // The second half of each pair is its second text.
    let types: Vec<Vec<u32>> = f
        .pairs
        .iter()
        .map(|p| (0..p.len()).map(|i| u32::from(i >= p.len() / 2)).collect())
        .collect();
    let batches = BatchOptions::for_encoding(4, 512, 1, PaddingSide::Right, &Device::Cpu);
    // Inference runs in F32: the same weights, loaded so.
    let scorer = encoder("bert", DType::F32, false);
    let scores = scorer.embed_typed(&f.pairs, Some(&types), &batches).unwrap();
    let want = scores
        .chunks(3)
        .map(|g| {
            let g: Vec<f64> = g.iter().map(|&s| f64::from(s)).collect();
            let max = g.iter().cloned().fold(f64::MIN, f64::max);
            max + g.iter().map(|s| (s - max).exp()).sum::<f64>().ln() - g[0]
        })
        .sum::<f64>()
        / (scores.len() / 3) as f64;
    let typed = run_typed(&enc, &f.pairs, Some(&types), &opts());
    // The scores are F32's: agreement to its rounding.
    assert!((typed.0 - want).abs() <= 1e-5 * want, "loss {} vs {want} from inference", typed.0);
    let (untyped, _) = run(&enc, &f.pairs, &opts());
    assert!((typed.0 - untyped).abs() > 1e-5, "the token types changed nothing: {untyped}");
    let o = StepOptions { grad_cache: Some((1, 2)), checkpointing: true, ..opts() };
    let (loss, grads) = run_typed(&enc, &f.pairs, Some(&types), &o);
    assert!((loss - typed.0).abs() <= 1e-12, "GradCache: loss {loss} vs {}", typed.0);
    for ((name, a), (_, b)) in grads.iter().zip(&typed.1) {
        let d = max_abs_diff_f64(a, b).unwrap();
        assert!(d <= 1e-10, "GradCache {name}: {d}");
    }
}

/// Two ranks, one group each, give the one-rank step's loss and (summed) gradients: the
/// listwise loss is over every rank's groups, as DDP's averaged gradients are for Tevatron.
#[test]
fn two_ranks_give_the_one_rank_reranker_step() {
    use std::sync::Arc;
    use tevatron_train::dist::LocalTransport;
    let f = fixture("bert");
    let (loss, single) = run(&encoder("bert", DType::F64, false), &f.pairs, &opts());
    let ranks = LocalTransport::group(2, std::time::Duration::from_secs(120));
    let results: Vec<(f64, Vec<Tensor>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|t| {
                let pairs = &f.pairs;
                s.spawn(move || {
                    let group = Group::new(Arc::new(t));
                    let enc = encoder("bert", DType::F64, false);
                    let vars = sorted_vars(&enc).into_iter().map(|(_, v)| v).collect();
                    let mut acc = Accumulator::new(vars);
                    let mine = &pairs[group.rank() * 3..(group.rank() + 1) * 3];
                    let inputs = Inputs::Reranker { pairs: mine, types: None, group: 3 };
                    let out = step(&enc, &inputs, &opts(), 1.0, 5, &group, &mut acc).unwrap();
                    (out.loss, group.all_reduce_sum(acc.take().unwrap()).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (l, grads) in &results {
        assert!((l - loss).abs() <= 1e-12, "rank loss {l} vs {loss}");
        for ((name, want), got) in single.iter().zip(grads) {
            let d = max_abs_diff_f64(got, want).unwrap();
            assert!(d <= 1e-12, "{name}: {d}");
        }
    }
}
