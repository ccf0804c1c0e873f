//! One training step against PyTorch (testdata/train for BERT and testdata/train/modernbert,
//! made by scripts/fixtures/make_train_step.py), finite differences in f64, every weight receiving a
//! gradient, and GradCache / gradient checkpointing giving the plain step's gradients.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use tevatron_model::collate::length_buckets;
use tevatron_model::testing::{max_abs, max_abs_diff_f64};
use tevatron_model::{Encoder, EncoderOptions, PaddingSide, Pooling};
use tevatron_train::dist::Group;
use tevatron_train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use tevatron_train::step::{
    micro_step, Accumulator, Matryoshka, PrefixKl, StepOptions, BUCKET_COST_TOKENS,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

/// The models with a one-step reference: BERT, and ModernBERT (rotary positions, GeGLU, local
/// attention).
const MODELS: [&str; 2] = ["bert", "modernbert"];

fn encoder(pooling: Pooling, normalize: bool, dtype: DType, dropout: bool) -> Encoder {
    encoder_of("bert", pooling, normalize, dtype, dropout)
}

fn encoder_of(
    model: &str,
    pooling: Pooling,
    normalize: bool,
    dtype: DType,
    dropout: bool,
) -> Encoder {
    let opts = EncoderOptions {
        pooling: Some(pooling),
        normalize: Some(normalize),
        dtype,
        device: Device::Cpu,
        trainable: true,
        disable_dropout: !dropout,
        lora: None,
        score_head: None,
        cpu_products: tevatron_model::CpuProducts::F32,
    };
    Encoder::load(&root().join("tiny").join(model), None, &opts).unwrap()
}

struct Fixture {
    tensors: HashMap<String, Tensor>,
    meta: serde_json::Value,
    queries: Vec<Vec<u32>>,
    passages: Vec<Vec<u32>>,
}

fn ragged(ids: &Tensor, lens: &Tensor) -> Vec<Vec<u32>> {
    let ids = ids.to_vec1::<i64>().unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    for n in lens.to_vec1::<i64>().unwrap() {
        out.push(ids[at..at + n as usize].iter().map(|&x| x as u32).collect());
        at += n as usize;
    }
    out
}

fn fixture() -> Fixture {
    fixture_of("bert")
}

fn fixture_of(model: &str) -> Fixture {
    let dir = if model == "bert" { root().join("train") } else { root().join("train").join(model) };
    let tensors =
        candle_core::safetensors::load(dir.join("step.safetensors"), &Device::Cpu).unwrap();
    let meta =
        serde_json::from_str(&std::fs::read_to_string(dir.join("step.json")).unwrap()).unwrap();
    let queries = ragged(&tensors["query_ids"], &tensors["query_lens"]);
    let passages = ragged(&tensors["passage_ids"], &tensors["passage_lens"]);
    Fixture { tensors, meta, queries, passages }
}

fn opts(temperature: f64) -> StepOptions {
    StepOptions {
        temperature,
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

/// Loss and gradients of one micro-batch, with the optimizer holding the variables.
fn step(enc: &Encoder, f: &Fixture, o: &StepOptions) -> (f64, AdamW, Vec<Tensor>) {
    let vars = enc.varmap().unwrap().data().lock().unwrap().clone().into_iter().collect();
    let cfg = AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() };
    let opt = AdamW::new(vars, cfg).unwrap();
    let mut acc = Accumulator::new(opt.vars().into_iter().cloned().collect());
    let out =
        micro_step(enc, &f.queries, &f.passages, o, 1.0, 0, &Group::single(), &mut acc).unwrap();
    let grads = acc.take().unwrap();
    (out.loss, opt, grads)
}

/// The largest difference relative to the largest magnitude in `b`; NaN or infinite, failing
/// every tolerance, for a NaN on either side or an infinity only one side holds.
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let diff = max_abs_diff_f64(a, b).unwrap();
    // A floor on the scale: some gradients are exactly zero in theory (attention key biases,
    // by softmax's shift invariance) and hold only rounding noise in both frameworks.
    diff / max_abs(b).unwrap().max(1e-4)
}

/// Our f32 step (what training runs) against PyTorch's: loss and grad norm to relative 1e-4.
#[test]
fn f32_loss_and_grad_norm_match_pytorch() {
    for model in MODELS {
        f32_step_matches_pytorch(model);
    }
}

fn f32_step_matches_pytorch(model: &str) {
    let f = fixture_of(model);
    // The CPU step of a model that does not skip padding (ModernBERT here) splits each side by
    // length and puts the outputs back in order, and BERT's layers skip the padding: the
    // fixture's passages must have lengths a split would reorder for the first, and padding
    // for the second, to be checked here.
    let lens: Vec<usize> = f.passages.iter().map(Vec::len).collect();
    let buckets = length_buckets(&lens, opts(1.0).pad_to_multiple_of, BUCKET_COST_TOKENS);
    assert!(buckets.len() > 1, "{model}: the passages are not split by length: {lens:?}");
    assert_ne!(buckets.concat(), (0..lens.len()).collect::<Vec<_>>(), "{model}: split in order");
    for (name, case) in f.meta["cases"].as_object().unwrap() {
        let name = format!("{model} {name}");
        let pooling = Pooling::parse(case["pooling"].as_str().unwrap()).unwrap();
        let normalize = case["normalize"].as_bool().unwrap();
        let t = case["temperature"].as_f64().unwrap();
        let enc = encoder_of(model, pooling, normalize, DType::F32, false);
        let (loss, _, mut grads) = step(&enc, &f, &opts(t));
        let want = case["loss_f32"].as_f64().unwrap();
        assert!((loss - want).abs() <= 1e-4 * want.abs(), "{name}: loss {loss} vs {want}");
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        let want = case["grad_norm_f32"].as_f64().unwrap();
        assert!((norm - want).abs() <= 1e-4 * want, "{name}: grad_norm {norm} vs {want}");
    }
}

/// The same step in f64 against PyTorch in float64: the math is the same to rounding — every
/// gradient, the clipped norm, and every weight after one AdamW update.
#[test]
fn f64_gradients_and_adamw_step_match_pytorch() {
    for model in MODELS {
        f64_step_matches_pytorch(model);
    }
}

/// How close the f64 step comes to PyTorch's float64: the same math to rounding for BERT. For
/// ModernBERT transformers computes rotary positions in float32 even in a float64 model: the
/// tables are cos and sin of F32 angles (its float32 cos/sin differ from ours, correctly
/// rounded, in the last bit of about one entry in twelve), and `apply_rotary_pos_emb` rounds
/// the queries and keys to float32 before rotating them. Measured, the loss then agrees to
/// 1.2e-9 relative and every gradient to 4e-8.
fn f64_tolerances(model: &str) -> (f64, f64) {
    match model {
        "modernbert" => (1e-8, 2e-7),
        _ => (1e-10, 1e-8),
    }
}

fn f64_step_matches_pytorch(model: &str) {
    let f = fixture_of(model);
    let (loss_tol, grad_tol) = f64_tolerances(model);
    for (name, case) in f.meta["cases"].as_object().unwrap() {
        let pooling = Pooling::parse(case["pooling"].as_str().unwrap()).unwrap();
        let normalize = case["normalize"].as_bool().unwrap();
        let t = case["temperature"].as_f64().unwrap();
        let enc = encoder_of(model, pooling, normalize, DType::F64, false);
        let (loss, mut opt, mut grads) = step(&enc, &f, &opts(t));
        let want = case["loss"].as_f64().unwrap();
        let d = (loss - want).abs();
        assert!(d <= loss_tol * want.abs(), "{model} {name}: loss {loss} vs {want}");
        let names: Vec<String> = opt.named_vars().map(|(n, _)| n.to_string()).collect();
        let mut compared = 0;
        for (n, g) in names.iter().zip(&grads) {
            if let Some(w) = f.tensors.get(&format!("{name}.grad.{n}")) {
                let d = max_rel(g, w);
                assert!(d < grad_tol, "{model} {name}: gradient of {n} differs by {d}");
                compared += 1;
            }
        }
        if name == "cls_t1" || name == "mean_t001" {
            assert_eq!(compared, names.len(), "{model} {name}: every gradient is compared");
        }
        let norm = clip_grad_norm(&mut grads, f.meta["max_grad_norm"].as_f64().unwrap()).unwrap();
        let want = case["grad_norm"].as_f64().unwrap();
        assert!((norm - want).abs() <= 1e-8 * want, "{model} {name}: grad_norm {norm} vs {want}");
        if name != "mean_t001" {
            continue;
        }
        // The optimizer on PyTorch's own gradients: Adam's first update is about
        // lr * g / |g|, which would magnify the 1e-8 relative gradient noise of near-zero
        // entries, so the update is checked on identical inputs, tightly.
        let mut torch: Vec<Tensor> =
            names.iter().map(|n| f.tensors[&format!("{name}.grad.{n}")].clone()).collect();
        clip_grad_norm(&mut torch, f.meta["max_grad_norm"].as_f64().unwrap()).unwrap();
        opt.step(&torch, f.meta["lr"].as_f64().unwrap()).unwrap();
        for (n, var) in opt.named_vars() {
            let w = &f.tensors[&format!("{name}.after.{n}")];
            let d = max_abs_diff_f64(var.as_tensor(), w).unwrap();
            assert!(d < 1e-12, "{model} {name}: {n} after AdamW differs by {d}");
        }
    }
}

#[test]
fn every_trainable_weight_receives_a_nonzero_gradient() {
    let f = fixture();
    let enc = encoder(Pooling::Cls, false, DType::F32, true);
    let (_, opt, grads) = step(&enc, &f, &opts(1.0));
    assert!(grads.len() > 30);
    for ((n, _), g) in opt.named_vars().zip(&grads) {
        let total = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(total > 0.0, "{n} received no gradient");
    }
}

/// A `--bf16` step on the CPU (bf16 products on AMX-BF16 or AVX-512 BF16 where the CPU has it, candle's
/// widened products elsewhere) stays near the F32 step: the loss and every gradient within a few
/// bf16 roundings, on every model with a reference step.
#[test]
fn a_bf16_step_on_the_cpu_stays_near_the_f32_step() {
    for model in MODELS {
        let f = fixture_of(model);
        let enc = encoder_of(model, Pooling::Mean, true, DType::F32, false);
        let (loss32, _, grads32) = step(&enc, &f, &opts(0.05));
        let bf16 = StepOptions { autocast: Some(DType::BF16), ..opts(0.05) };
        let (loss16, opt, grads16) = step(&enc, &f, &bf16);
        assert!(
            loss16 != loss32 && (loss16 - loss32).abs() <= 2e-3 * loss32.abs(),
            "{model}: loss {loss16} vs {loss32}"
        );
        for ((n, _), (a, b)) in opt.named_vars().zip(grads16.iter().zip(&grads32)) {
            let r = max_rel(a, b);
            assert!(r <= 3e-2, "{model} {n}: gradients differ by {r} relative");
        }
    }
}

#[test]
fn grad_cache_and_checkpointing_give_the_plain_gradients() {
    for model in MODELS {
        let f = fixture_of(model);
        let enc = encoder_of(model, Pooling::Mean, true, DType::F32, false);
        grad_cache_and_checkpointing_agree(&enc, &f, &opts(0.05));
    }
}

/// The Matryoshka loss (with its self-distillation terms) is a function of the
/// representations alone, so GradCache and checkpointing give its plain gradients too; and it
/// is not the plain loss.
#[test]
fn matryoshka_under_grad_cache_and_checkpointing_gives_the_plain_gradients() {
    let f = fixture_of(MODELS[0]);
    let enc = encoder_of(MODELS[0], Pooling::Mean, true, DType::F32, false);
    let width = enc.hidden_size();
    let kl = Some(PrefixKl { weight: 0.5, temperature: 0.05 });
    let m =
        Matryoshka { dims: vec![width, width / 4], weights: vec![1.0, 0.5], normalize: true, kl };
    let o = StepOptions { matryoshka: Some(m.clone()), ..opts(0.05) };
    grad_cache_and_checkpointing_agree(&enc, &f, &o);
    let (with, _, _) = step(&enc, &f, &o);
    let (without, _, _) = step(&enc, &f, &opts(0.05));
    assert!((with - without).abs() > 1e-3 * without, "{with} vs {without}");
    // The self-distillation term is in the loss too.
    let plain = StepOptions { matryoshka: Some(Matryoshka { kl: None, ..m }), ..opts(0.05) };
    let (no_kl, _, _) = step(&enc, &f, &plain);
    assert!(with - no_kl > 1e-6, "{with} vs {no_kl} without the KL terms");
}

fn grad_cache_and_checkpointing_agree(enc: &Encoder, f: &Fixture, base: &StepOptions) {
    let (loss, _, plain) = step(enc, f, base);
    for (gc, ckpt) in [(Some((1, 2)), false), (None, true), (Some((2, 4)), true)] {
        let o = StepOptions { grad_cache: gc, checkpointing: ckpt, ..base.clone() };
        let (l, opt, grads) = step(enc, f, &o);
        assert!((l - loss).abs() < 1e-6 * loss, "{gc:?} {ckpt}: loss {l} vs {loss}");
        assert_eq!(grads.len(), plain.len());
        for ((a, b), (n, _)) in grads.iter().zip(&plain).zip(opt.named_vars()) {
            let d = max_rel(a, b);
            assert!(d < 1e-5, "{gc:?} {ckpt}: gradient of {n} differs by {d}");
        }
    }
}

/// Autograd through the whole model (embeddings, a transformer layer, mean pooling with
/// normalisation, the loss) agrees with central differences in f64. Every probe is of a weight
/// the loss depends on (a non-zero gradient), so that it cannot compare 0 with 0: of the
/// position table, the last row a token reaches (padding reaches further, but is masked out),
/// and the rows beyond it must get exactly nothing.
#[test]
fn gradients_match_finite_differences_in_f64() {
    let f = fixture();
    let enc = encoder(Pooling::Mean, true, DType::F64, false);
    let o = opts(0.5);
    let (_, opt, grads) = step(&enc, &f, &o);
    let loss_at = || {
        let mut acc = Accumulator::new(Vec::new());
        micro_step(&enc, &f.queries, &f.passages, &o, 1.0, 0, &Group::single(), &mut acc)
            .unwrap()
            .loss
    };
    let probes = [
        "encoder.layer.1.attention.self.query.weight",
        "encoder.layer.1.intermediate.dense.weight",
        "encoder.layer.1.output.LayerNorm.weight",
        "embeddings.position_embeddings.weight",
    ];
    let longest = f.queries.iter().chain(&f.passages).map(Vec::len).max().unwrap();
    let mut checked = 0;
    for ((name, var), g) in opt.named_vars().zip(&grads) {
        if !probes.contains(&name) {
            continue;
        }
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let auto = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mut last = base.len() - 1;
        if name == "embeddings.position_embeddings.weight" {
            let (rows, width) = var.as_tensor().dims2().unwrap();
            assert!(longest < rows, "the fixture's sequences leave position rows unused");
            last = longest * width - 1;
            let unused = &auto[longest * width..];
            assert!(unused.iter().all(|&v| v == 0.0), "a position row no token reaches");
        }
        for i in [0, base.len() / 3, last] {
            let eps = 1e-5;
            let eval = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                loss_at()
            };
            let num = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            let a = auto[i];
            // The differences' rounding is about 1e-11 (a loss near 1, eps 1e-5): the floor
            // leaves that a margin, and a probe must exceed it tenfold to show an error.
            let floor = 1e-9;
            assert!(a.abs() >= 10.0 * floor, "{name}[{i}]: a gradient of {a:e} shows nothing");
            let tol = floor + 1e-5 * a.abs().max(num.abs());
            assert!((a - num).abs() <= tol, "{name}[{i}]: {a} vs {num}");
            checked += 1;
        }
    }
    assert_eq!(checked, probes.len() * 3);
}

