//! LoRA from the command line on the tiny random Mistral: the Mistral recipe of Tevatron's
//! README (minus the launcher and --deepspeed) trains an adapter saved as PEFT saves it,
//! `tevatron encode --lora_name_or_path` encodes with it merged, a LoRA run resumed from a
//! checkpoint ends with the same adapter bit for bit, and bad adapters are clear errors.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::Path;

use common::{copy_dir, fails_with, names, ok, repo, tevatron};

fn path(p: &str) -> String {
    repo().join(p).to_string_lossy().into_owned()
}

/// Tevatron README's Mistral command, scaled to the tiny model and data.
fn mistral_recipe(dir: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    let cache = dir.join("cache").to_string_lossy().into_owned();
    let (model, data) = (path("testdata/tiny/mistral"), path("testdata/train/tiny.jsonl"));
    let mut args = vec![
        "train",
        "--output_dir",
        out,
        "--model_name_or_path",
        &model,
        "--lora",
        "--lora_target_modules",
        "q_proj,k_proj,v_proj,o_proj,down_proj,up_proj,gate_proj",
        "--save_steps",
        "50",
        "--dataset_name",
        "json",
        "--dataset_path",
        &data,
        "--query_prefix",
        "Query: ",
        "--passage_prefix",
        "Passage: ",
        "--bf16",
        "--pooling",
        "eos",
        "--append_eos_token",
        "--normalize",
        "--temperature",
        "0.01",
        "--per_device_train_batch_size",
        "4",
        "--gradient_checkpointing",
        "--train_group_size",
        "3",
        "--learning_rate",
        "1e-4",
        "--query_max_len",
        "32",
        "--passage_max_len",
        "64",
        "--num_train_epochs",
        "1",
        "--logging_steps",
        "1",
        "--overwrite_output_dir",
        "--gradient_accumulation_steps",
        "2",
        "--dataset_cache_dir",
        &cache,
        "--quiet",
    ];
    args.extend_from_slice(extra);
    tevatron(dir, &args)
}

/// Encodes the toy corpus with `model` (eos pooling, EOS appended, normalized, passage
/// prefix) and returns the `embeddings` tensor's bytes.
fn encode(dir: &Path, model: &str, out: &str, extra: &[&str]) -> Vec<u8> {
    let flags = [
        "--pooling",
        "eos",
        "--append_eos_token",
        "--normalize",
        "--passage_prefix",
        "Passage: ",
        "--quiet",
    ];
    ok(common::encode_toy(dir, model, out, &[&flags[..], extra].concat()));
    embeddings(&std::fs::read(dir.join(out)).unwrap())
}

#[test]
fn the_mistral_recipe_trains_an_adapter_that_encode_merges() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out").to_string_lossy().into_owned();
    ok(mistral_recipe(dir.path(), &out, &[]));
    let files = names(Path::new(&out));
    for f in ["adapter_config.json", "adapter_model.safetensors", "trainer_state.json"] {
        assert!(files.contains(&f.to_string()), "{f} missing from {files:?}");
    }
    assert!(!files.contains(&"model.safetensors".to_string()), "the frozen base is not saved");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&out).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some(16), Some(64.0)));
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 7);
    // 24 rows / 4 = 6 micro-batches, 2 per step: 3 logged steps with a finite loss.
    let losses = common::logged_losses(Path::new(&out));
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");

    let mistral = path("testdata/tiny/mistral");
    let base = encode(dir.path(), &mistral, "base.safetensors", &[]);
    let tuned = encode(dir.path(), &mistral, "tuned.safetensors", &["--lora_name_or_path", &out]);
    assert_ne!(base, tuned, "the trained adapter changed nothing");
}

