//! Training learns: the tiny BERT overfits 24 training groups (the loss falls by more than
//! half within 30 steps), through the library's whole loop (data, sampling, AdamW, schedule).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::{DType, Device};
use tevatron_model::{Encoder, EncoderOptions, PaddingSide, Pooling, TextOptions};
use tevatron_train::data::TrainData;
use tevatron_train::optim::AdamWConfig;
use tevatron_train::schedule::ScheduleKind;
use tevatron_train::step::StepOptions;
use tevatron_train::trainer::{train, TrainConfig};

#[test]
fn the_loss_falls_by_half_within_30_steps() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
    let dir = tempfile::tempdir().unwrap();
    let opts = EncoderOptions {
        pooling: Some(Pooling::Mean),
        normalize: Some(true),
        dtype: DType::F32,
        device: Device::Cpu,
        trainable: true,
        disable_dropout: false,
    };
    let encoder = Encoder::load(&root.join("tiny/bert"), None, &opts).unwrap();
    let data =
        TrainData::open(&[root.join("train/tiny.jsonl")], None, &dir.path().join("c"), 2, 42)
            .unwrap();
    let text = |max_len| TextOptions { max_len, ..TextOptions::default() };
    let cfg = TrainConfig {
        output_dir: dir.path().join("out"),
        batch_size: 24,
        grad_accum: 1,
        epochs: 30.0,
        max_steps: None,
        schedule: ScheduleKind::Constant,
        learning_rate: 3e-3,
        warmup_steps: 0,
        warmup_ratio: 0.0,
        adam: AdamWConfig::default(),
        max_grad_norm: 1.0,
        seed: 42,
        logging_steps: 1,
        save_steps: 0,
        save_total_limit: None,
        save_at_end: false,
        drop_last: false,
        num_workers: 2,
        query_text: text(16),
        passage_text: text(32),
        step: StepOptions {
            temperature: 0.1,
            grad_cache: None,
            checkpointing: false,
            pad_to_multiple_of: 16,
            padding_side: PaddingSide::Right,
        },
        mixed_precision: None,
        args: serde_json::json!({}),
    };
    std::fs::create_dir_all(&cfg.output_dir).unwrap();
    let mut losses = Vec::new();
    let state = train(&encoder, &data, &cfg, None, &mut |p| losses.push(p.loss)).unwrap();
    assert_eq!(state.global_step, 30);
    let first = losses[0];
    let last: f64 = losses[25..].iter().sum::<f64>() / 5.0;
    assert!(last < first / 2.0, "loss {first} -> {last}: {losses:?}");
}