/// A distillation step's loss is the KL (plus the weighted contrastive loss) of the batch's own
/// representations against the teacher's scores, and its gradient that loss's.
#[test]
fn a_distillation_step_is_the_kl_of_its_representations() {
    use tevatron_model::collate::collate;
    use tevatron_train::loss::{contrastive, distillation};
    use tevatron_train::step::{step as train_step, Distillation, Inputs};
    let f = fixture();
    let enc = encoder(Pooling::Mean, true, DType::F64, false);
    let teacher = [2.0f32, -1.0, 0.5, 0.25, -3.0, 1.5];
    // The reference: the model's representations with their graph (the training forward,
    // dropout off: candle's fused inference norm has no F64), the loss from them, autograd.
    let reps = |seqs: &[Vec<u32>]| {
        let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let b = collate(&rows, 0, 16, PaddingSide::Right, &Device::Cpu).unwrap();
        let t = tevatron_model::Training::new(None, 0);
        enc.encode(&b, tevatron_model::Mode::Train(&t)).unwrap()
    };
    let (q, p) = (reps(&f.queries), reps(&f.passages));
    let t = Tensor::new(&teacher, &Device::Cpu).unwrap().reshape((3, 2)).unwrap();
    let vars = enc.varmap().unwrap().all_vars();
    for weight in [0.0, 0.5] {
        let d = Distillation {
            student_temperature: 0.1,
            teacher_temperature: 2.0,
            contrastive_weight: weight,
        };
        let o = StepOptions { distillation: Some(d), ..opts(0.05) };
        let reference = (distillation(&q, &p, &t, 0.1, 2.0).unwrap()
            + (contrastive(&q, &p, 0.05).unwrap() * weight).unwrap())
        .unwrap();
        let want = reference.to_scalar::<f64>().unwrap();
        let want_grads = reference.backward().unwrap();
        let mut acc = Accumulator::new(vars.clone());
        let inputs = Inputs::Retriever {
            queries: &f.queries,
            passages: &f.passages,
            teacher: Some(&teacher),
        };
        let out = train_step(&enc, &inputs, &o, 1.0, 0, &Group::single(), &mut acc).unwrap();
        assert!(
            (out.loss - want).abs() <= 1e-10 * want.abs().max(1.0),
            "weight {weight}: {} vs {want}",
            out.loss
        );
        let mut compared = 0;
        for (var, got) in vars.iter().zip(acc.take().unwrap()) {
            let Some(w) = want_grads.get(var.as_tensor()) else { continue };
            let d = max_abs_diff_f64(&got, w).unwrap() / max_abs(w).unwrap().max(1e-6);
            assert!(d <= 1e-8, "weight {weight}: a gradient differs by {d} (relative)");
            compared += 1;
        }
        assert!(compared > 10, "only {compared} gradients compared");
        // Without a teacher the same options train contrastively.
        let plain = Inputs::Retriever { queries: &f.queries, passages: &f.passages, teacher: None };
        let mut acc = Accumulator::new(Vec::new());
        let out = train_step(&enc, &plain, &o, 1.0, 0, &Group::single(), &mut acc).unwrap();
        let c = contrastive(&q, &p, 0.05).unwrap().to_scalar::<f64>().unwrap();
        assert!((out.loss - c).abs() <= 1e-10 * c);
    }
}