#[test]
fn a_resumed_lora_run_ends_with_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole").to_string_lossy().into_owned();
    let parts = dir.path().join("parts").to_string_lossy().into_owned();
    let flags = ["--num_train_epochs", "2", "--save_steps", "2"];
    ok(mistral_recipe(dir.path(), &whole, &flags));
    ok(mistral_recipe(dir.path(), &parts, &flags));
    // Keep only checkpoint-2 of the second run and resume from it (no --overwrite_output_dir).
    for f in names(Path::new(&parts)) {
        let p = Path::new(&parts).join(&f);
        if f != "checkpoint-2" {
            if p.is_dir() {
                std::fs::remove_dir_all(p).unwrap();
            } else {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    assert!(names(&Path::new(&parts).join("checkpoint-2"))
        .contains(&"adapter_model.safetensors".to_string()));
    // Repeated flags take their last value: the same recipe without --overwrite_output_dir.
    let out = mistral_recipe(
        dir.path(),
        &parts,
        &[&flags[..], &["--overwrite_output_dir", "false", "--quiet", "false"]].concat(),
    );
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    // It resumed (a run started afresh ends on the same adapter too): it saved after step 2 only.
    let saved = common::saved_steps(&log);
    assert!(log.contains("resuming from") && !saved.is_empty() && saved[0] > 2, "{log}");
    let read = |d: &str| std::fs::read(Path::new(d).join("adapter_model.safetensors")).unwrap();
    assert_eq!(read(&whole), read(&parts), "resumed adapter differs from the uninterrupted one");
}

#[test]
fn bad_adapters_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let llama_lora = path("testdata/tiny/llama-lora");
    // A Llama adapter on Qwen3: same module names, other shapes.
    let qwen3 = path("testdata/tiny/qwen3");
    let corpus = path("testdata/toy/corpus.jsonl");
    let out = tevatron(
        dir.path(),
        &[
            "encode",
            "--model_name_or_path",
            &qwen3,
            "--lora_name_or_path",
            &llama_lora,
            "--dataset_path",
            &corpus,
            "--encode_output_path",
            "x.safetensors",
            "--pooling",
            "eos",
        ],
    );
    fails_with(out, "another base model");
    // Targets that match nothing list the modules there are.
    let out = mistral_recipe(
        dir.path(),
        &dir.path().join("o").to_string_lossy(),
        &["--lora_target_modules", "query,value"],
    );
    let line = fails_with(out, "match no module");
    assert!(line.contains("q_proj") && line.contains("gate_proj"), "{line}");
    // cls pooling with left padding pools a pad token.
    let out = mistral_recipe(
        dir.path(),
        &dir.path().join("o").to_string_lossy(),
        &["--pooling", "cls", "--padding_side", "left"],
    );
    fails_with(out, "--pooling cls with --padding_side left");
    // A rank beyond both sides of every layer (a typo of 16): refused, not an abort when the
    // adapters are allocated.
    let out = mistral_recipe(
        dir.path(),
        &dir.path().join("o").to_string_lossy(),
        &["--lora_r", "1600000000000"],
    );
    fails_with(out, "--lora_r 1600000000000 is larger than the model's hidden size 32");
    assert!(!dir.path().join("x.safetensors").exists());
    // PEFT settings this tool does not apply, each refused by name where they were ignored (a
    // scale per module, a subset of layers, a regular expression, a module saved whole).
    let llama = path("testdata/tiny/llama");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&llama_lora).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let edited = |key: &str, value: serde_json::Value| {
        let ada = dir.path().join(format!("ada-{key}"));
        copy_dir(Path::new(&llama_lora), &ada);
        let mut c = config.clone();
        c[key] = value;
        std::fs::write(ada.join("adapter_config.json"), c.to_string()).unwrap();
        ada.to_string_lossy().into_owned()
    };
    for (key, value, needle) in [
        ("alpha_pattern", serde_json::json!({"q_proj": 32}), "alpha_pattern is not supported"),
        ("rank_pattern", serde_json::json!({"q_proj": 2}), "rank_pattern is not supported"),
        ("layers_to_transform", serde_json::json!([0]), "layers_to_transform is not supported"),
        ("target_modules", serde_json::json!(".*proj"), "is a regular expression"),
    ] {
        let ada = edited(key, value);
        let args = ["encode", "--model_name_or_path", &llama, "--lora_name_or_path", &ada];
        let rest = ["--dataset_path", &corpus, "--encode_output_path", "x.safetensors"];
        fails_with(tevatron(dir.path(), &[&args[..], &rest].concat()), needle);
    }
    // A module saved whole beside a retriever's LoRA weights (it was left out, silently).
    let ada = edited("modules_to_save", serde_json::json!(["embed_tokens"]));
    let weights = Path::new(&ada).join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zeros = vec![0u8; 16];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().collect();
    let table = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &zeros);
    views.push(("base_model.model.embed_tokens.weight".into(), table.unwrap()));
    safetensors::serialize_to_file(views, None, &weights).unwrap();
    let args = ["encode", "--model_name_or_path", &llama, "--lora_name_or_path", &ada];
    let rest = ["--dataset_path", &corpus, "--encode_output_path", "x.safetensors"];
    fails_with(tevatron(dir.path(), &[&args[..], &rest].concat()), "PEFT's modules_to_save");
    // No setting at all (an empty pattern, as PEFT writes by default) changes nothing.
    let ada = edited("alpha_pattern", serde_json::json!({}));
    let args = ["encode", "--model_name_or_path", &llama, "--lora_name_or_path", &ada];
    let rest =
        ["--dataset_path", &corpus, "--encode_output_path", "y.safetensors", "--pooling", "eos"];
    ok(tevatron(dir.path(), &[&args[..], &rest].concat()));
    assert!(!dir.path().join("x.safetensors").exists());
}

