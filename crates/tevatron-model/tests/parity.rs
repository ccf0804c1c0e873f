//! Parity with transformers on the committed tiny random models (`testdata/tiny`, made by
//! `scripts/fixtures/make_tiny.py`): tokenization, hidden states and every pooling; plus the
//! invariants batch == single, Train-without-dropout == Eval, and gradients reaching every weight.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

/// As in the `tevatron` binary: the weights these comparisons run on are memory-mapped.
#[global_allocator]
static ALLOC: tevatron_model::mapped::MappedAlloc = tevatron_model::mapped::MappedAlloc;

use candle_core::{DType, Device, Tensor};
use tevatron_model::collate::collate;
use tevatron_model::encoder::BatchOptions;
use tevatron_model::testing::{load_tiny, max_abs_diff, max_abs_diff_of, tiny_dir, HIDDEN_ATOL};
use tevatron_model::{EncoderOptions, Mode, PaddingSide, Pooling, TextOptions, Training};

const MODELS: [&str; 5] = ["bert", "roberta", "xlm-roberta", "distilbert", "modernbert"];

fn expected_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(tiny_dir(name).join("expected.json")).unwrap())
        .unwrap()
}

fn expected_tensors(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(tiny_dir(name).join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

/// The fixture's padded batch, as transformers saw it, with the expected tensors.
fn expected_batch(
    name: &str,
) -> (std::collections::HashMap<String, Tensor>, tevatron_model::Batch) {
    let exp = expected_tensors(name);
    let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let batch = tevatron_model::Batch {
        token_type_ids: ids.zeros_like().unwrap(),
        input_ids: ids,
        attention_mask: exp["attention_mask"].to_dtype(DType::U32).unwrap(),
    };
    (exp, batch)
}

fn ids_of(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect()
}

#[test]
fn tokenization_matches_transformers() {
    for name in MODELS {
        let exp = expected_json(name);
        let texts: Vec<String> = exp["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        let enc = load_tiny(name, Pooling::Cls, EncoderOptions::default());
        let max_len = exp["max_len"].as_u64().unwrap() as usize;
        let opts = TextOptions { max_len, ..TextOptions::default() };
        let got = enc.tokenizer().prepare(&opts).unwrap().tokenize(&texts).unwrap();
        assert_eq!(got, ids_of(&exp["ids"]), "{name}");
        assert_eq!(enc.tokenizer().pad_id() as u64, exp["pad_id"].as_u64().unwrap(), "{name}");
        if let Some(eos) = exp.get("ids_append_eos") {
            let opts = TextOptions { append_eos: true, ..opts };
            let got = enc.tokenizer().prepare(&opts).unwrap().tokenize(&texts).unwrap();
            assert_eq!(got, ids_of(eos), "{name} append_eos");
        }
    }
}

#[test]
fn hidden_states_and_pools_match_transformers() {
    for name in MODELS {
        let (exp, batch) = expected_batch(name);
        // Our collator must produce exactly the padded batch transformers saw.
        let seqs = ids_of(&expected_json(name)["ids"]);
        let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let pad = expected_json(name)["pad_id"].as_u64().unwrap() as u32;
        let ours = collate(&rows, pad, 16, PaddingSide::Right, &Device::Cpu).unwrap();
        assert_eq!(
            ours.input_ids.to_vec2::<u32>().unwrap(),
            batch.input_ids.to_vec2::<u32>().unwrap()
        );
        for (pooling, key) in [
            (Pooling::Cls, "pooled_cls"),
            (Pooling::Mean, "pooled_mean"),
            (Pooling::Last, "pooled_last"),
        ] {
            let enc = load_tiny(name, pooling, EncoderOptions::default());
            let h = enc.hidden_states(&batch, Mode::Eval).unwrap();
            let d = max_abs_diff(&h, &exp["last_hidden_state"]).unwrap();
            assert!(d <= HIDDEN_ATOL, "{name} hidden states differ by {d}");
            let p = enc.encode(&batch, Mode::Eval).unwrap();
            let d = max_abs_diff(&p, &exp[key]).unwrap();
            assert!(d <= HIDDEN_ATOL, "{name} {key} differs by {d}");
        }
    }
}

#[test]
fn batch_equals_single() {
    for name in MODELS {
        let enc = load_tiny(name, Pooling::Mean, EncoderOptions::default());
        let seqs = ids_of(&expected_json(name)["ids"]);
        let opts = BatchOptions {
            batch_size: 64,
            token_budget: 1 << 20,
            pad_to_multiple_of: 16,
            padding_side: PaddingSide::Right,
        };
        let batched = enc.embed_sequences(&seqs, &opts).unwrap();
        let single = enc.embed_sequences(&seqs, &BatchOptions { batch_size: 1, ..opts }).unwrap();
        let d = max_abs_diff_of(&batched, &single);
        assert!(d <= HIDDEN_ATOL, "{name}: batched vs single differ by {d}");
    }
}

#[test]
fn train_mode_without_dropout_equals_eval() {
    for name in MODELS {
        let opts =
            EncoderOptions { trainable: true, disable_dropout: true, ..EncoderOptions::default() };
        let enc = load_tiny(name, Pooling::Mean, opts);
        let (_, batch) = expected_batch(name);
        let train = enc.encode(&batch, Mode::Train(&Training::new(None, 0))).unwrap();
        let eval = enc.encode(&batch, Mode::Eval).unwrap();
        let d = max_abs_diff(&train, &eval).unwrap();
        assert!(d <= 1e-5, "{name}: train vs eval differ by {d}");
    }
}

#[test]
fn every_weight_receives_a_gradient_in_train_mode() {
    for name in MODELS {
        for pooling in [Pooling::Cls, Pooling::Mean] {
            let enc = load_tiny(
                name,
                pooling,
                EncoderOptions { trainable: true, ..EncoderOptions::default() },
            );
            let (_, batch) = expected_batch(name);
            let reps = enc.encode(&batch, Mode::Train(&Training::new(None, 0))).unwrap();
            // A loss that depends on every output coordinate.
            let w = Tensor::arange(0f32, reps.dim(1).unwrap() as f32, &Device::Cpu).unwrap();
            let loss = reps.broadcast_mul(&w).unwrap().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let data = enc.varmap().unwrap().data().lock().unwrap();
            assert!(data.len() > 10, "{name}: only {} variables", data.len());
            for (n, var) in data.iter() {
                // Position rows beyond the batch length and unused vocabulary rows get no
                // gradient by construction; the table as a whole must.
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
                let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(norm > 0.0, "{name} {pooling:?}: zero gradient for {n}");
            }
        }
    }
}

/// `embed` embeds what the tokenizer makes of the texts under every text option: a prefix, a
/// shorter `max_len`, an appended EOS, no special tokens. Each of them changes the ids and the
/// embeddings, so an option dropped on the way from `embed` to the tokenizer would show.
#[test]
fn text_options_flow_through_embed() {
    let enc = load_tiny("roberta", Pooling::Last, EncoderOptions::default());
    let texts = vec!["what is a dense retriever".to_string(), "a second text".to_string()];
    let base = TextOptions { max_len: 12, ..TextOptions::default() };
    let ids = |o: &TextOptions| enc.tokenizer().prepare(o).unwrap().tokenize(&texts).unwrap();
    let single = BatchOptions {
        batch_size: 1,
        token_budget: 1 << 20,
        pad_to_multiple_of: 16,
        padding_side: PaddingSide::Right,
    };
    let plain = enc.embed(&texts, &base, 8).unwrap();
    assert_eq!(plain.len(), 2 * 32);
    for o in [
        TextOptions { prefix: "the ".into(), ..base.clone() },
        TextOptions { max_len: 4, ..base.clone() },
        TextOptions { append_eos: true, ..base.clone() },
        TextOptions { add_special_tokens: false, ..base.clone() },
    ] {
        let seqs = ids(&o);
        assert_ne!(seqs, ids(&base), "{o:?} changes the ids");
        let got = enc.embed(&texts, &o, 8).unwrap();
        let d = max_abs_diff_of(&got, &enc.embed_sequences(&seqs, &single).unwrap());
        assert!(d <= HIDDEN_ATOL, "{o:?}: embed differs from its ids' embedding by {d}");
        let moved = max_abs_diff_of(&got, &plain);
        assert!(moved > 100.0 * HIDDEN_ATOL, "{o:?} leaves the embedding as it was: {moved}");
    }
}

#[test]
fn every_checkpoint_layout_loads_the_same_model() {
    // pytorch_model.bin, sharded safetensors + index, and `bert.`-prefixed names (make_tiny.py).
    let (exp, batch) = expected_batch("bert");
    for layout in ["bert-pth", "bert-sharded", "bert-prefixed"] {
        let enc = load_tiny(layout, Pooling::Cls, EncoderOptions::default());
        let h = enc.hidden_states(&batch, Mode::Eval).unwrap();
        let d = max_abs_diff(&h, &exp["last_hidden_state"]).unwrap();
        assert!(d <= HIDDEN_ATOL, "{layout}: hidden states differ by {d}");
    }
}