/// BERT-family layers skip the padding when training on the CPU (so the step runs each side
/// whole and the step tests above go through the packed layers); ModernBERT's do not.
#[test]
fn bert_family_layers_skip_padding_when_training_on_the_cpu() {
    let training = tevatron_model::backbone::Training::new(None, 0);
    let train = tevatron_model::Mode::Train(&training);
    let bert = encoder_of("bert", Pooling::Cls, true, DType::F32, true);
    assert!(bert.backbone().skips_padding(train));
    assert!(!bert.backbone().skips_padding(tevatron_model::Mode::Eval));
    let modernbert = encoder_of("modernbert", Pooling::Cls, true, DType::F32, true);
    assert!(!modernbert.backbone().skips_padding(train));
}

/// With dropout on, the F32 CPU step (fused ops, byte masks drawn from the stream) and the F64
/// step (composed candle ops, the counter masks every other device computes, a GPU's included)
/// drop the same values: their losses and gradients agree. Both run on the CPU, so both split
/// the batch alike (BERT: each side whole in input order, the F32 layers on the packed real
/// tokens with the padded layout's masks; ModernBERT: length buckets); a GPU, which keeps it
/// whole, draws the same masks where the CPU keeps one part in input order
/// (`scripts/gpu-check.sh` compares such batches on a GPU).
#[test]
fn dropout_drops_the_same_values_on_every_path() {
    for model in MODELS {
        let f = fixture_of(model);
        let o = opts(0.05);
        let (l32, _, g32) = step(&encoder_of(model, Pooling::Cls, true, DType::F32, true), &f, &o);
        let (l64, _, g64) = step(&encoder_of(model, Pooling::Cls, true, DType::F64, true), &f, &o);
        let (quiet, _, _) = step(&encoder_of(model, Pooling::Cls, true, DType::F32, false), &f, &o);
        assert!((l32 - quiet).abs() > 1e-4, "{model}: dropout changed nothing");
        assert!((l32 - l64).abs() <= 1e-5 * l64.abs(), "{model}: loss {l32} (F32) vs {l64} (F64)");
        for (a, b) in g32.iter().zip(&g64) {
            let d = max_rel(&a.to_dtype(DType::F64).unwrap(), b);
            assert!(d <= 1e-3, "{model}: a gradient differs by {d}");
        }
    }
}