/// The `embeddings` tensor of an embeddings file, as raw bytes.
fn embeddings(bytes: &[u8]) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensor("embeddings").unwrap().data().to_vec()
}

/// `tevatron merge-lora` of `base` and `adapter` into `dir/out`.
fn merge_lora(dir: &Path, base: &str, adapter: &str, out: &str) {
    let args = ["merge-lora", "--model_name_or_path", base, "--lora_name_or_path", adapter];
    ok(tevatron(dir, &[&args[..], &["--output_dir", out]].concat()));
}

#[test]
fn merge_lora_writes_a_model_that_encodes_as_the_adapter_does() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = (path("testdata/tiny/llama"), path("testdata/tiny/llama-lora"));
    merge_lora(dir.path(), &base, &adapter, "merged");
    let files = names(&dir.path().join("merged"));
    assert_eq!(
        files,
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    );
    let run = |model: &str, out: &str, extra: &[&str]| encode(dir.path(), model, out, extra);
    let merged = run("merged", "merged.safetensors", &[]);
    let with_adapter = run(&base, "adapter.safetensors", &["--lora_name_or_path", &adapter]);
    let plain = run(&base, "base.safetensors", &[]);
    assert_eq!(merged, with_adapter);
    assert_ne!(merged, plain);
    // Writing into it again is refused (it holds something), and replaces it whole with
    // --overwrite_output_dir; a trailing separator names the same folder (its temporary folder
    // went inside it, and nothing was written).
    let again = ["merge-lora", "--model_name_or_path", &base, "--lora_name_or_path", &adapter];
    let out = tevatron(dir.path(), &[&again[..], &["--output_dir", "merged"]].concat());
    fails_with(out, "exists and is not empty: give --overwrite_output_dir");
    std::fs::write(dir.path().join("merged/notes.txt"), "x").unwrap();
    let replace = ["--output_dir", "merged/", "--overwrite_output_dir"];
    ok(tevatron(dir.path(), &[&again[..], &replace].concat()));
    assert_eq!(names(&dir.path().join("merged")), files);
    assert!(!names(dir.path()).iter().any(|n| n.ends_with(".tmp")));
}

/// An adapter as PEFT before 0.6 wrote it (`adapter_model.bin`, a PyTorch pickle; RepLLaMA's)
/// encodes as the same adapter in safetensors does (it was refused: no adapter_model.safetensors).
#[test]
fn a_pickled_adapter_encodes_as_its_safetensors_copy() {
    let dir = tempfile::tempdir().unwrap();
    let base = path("testdata/tiny/llama");
    let run = |adapter: &str, out: &str| {
        encode(dir.path(), &base, out, &["--lora_name_or_path", &path(adapter)])
    };
    let pickled = run("testdata/tiny/llama-lora-bin", "bin.safetensors");
    assert_eq!(pickled, run("testdata/tiny/llama-lora", "st.safetensors"));
}

/// `merge-lora` replaces its output folder whole: the current folder (`.` deleted everything in
/// it before failing) and a folder holding the base or the adapter are refused, and kept.
#[test]
fn merge_lora_refuses_to_replace_the_current_folder_or_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = path("testdata/tiny/llama");
    copy_dir(&repo().join("testdata/tiny/llama-lora"), &d.join("ada"));
    std::fs::write(d.join("precious.txt"), "mine").unwrap();
    let merge = |out: &str| {
        let args = ["merge-lora", "--model_name_or_path", &base, "--lora_name_or_path", "ada"];
        tevatron(d, &[&args[..], &["--output_dir", out]].concat())
    };
    fails_with(merge("."), "it is the current folder or holds it");
    fails_with(merge(".."), "it is the current folder or holds it");
    fails_with(merge("ada"), "it is or holds");
    fails_with(merge("./ada/"), "it is or holds");
    assert!(d.join("precious.txt").exists() && d.join("ada/adapter_config.json").exists());
    // An adapter holding a NaN, or a rank of 0: refused by name, nothing written (a NaN was
    // merged into the weights and the model written).
    copy_dir(&repo().join("testdata/tiny/llama-lora"), &d.join("nan"));
    let weights = d.join("nan/adapter_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let (name, at) = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (name, view) = st.tensors().into_iter().find(|(n, _)| n.contains("lora_B")).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        (name, view.data().as_ptr() as usize - bytes.as_ptr() as usize)
    };
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&weights, &bytes).unwrap();
    let merge_from = |adapter: &str| {
        let args = ["merge-lora", "--model_name_or_path", &base, "--lora_name_or_path", adapter];
        tevatron(d, &[&args[..], &["--output_dir", "out"]].concat())
    };
    // The module as the message names it: the tensor's name less PEFT's prefixes and `.weight`.
    let module = name.rsplit("model.").next().unwrap().trim_end_matches(".weight").to_string();
    let line = fails_with(merge_from("nan"), "holds NaN or infinite values");
    assert!(line.contains(&module) && line.contains("adapter_model.safetensors"), "{line}");
    copy_dir(&repo().join("testdata/tiny/llama-lora"), &d.join("r0"));
    let config = d.join("r0/adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["r"] = serde_json::json!(0);
    std::fs::write(&config, c.to_string()).unwrap();
    fails_with(merge_from("r0"), "r0/adapter_config.json: r 0 and lora_alpha");
    assert!(!d.join("out").exists());
}

