//! Decoder LLMs against transformers on the committed tiny random Llama 3, Mistral, Qwen2 and
//! Qwen3 (`testdata/tiny`, made by `scripts/fixtures/make_tiny_decoders.py`): Tevatron's
//! tokenization with an appended EOS and the pad token falling back to EOS, hidden states and
//! eos/last and mean pools with right and left padding; plus Train == Eval without dropout and
//! a gradient for every weight.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

/// As in the `tevatron` binary: the weights these comparisons run on are memory-mapped.
#[global_allocator]
static ALLOC: tevatron_model::mapped::MappedAlloc = tevatron_model::mapped::MappedAlloc;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use tevatron_model::collate::collate;
use tevatron_model::testing::{load_tiny, max_abs_diff, tiny_dir, HIDDEN_ATOL};
use tevatron_model::{EncoderOptions, Mode, PaddingSide, Pooling, TextOptions, Training};

const MODELS: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

fn expected(name: &str) -> (serde_json::Value, HashMap<String, Tensor>) {
    let json = std::fs::read_to_string(tiny_dir(name).join("expected.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(tiny_dir(name).join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    (serde_json::from_str(&json).unwrap(), tensors)
}

fn batch(exp: &HashMap<String, Tensor>, side: &str) -> tevatron_model::Batch {
    let ids = exp[&format!("input_ids_{side}")].to_dtype(DType::U32).unwrap();
    tevatron_model::Batch {
        token_type_ids: ids.zeros_like().unwrap(),
        input_ids: ids,
        attention_mask: exp[&format!("attention_mask_{side}")].to_dtype(DType::U32).unwrap(),
    }
}

/// Hidden states compared on real tokens only: transformers' rows for padding queries are
/// attention over nothing, which no pooling reads.
fn masked_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    max_abs_diff(&a.broadcast_mul(&m).unwrap(), &b.broadcast_mul(&m).unwrap()).unwrap()
}

#[test]
fn tokenization_appends_eos_and_pads_with_it() {
    for name in MODELS {
        let (exp, tensors) = expected(name);
        let texts: Vec<String> = serde_json::from_value(exp["texts"].clone()).unwrap();
        let want: Vec<Vec<u32>> = serde_json::from_value(exp["ids_append_eos"].clone()).unwrap();
        let enc = load_tiny(name, Pooling::Last, EncoderOptions::default());
        let max_len = exp["max_len"].as_u64().unwrap() as usize;
        let opts = TextOptions { max_len, append_eos: true, ..TextOptions::default() };
        let got = enc.tokenizer().prepare(&opts).unwrap().tokenize(&texts).unwrap();
        assert_eq!(got, want, "{name}");
        // No pad token in the tokenizer: padding uses EOS, as Tevatron sets it.
        assert_eq!(enc.tokenizer().pad_id() as u64, exp["eos_id"].as_u64().unwrap(), "{name}");
        for (side, padding) in [("right", PaddingSide::Right), ("left", PaddingSide::Left)] {
            let rows: Vec<&[u32]> = got.iter().map(Vec::as_slice).collect();
            let ours = collate(&rows, enc.tokenizer().pad_id(), 16, padding, &Device::Cpu).unwrap();
            let theirs = batch(&tensors, side);
            assert_eq!(
                ours.input_ids.to_vec2::<u32>().unwrap(),
                theirs.input_ids.to_vec2::<u32>().unwrap(),
                "{name} {side}"
            );
        }
    }
}

#[test]
fn hidden_states_and_pools_match_transformers_with_either_padding() {
    for name in MODELS {
        let (_, exp) = expected(name);
        for side in ["right", "left"] {
            let b = batch(&exp, side);
            for (pooling, key) in [(Pooling::Last, "pooled_last"), (Pooling::Mean, "pooled_mean")] {
                let enc = load_tiny(name, pooling, EncoderOptions::default());
                let h = enc.hidden_states(&b, Mode::Eval).unwrap();
                let want = &exp[&format!("last_hidden_state_{side}")];
                let d = masked_diff(&h, want, &b.attention_mask);
                assert!(d <= HIDDEN_ATOL, "{name} {side}: hidden states differ by {d}");
                let p = enc.encode(&b, Mode::Eval).unwrap();
                let d = max_abs_diff(&p, &exp[&format!("{key}_{side}")]).unwrap();
                assert!(d <= HIDDEN_ATOL, "{name} {side}: {key} differs by {d}");
            }
        }
    }
}

#[test]
fn train_mode_equals_eval_and_every_weight_gets_a_gradient() {
    for name in MODELS {
        let (_, exp) = expected(name);
        let b = batch(&exp, "left");
        let opts =
            EncoderOptions { trainable: true, disable_dropout: true, ..EncoderOptions::default() };
        let enc = load_tiny(name, Pooling::Last, opts);
        let train = enc.encode(&b, Mode::Train(&Training::new(None, 0))).unwrap();
        let eval = enc.encode(&b, Mode::Eval).unwrap();
        let d = max_abs_diff(&train, &eval).unwrap();
        assert!(d <= 1e-5, "{name}: train vs eval differ by {d}");

        let w = Tensor::arange(0f32, train.dim(1).unwrap() as f32, &Device::Cpu).unwrap();
        let loss = train.broadcast_mul(&w).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let data = enc.varmap().unwrap().data().lock().unwrap();
        assert!(data.len() >= 20, "{name}: only {} variables", data.len());
        for (n, var) in data.iter() {
            let g =
                grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{name}: zero gradient for {n}");
        }
    }
}
