//! Training learns: the tiny BERT (all weights) and a LoRA adapter on the tiny Llama (base
//! frozen) overfit 24 training groups (the loss falls by more than half within 30 steps),
//! through the library's whole loop (data, sampling, AdamW, schedule).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::{DType, Device};
use tevatron_model::lora::{AdapterSource, LoraConfig, LoraOptions};
use tevatron_model::{Encoder, EncoderOptions, PaddingSide, Pooling, TextOptions};
use tevatron_train::data::TrainData;
use tevatron_train::dist::Group;
use tevatron_train::optim::AdamWConfig;
use tevatron_train::schedule::ScheduleKind;
use tevatron_train::step::StepOptions;
use tevatron_train::trainer::{train, TrainConfig};

/// Trains `model` for 30 full-batch steps on the 24 tiny groups and returns the losses.
fn losses(model: &str, opts: EncoderOptions, learning_rate: f64, append_eos: bool) -> Vec<f64> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
    let dir = tempfile::tempdir().unwrap();
    let encoder = Encoder::load(&root.join("tiny").join(model), None, &opts).unwrap();
    let data =
        TrainData::open(&[root.join("train/tiny.jsonl")], None, &dir.path().join("c"), 2, 42)
            .unwrap();
    let text = |max_len| TextOptions { max_len, append_eos, ..TextOptions::default() };
    let cfg = TrainConfig {
        output_dir: dir.path().join("out"),
        batch_size: 24,
        grad_accum: 1,
        epochs: 30.0,
        max_steps: None,
        schedule: ScheduleKind::Constant,
        learning_rate,
        warmup_steps: 0,
        warmup_ratio: 0.0,
        adam: AdamWConfig::default(),
        max_grad_norm: 1.0,
        seed: 42,
        logging_steps: 1,
        logging_first_step: false,
        save_steps: 0,
        save_total_limit: None,
        save_at_end: false,
        drop_last: false,
        num_workers: 2,
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
    };
    std::fs::create_dir_all(&cfg.output_dir).unwrap();
    let mut losses = Vec::new();
    let state =
        train(&encoder, &data, &cfg, &Group::single(), None, &mut |p| losses.push(p.loss)).unwrap();
    assert_eq!(state.global_step, 30);
    losses
}

fn assert_halves(losses: &[f64]) {
    let first = losses[0];
    let last: f64 = losses[25..].iter().sum::<f64>() / 5.0;
    assert!(last < first / 2.0, "loss {first} -> {last}: {losses:?}");
}

#[test]
fn the_loss_falls_by_half_within_30_steps() {
    let opts = EncoderOptions {
        pooling: Some(Pooling::Mean),
        normalize: Some(true),
        dtype: DType::F32,
        device: Device::Cpu,
        trainable: true,
        disable_dropout: false,
        lora: None,
        score_head: None,
        cpu_products: tevatron_model::CpuProducts::F32,
    };
    assert_halves(&losses("bert", opts, 3e-3, false));
}

#[test]
fn a_lora_adapter_on_a_decoder_learns_too() {
    let lora = LoraOptions {
        source: AdapterSource::Fresh(LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.1,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "down_proj",
                "up_proj",
                "gate_proj",
            ]
            .map(String::from)
            .to_vec(),
            use_rslora: false,
        }),
        merge: false,
        seed: 42,
        base_dtype: None,
    };
    let opts = EncoderOptions {
        pooling: Some(Pooling::Last),
        normalize: Some(true),
        trainable: true,
        lora: Some(lora),
        ..EncoderOptions::default()
    };
    assert_halves(&losses("llama", opts, 1e-2, true));
}