/// LoRA on a sentence-transformers base with Dense modules: the Dense modules stay frozen and
/// apply to what the adapter's backbone pools, and `merge-lora` keeps the base's modules, so the
/// merged folder embeds as the base with the adapter does, at the last Dense module's width.
#[test]
fn lora_on_a_sentence_transformers_base_keeps_its_dense_modules() {
    let dir = tempfile::tempdir().unwrap();
    let base = path("testdata/tiny/bert-st-dense");
    let cache = dir.path().join("cache").to_string_lossy().into_owned();
    let train = path("testdata/train/tiny.jsonl");
    ok(tevatron(
        dir.path(),
        &[
            "train",
            "--output_dir",
            "adapter",
            "--model_name_or_path",
            &base,
            "--dataset_path",
            &train,
            "--dataset_cache_dir",
            &cache,
            "--per_device_train_batch_size",
            "4",
            "--train_group_size",
            "2",
            "--query_max_len",
            "16",
            "--passage_max_len",
            "32",
            "--learning_rate",
            "1e-2",
            "--max_steps",
            "3",
            "--lora",
            "--lora_r",
            "4",
            "--lora_target_modules",
            "query,value",
            "--save_strategy",
            "no",
            "--quiet",
        ],
    ));
    let adapter = dir.path().join("adapter").to_string_lossy().into_owned();
    assert!(!names(Path::new(&adapter)).iter().any(|f| f.contains("Dense")), "frozen, not saved");
    merge_lora(dir.path(), &base, &adapter, "merged");
    let files = names(&dir.path().join("merged"));
    for f in ["modules.json", "1_Pooling", "2_Dense", "3_Dense"] {
        assert!(files.contains(&f.to_string()), "{f} missing from {files:?}");
    }
    // The folder's own pooling and normalisation: no flags.
    let run = |model: &str, out: &str, extra: &[&str]| {
        ok(common::encode_toy(dir.path(), model, out, &[&["--quiet"][..], extra].concat()));
        embeddings(&std::fs::read(dir.path().join(out)).unwrap())
    };
    let merged = run("merged", "merged.safetensors", &[]);
    let with_adapter = run(&base, "adapter.safetensors", &["--lora_name_or_path", &adapter]);
    let plain = run(&base, "base.safetensors", &[]);
    assert_eq!(merged, with_adapter);
    assert_ne!(merged, plain);
    let rows = std::fs::read_to_string(repo().join("testdata/toy/corpus.jsonl")).unwrap();
    assert_eq!(merged.len(), rows.lines().count() * 12 * 4, "the last Dense module's width");
}

/// `add_eos_token` in `tokenizer_config.json` (transformers 4's Llama tokenizer appended an EOS
/// for it; transformers 5, the reference, ignores it): the same embeddings as without it, and a
/// warning that says so and names `--append_eos_token`.
#[test]
fn add_eos_token_in_the_tokenizer_config_is_reported_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copy_dir(&repo().join("testdata/tiny/llama"), &d.join("llama"));
    let config_path = d.join("llama/tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["add_eos_token"] = true.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let flags = ["--pooling", "mean", "--quiet"];
    let flagged = common::encode_toy(d, "llama", "flagged.safetensors", &flags);
    let log = String::from_utf8_lossy(&flagged.stderr).into_owned();
    ok(flagged);
    assert!(log.contains("add_eos_token is set") && log.contains("--append_eos_token"), "{log}");
    let plain = common::encode_toy(d, &path("testdata/tiny/llama"), "plain.safetensors", &flags);
    assert!(!String::from_utf8_lossy(&plain.stderr).contains("add_eos_token"));
    ok(plain);
    let read = |f: &str| embeddings(&std::fs::read(d.join(f)).unwrap());
    assert_eq!(read("flagged.safetensors"), read("plain.safetensors"));
}
