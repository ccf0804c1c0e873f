//! Data parallelism on ranks that are threads of this process (the collective logic without
//! GPUs): W ranks with cross-rank negatives give the loss and the summed gradients of one
//! process on the union of their batches, for every step strategy; and a training run on two
//! ranks takes the steps of one process with a batch twice as large.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use tevatron_model::testing::{max_abs, max_abs_diff, max_abs_diff_f64, nan_max};
use tevatron_model::{Encoder, EncoderOptions, PaddingSide, Pooling, TextOptions};
use tevatron_train::data::TrainData;
use tevatron_train::dist::{Group, LocalTransport};
use tevatron_train::optim::AdamWConfig;
use tevatron_train::schedule::ScheduleKind;
use tevatron_train::step::{micro_step, Accumulator, Matryoshka, PrefixKl, StepOptions};
use tevatron_train::trainer::{train, TrainConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

/// The trainable variables sorted by name (the optimizer's order, equal on every rank).
fn sorted_vars(enc: &Encoder) -> Vec<candle_core::Var> {
    let map = enc.varmap().unwrap().data().lock().unwrap().clone();
    let mut named: Vec<_> = map.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().map(|(_, v)| v).collect()
}

fn encoder(dtype: DType) -> Encoder {
    let opts = EncoderOptions {
        pooling: Some(Pooling::Mean),
        normalize: Some(true),
        dtype,
        device: Device::Cpu,
        trainable: true,
        disable_dropout: true,
        lora: None,
        score_head: None,
        cpu_products: tevatron_model::CpuProducts::F32,
    };
    Encoder::load(&root().join("tiny/bert"), None, &opts).unwrap()
}

/// Runs `f(rank group)` on `world` threads and returns their results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(Group) -> T + Sync) -> Vec<T> {
    let ranks = LocalTransport::group(world, Duration::from_secs(120));
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|t| {
                let f = &f;
                s.spawn(move || f(Group::new(Arc::new(t))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The step fixture's batch: 3 queries with 2 passages each (made by make_train_step.py).
fn batch() -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let t = candle_core::safetensors::load(root().join("train/step.safetensors"), &Device::Cpu)
        .unwrap();
    let ragged = |ids: &str, lens: &str| {
        let ids = t[ids].to_vec1::<i64>().unwrap();
        let mut at = 0;
        let mut out = Vec::new();
        for n in t[lens].to_vec1::<i64>().unwrap() {
            out.push(ids[at..at + n as usize].iter().map(|&x| x as u32).collect());
            at += n as usize;
        }
        out
    };
    (ragged("query_ids", "query_lens"), ragged("passage_ids", "passage_lens"))
}

/// Loss and gradients (summed over ranks) of the fixture's batch split as `sizes` queries per
/// rank.
fn split_step(sizes: &[usize], opts: &StepOptions) -> (Vec<f64>, Vec<Tensor>) {
    let (queries, passages) = batch();
    let group_size = passages.len() / queries.len();
    let results = on_ranks(sizes.len(), |group| {
        let enc = encoder(DType::F64);
        let start: usize = sizes[..group.rank()].iter().sum();
        let q = &queries[start..start + sizes[group.rank()]];
        let p = &passages[start * group_size..(start + q.len()) * group_size];
        let mut acc = Accumulator::new(sorted_vars(&enc));
        let out = micro_step(&enc, q, p, opts, 1.0, 0, &group, &mut acc).unwrap();
        (out.loss, group.all_reduce_sum(acc.take().unwrap()).unwrap())
    });
    let losses = results.iter().map(|r| r.0).collect();
    (losses, results.into_iter().next().unwrap().1)
}

/// Largest difference between two gradient lists, relative to the largest gradient of `b`
/// (a key bias's gradient is zero in exact arithmetic, so per-tensor scales would compare
/// rounding noise with itself); NaN for a NaN on either side, failing every tolerance.
fn max_rel_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    assert_eq!(a.len(), b.len(), "gradient lists of different lengths");
    let scale = nan_max(b.iter().map(|t| max_abs(t).unwrap()));
    let diff = nan_max(a.iter().zip(b).map(|(x, y)| max_abs_diff_f64(x, y).unwrap()));
    diff / scale
}

#[test]
fn ranks_give_the_loss_and_summed_gradients_of_the_union_batch() {
    let plain = StepOptions {
        temperature: 0.05,
        grad_cache: None,
        checkpointing: false,
        pad_to_multiple_of: 16,
        padding_side: PaddingSide::Right,
        autocast: None,
        gpu_fused_attention: false,
        distillation: None,
        matryoshka: None,
    };
    // Matryoshka widths of the tiny BERT's 32, its loss (and the narrow width's KL from the
    // full width's in-batch scores) on the gathered representations.
    let kl = Some(PrefixKl { weight: 0.5, temperature: 0.05 });
    let matryoshka = Matryoshka { dims: vec![32, 8], weights: vec![1.0, 0.5], normalize: true, kl };
    let strategies = [
        ("grad_cache", StepOptions { grad_cache: Some((1, 2)), ..plain.clone() }),
        ("checkpointing", StepOptions { checkpointing: true, ..plain.clone() }),
        ("matryoshka", StepOptions { matryoshka: Some(matryoshka), ..plain.clone() }),
        ("plain", plain),
    ];
    for (name, opts) in strategies {
        let (one, want) = split_step(&[3], &opts);
        assert!(want.iter().any(|g| g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            > 0.0));
        for sizes in [&[2, 1][..], &[1, 1, 1]] {
            let (losses, got) = split_step(sizes, &opts);
            for loss in &losses {
                assert!(
                    (loss - one[0]).abs() <= 1e-12 * one[0],
                    "{name} {sizes:?}: {loss} vs {}",
                    one[0]
                );
            }
            let d = max_rel_diff(&got, &want);
            assert!(d <= 1e-10, "{name} {sizes:?}: gradients differ by {d:e} (relative)");
        }
    }
}

/// Without the gather a rank's loss would only see its own passages: the gradients would
/// differ. This guards the test above against passing vacuously.
#[test]
fn ranks_without_cross_rank_negatives_would_differ() {
    let opts = StepOptions {
        temperature: 0.05,
        grad_cache: None,
        checkpointing: false,
        pad_to_multiple_of: 16,
        padding_side: PaddingSide::Right,
        autocast: None,
        gpu_fused_attention: false,
        distillation: None,
        matryoshka: None,
    };
    let (_, want) = split_step(&[3], &opts);
    let (queries, passages) = batch();
    let enc = encoder(DType::F64);
    let mut acc = Accumulator::new(sorted_vars(&enc));
    for (range, prange) in [(0..2, 0..4), (2..3, 4..6)] {
        let single = Group::single();
        micro_step(&enc, &queries[range], &passages[prange], &opts, 1.0, 0, &single, &mut acc)
            .unwrap();
    }
    assert!(max_rel_diff(&acc.take().unwrap(), &want) > 1e-3);
}

fn config(out: &Path, batch_size: usize) -> TrainConfig {
    let text = |max_len| TextOptions { max_len, ..TextOptions::default() };
    TrainConfig {
        output_dir: out.to_path_buf(),
        batch_size,
        grad_accum: 1,
        epochs: 2.0,
        max_steps: None,
        schedule: ScheduleKind::Linear,
        learning_rate: 3e-3,
        warmup_steps: 0,
        warmup_ratio: 0.1,
        adam: AdamWConfig::default(),
        max_grad_norm: 1.0,
        seed: 42,
        logging_steps: 1,
        logging_first_step: false,
        save_steps: 2,
        save_total_limit: None,
        save_at_end: true,
        drop_last: false,
        num_workers: 0,
        query_text: text(16),
        passage_text: text(32),
        objective: tevatron_train::trainer::Objective::Retriever,
        step: StepOptions {
            temperature: 0.1,
            grad_cache: None,
            checkpointing: false,
            pad_to_multiple_of: 16,
            padding_side: PaddingSide::Right,
            autocast: None,
            gpu_fused_attention: false,
            distillation: None,
            matryoshka: None,
        },
        args: serde_json::json!({}),
        validation: None,
    }
}

fn run(out: &Path, batch_size: usize, group: &Group) -> Vec<f64> {
    let data =
        TrainData::open(&[root().join("train/tiny.jsonl")], None, &out.join("c"), 2, 42).unwrap();
    let enc = encoder(DType::F32);
    let cfg = config(&out.join("out"), batch_size);
    std::fs::create_dir_all(&cfg.output_dir).unwrap();
    let mut losses = Vec::new();
    train(&enc, &data, &cfg, group, None, &mut |p| losses.push(p.loss)).unwrap();
    losses
}

fn weights(dir: &Path) -> std::collections::BTreeMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn two_ranks_train_as_one_process_with_twice_the_batch() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let want = run(one.path(), 8, &Group::single());
    let got = on_ranks(2, |group| run(two.path(), 4, &group));
    assert_eq!(want.len(), 6, "24 queries, batches of 8, 2 epochs");
    for losses in &got {
        assert_eq!(losses.len(), want.len());
        for (g, w) in losses.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs(), "{losses:?} vs {want:?}");
        }
    }
    let (a, b) = (weights(&one.path().join("out")), weights(&two.path().join("out")));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let initial = weights(&root().join("tiny/bert"));
    let mut moved = 0.0f32;
    for (name, x) in &a {
        let d = max_abs_diff(x, &b[name]).unwrap();
        assert!(d <= 1e-5, "{name} differs by {d}");
        if let Some(w0) = initial.get(name).or_else(|| initial.get(&format!("bert.{name}"))) {
            let m = max_abs_diff(x, w0).unwrap();
            assert!(!m.is_nan(), "{name} is NaN");
            moved = moved.max(m);
        }
    }
    assert!(moved > 1e-3, "training moved no weight");
    // Rank 0 alone wrote the checkpoints and the log, once each.
    let out = two.path().join("out");
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["log_history"].as_array().unwrap().len(), 7);
}
