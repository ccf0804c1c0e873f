//! LoRA against PEFT on the tiny random Llama (`testdata/tiny/llama-lora`, made by
//! `scripts/fixtures/make_tiny_lora.py`): a PEFT adapter loads here; merged, it encodes as
//! PEFT's `merge_and_unload()` model does; unmerged, one training step gives PEFT's loss,
//! grad_norm and per-weight gradients; only adapter weights are trainable; a fresh adapter
//! (B = 0) leaves the base model unchanged; our saved adapter has PEFT's layout and reloads to
//! the same model; finite differences agree with the LoRA gradient; bad adapters and targets
//! are clear errors.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

/// As in the `tevatron` binary: the weights these comparisons run on are memory-mapped.
#[global_allocator]
static ALLOC: tevatron_model::mapped::MappedAlloc = tevatron_model::mapped::MappedAlloc;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use tevatron_model::lora::{AdapterSource, LoraConfig, LoraOptions};
use tevatron_model::testing::{max_abs, max_abs_diff, HIDDEN_ATOL};
use tevatron_model::{Batch, Encoder, EncoderOptions, Mode, Pooling, Training};
use tevatron_train::loss::contrastive;

fn tiny(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny").join(name)
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(tiny("llama-lora").join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

fn batch(ids: &Tensor, mask: &Tensor) -> Batch {
    let ids = ids.to_dtype(DType::U32).unwrap();
    Batch {
        token_type_ids: ids.zeros_like().unwrap(),
        input_ids: ids,
        attention_mask: mask.to_dtype(DType::U32).unwrap(),
    }
}

/// Fresh adapters (r 4, alpha 8) on the named modules.
fn fresh(targets: &[&str], seed: u64) -> LoraOptions {
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
        use_rslora: false,
    };
    LoraOptions { source: AdapterSource::Fresh(config), merge: false, seed, base_dtype: None }
}

fn load(base: &str, lora: Option<LoraOptions>, trainable: bool, dtype: DType) -> Encoder {
    Encoder::load(
        &tiny(base),
        None,
        &EncoderOptions {
            pooling: Some(Pooling::Last),
            normalize: Some(true),
            dtype,
            trainable,
            disable_dropout: true,
            lora,
            ..EncoderOptions::default()
        },
    )
    .unwrap()
}

/// A saved PEFT adapter, merged or trainable.
fn saved(dir: PathBuf, merge: bool) -> LoraOptions {
    LoraOptions { source: AdapterSource::Saved(dir), merge, seed: 0, base_dtype: None }
}

fn left_batch() -> Batch {
    let exp =
        candle_core::safetensors::load(tiny("llama").join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    batch(&exp["input_ids_left"], &exp["attention_mask_left"])
}

#[test]
fn a_peft_adapter_merged_encodes_as_merge_and_unload() {
    let exp = expected();
    let enc = load("llama", Some(saved(tiny("llama-lora"), true)), false, DType::F32);
    let b = left_batch();
    let h = enc.hidden_states(&b, Mode::Eval).unwrap();
    let m = b.attention_mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let d = max_abs_diff(
        &h.broadcast_mul(&m).unwrap(),
        &exp["merged_hidden"].broadcast_mul(&m).unwrap(),
    )
    .unwrap();
    assert!(d <= HIDDEN_ATOL, "merged hidden states differ by {d}");
    let last = h.narrow(1, h.dim(1).unwrap() - 1, 1).unwrap().squeeze(1).unwrap();
    let d = max_abs_diff(&last, &exp["merged_last"]).unwrap();
    assert!(d <= HIDDEN_ATOL, "merged eos pool differs by {d}");
    // And the merge changes the model: the base alone is far from it.
    let base = load("llama", None, false, DType::F32);
    let d = max_abs_diff(&base.hidden_states(&b, Mode::Eval).unwrap(), &h).unwrap();
    assert!(d > 1e-2, "the adapter made no difference ({d})");
}

#[test]
fn one_step_matches_peft_and_only_adapters_train() {
    let exp = expected();
    let enc = load("llama", Some(saved(tiny("llama-lora"), false)), true, DType::F32);
    let q = enc
        .encode(&batch(&exp["q_ids"], &exp["q_mask"]), Mode::Train(&Training::new(None, 0)))
        .unwrap();
    let p = enc
        .encode(&batch(&exp["p_ids"], &exp["p_mask"]), Mode::Train(&Training::new(None, 0)))
        .unwrap();
    let loss = contrastive(&q, &p, 0.01).unwrap();
    let want = exp["loss"].to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(((got - want) / want).abs() < 1e-4, "loss {got} vs PEFT {want}");
    let grads = loss.backward().unwrap();
    let vars = enc.varmap().unwrap().data().lock().unwrap();
    assert_eq!(vars.len(), 20, "2 layers x 5 targets x (A, B): {:?}", vars.keys());
    let mut sq = 0f64;
    for (name, var) in vars.iter() {
        assert!(name.contains(".lora_A.") || name.contains(".lora_B."), "{name} is trainable");
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let want = &exp[&format!("grad.{name}")];
        let scale = max_abs(want).unwrap() as f32;
        let d = max_abs_diff(g, want).unwrap();
        assert!(d <= 1e-4 * scale.max(1.0), "{name}: gradient differs by {d} (scale {scale})");
        sq += f64::from(g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap());
    }
    let want = f64::from(exp["grad_norm"].to_vec1::<f32>().unwrap()[0]);
    assert!((sq.sqrt() - want).abs() / want < 1e-4, "grad_norm {} vs PEFT {want}", sq.sqrt());
}

#[test]
fn a_fresh_adapter_starts_as_the_base_model_and_saves_as_peft_does() {
    let b = left_batch();
    let base = load("llama", None, false, DType::F32);
    let enc = load("llama", Some(fresh(&["q_proj", "v_proj", "down_proj"], 7)), true, DType::F32);
    let want = base.encode(&b, Mode::Eval).unwrap();
    for mode in [Mode::Eval, Mode::Train(&Training::new(None, 0))] {
        let d = max_abs_diff(&enc.encode(&b, mode).unwrap(), &want).unwrap();
        assert!(d <= 1e-6, "B = 0 should leave the model as it was, differs by {d}");
    }
    // Give B values, save, reload as an adapter (merged and not): the same model.
    {
        let vars = enc.varmap().unwrap().data().lock().unwrap();
        for (name, var) in vars.iter() {
            if name.contains("lora_B") {
                var.set(&Tensor::randn(0f32, 0.5, var.shape(), &Device::Cpu).unwrap()).unwrap();
            }
        }
    }
    let trained = enc.encode(&b, Mode::Eval).unwrap();
    let moved = max_abs_diff(&trained, &want).unwrap();
    assert!(moved > 1e-3, "B's values should change the model (by {moved})");
    let dir = tempfile::tempdir().unwrap();
    enc.save_pretrained(dir.path()).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert!(files.contains(&"adapter_config.json".to_string()), "{files:?}");
    assert!(files.contains(&"adapter_model.safetensors".to_string()), "{files:?}");
    assert!(!files.contains(&"model.safetensors".to_string()), "the base is not saved");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    let written =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    // PEFT's names, as the PEFT-made fixture has them.
    let peft = candle_core::safetensors::load(
        tiny("llama-lora").join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for name in written.keys() {
        assert!(peft.contains_key(name), "{name} is not a name PEFT writes");
        assert_eq!(written[name].dims(), peft[name].dims(), "{name}");
    }
    // Both halves of every target were written.
    for target in ["q_proj", "v_proj", "down_proj"] {
        for half in ["lora_A", "lora_B"] {
            let n = written.keys().filter(|k| k.contains(target) && k.contains(half)).count();
            assert!(n > 0, "no {target} {half} written: {:?}", written.keys());
        }
    }
    for merge in [true, false] {
        let again = load("llama", Some(saved(dir.path().to_path_buf(), merge)), false, DType::F32);
        let d = max_abs_diff(&again.encode(&b, Mode::Eval).unwrap(), &trained).unwrap();
        assert!(d <= 1e-5, "reloaded adapter (merge {merge}) differs by {d}");
    }
}

/// A frozen base kept in bf16 (`LoraOptions::base_dtype`, what `train --lora --bf16` does on a
/// GPU) trains as the F32 base does under bf16 autocast, which rounds the weights to bf16 in
/// every product anyway: the same loss and adapter gradients. Outside autocast (validation) the
/// bf16 base multiplies in bf16: close to the F32 base's hidden states, and not equal to them,
/// which shows the weights really are held in bf16.
#[test]
fn a_bf16_base_trains_as_the_f32_base_under_autocast() {
    let exp = expected();
    let (qb, pb) = (batch(&exp["q_ids"], &exp["q_mask"]), batch(&exp["p_ids"], &exp["p_mask"]));
    let run = |base_dtype| {
        let lora = LoraOptions { base_dtype, ..saved(tiny("llama-lora"), false) };
        let enc = load("llama", Some(lora), true, DType::F32);
        let training = Training::new(Some(DType::BF16), 0);
        let q = enc.encode(&qb, Mode::Train(&training)).unwrap();
        let p = enc.encode(&pb, Mode::Train(&training)).unwrap();
        let loss = contrastive(&q, &p, 0.01).unwrap();
        let grads = loss.backward().unwrap();
        let vars = enc.varmap().unwrap().data().lock().unwrap();
        let grads: std::collections::BTreeMap<String, Vec<f32>> = vars
            .iter()
            .map(|(n, v)| {
                let g = grads.get(v.as_tensor()).unwrap();
                (n.clone(), g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            })
            .collect();
        let hidden = enc.hidden_states(&qb, Mode::Eval).unwrap();
        (loss.to_scalar::<f32>().unwrap(), grads, hidden)
    };
    let (loss32, grads32, hidden32) = run(None);
    let (loss16, grads16, hidden16) = run(Some(DType::BF16));
    assert!((loss16 - loss32).abs() <= 1e-6 * loss32.abs(), "loss {loss16} vs {loss32}");
    assert_eq!(grads32.len(), 20);
    assert!(grads32.keys().eq(grads16.keys()), "the two runs train other variables");
    for ((name, a), (_, b)) in grads32.iter().zip(&grads16) {
        let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
        let d = tevatron_model::testing::max_abs_diff_of(a, b);
        assert!(d <= 1e-6 * scale, "{name}: gradients differ by {d}");
    }
    let d = max_abs_diff(&hidden16, &hidden32).unwrap();
    let scale = max_abs(&hidden32).unwrap();
    assert!(
        d > 0.0 && f64::from(d) < 0.05 * scale,
        "bf16 base in inference: differs by {d} (scale {scale})"
    );
}

#[test]
fn lora_gradient_matches_finite_differences() {
    let exp = expected();
    let enc = load("llama", Some(saved(tiny("llama-lora"), false)), true, DType::F64);
    let (qb, pb) = (batch(&exp["q_ids"], &exp["q_mask"]), batch(&exp["p_ids"], &exp["p_mask"]));
    let loss_of = |enc: &Encoder| {
        let q = enc.encode(&qb, Mode::Train(&Training::new(None, 0))).unwrap();
        let p = enc.encode(&pb, Mode::Train(&Training::new(None, 0))).unwrap();
        contrastive(&q, &p, 0.1).unwrap()
    };
    let loss = loss_of(&enc);
    let grads = loss.backward().unwrap();
    let vars = enc.varmap().unwrap().data().lock().unwrap();
    for name in [
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.layers.1.mlp.down_proj.lora_B.weight",
    ] {
        let var = &vars[name];
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let original = var.as_tensor().copy().unwrap();
        for k in [0usize, 5] {
            let eps = 1e-6;
            let mut bumped = original.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let mut at = |delta: f64| {
                bumped[k] = original.flatten_all().unwrap().to_vec1::<f64>().unwrap()[k] + delta;
                let t = Tensor::from_vec(bumped.clone(), original.shape(), &Device::Cpu).unwrap();
                var.set(&t).unwrap();
                loss_of(&enc).to_scalar::<f64>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&original).unwrap();
            let analytic = g.get(k).unwrap().to_scalar::<f64>().unwrap();
            assert!(
                (fd - analytic).abs() <= 1e-6 * analytic.abs().max(1.0),
                "{name}[{k}]: finite difference {fd} vs gradient {analytic}"
            );
        }
    }
}

#[test]
fn bad_targets_and_mismatched_adapters_are_clear_errors() {
    let opts = |lora| EncoderOptions {
        pooling: Some(Pooling::Last),
        trainable: true,
        lora: Some(lora),
        ..EncoderOptions::default()
    };
    let load_err =
        |base: &str, lora| Encoder::load(&tiny(base), None, &opts(lora)).err().unwrap().to_string();
    let err = load_err("llama", fresh(&["query"], 0));
    assert!(err.contains("match no module") && err.contains("q_proj"), "{err}");
    // BERT's own names work there.
    let enc = Encoder::load(&tiny("bert"), None, &opts(fresh(&["query", "value"], 0))).unwrap();
    assert_eq!(enc.varmap().unwrap().data().lock().unwrap().len(), 8);
    // The Llama adapter on Qwen3 (same module names, other shapes).
    let err = load_err("qwen3", saved(tiny("llama-lora"), true));
    assert!(err.contains("another base model"), "{err}");
    // The Llama adapter on BERT (no such modules).
    let err = load_err("bert", saved(tiny("llama-lora"), true));
    assert!(err.contains("another base model") && !err.contains("--lora_target_modules"), "{err}");
}
