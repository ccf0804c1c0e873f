//! No input may panic a parser (issue 19): every file a model folder holds gets arbitrary
//! bytes, byte-level mutations of a valid file and JSON-aware mutations (values replaced by
//! zero, negative, huge or wrongly typed ones), and must load or fail within a time bound, with
//! an error that names the file (or, for a config that the weights no longer fit, the folder).
//!
//! Parsers covered here: `config.json` ([`ModelConfig::read`], and through [`Encoder::load`] so
//! that a config that parses but makes no sense cannot panic the model it builds);
//! `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`
//! ([`TextTokenizer::load`], then tokenizing); sentence-transformers' `modules.json` and
//! `1_Pooling/config.json` (through [`Encoder::load`]); `model.safetensors`,
//! `model.safetensors.index.json` and `pytorch_model.bin` ([`weights::load`], with the weights
//! memory-mapped as the `tevatron` binary maps them); a LoRA adapter's `adapter_config.json` and
//! `adapter_model.safetensors` ([`Adapter::load`]).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};

use candle_core::Device;
use proptest::prelude::*;
use tevatron_model::config::ModelConfig;
use tevatron_model::lora::Adapter;
use tevatron_model::mapped::MappedAlloc;
use tevatron_model::testing::tiny_dir;
use tevatron_model::{weights, Encoder, EncoderOptions, Error, TextOptions, TextTokenizer};

#[path = "../../tevatron-ir/tests/fuzz/mod.rs"]
mod fuzz;
use fuzz::{assert_names, bounded, chain, config, inputs, safetensors_inputs, write};

/// As in the `tevatron` binary: weights stay memory-mapped (until the process has used up the
/// mapping slots; later files are read, so both loaders are exercised).
#[global_allocator]
static ALLOC: MappedAlloc = MappedAlloc;

fn names(e: &Error, path: &Path) {
    assert_names(&chain(e), path);
}

fn fixture(model: &str, file: &str) -> Vec<u8> {
    std::fs::read(tiny_dir(model).join(file)).unwrap()
}

/// Copies the fixture folder `model` into `to` (files only).
fn copy_model(model: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(tiny_dir(model)).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Loads the model in `dir` and, when it loads, embeds two texts (a config that parses must
/// also build a model that runs, or fail with an error). Errors must name a path in `dir`.
fn load_and_embed(dir: PathBuf, opts: EncoderOptions) {
    let d = dir.clone();
    let result = bounded("Encoder::load", move || {
        let enc = Encoder::load(&d, None, &opts)?;
        let text = TextOptions { max_len: 8, ..TextOptions::default() };
        enc.embed(&["a dense retriever".to_string(), String::new()], &text, 2).map(|_| ())
    });
    if let Err(e) = result {
        assert_names(&chain(&e), &dir);
    }
}

/// Loads the tokenizer in `dir` and tokenizes a few texts; errors must name `file`.
fn load_tokenizer(dir: PathBuf, file: PathBuf) {
    let result = bounded("TextTokenizer::load", move || {
        let tok = TextTokenizer::load(&dir)?;
        for append_eos in [false, true] {
            let opts = TextOptions { max_len: 6, append_eos, ..TextOptions::default() };
            match tok.prepare(&opts) {
                Ok(p) => {
                    p.tokenize(&["a dense retriever, é 😀".to_string(), String::new()])?;
                }
                // No EOS token: a clear refusal, which names the tokenizer file.
                Err(e) if append_eos => assert!(chain(&e).contains("tokenizer.json"), "{e}"),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        names(&e, &file);
    }
}

fn load_weights(dir: PathBuf, file: PathBuf) {
    let result = bounded("weights::load", move || {
        weights::load(&dir, &["bert."], &Device::Cpu).map(|tensors| {
            // Loaded tensors must be readable.
            for t in tensors.values() {
                let _ = t.flatten_all().and_then(|t| t.to_dtype(candle_core::DType::F32));
            }
        })
    });
    if let Err(e) = result {
        names(&e, &file);
    }
}

/// The tiny BERT as a sentence-transformers folder: the model at its root, mean pooling and
/// normalisation declared by its modules.
const MODULES: &str = r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}, {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}, {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]"#;
const POOLING: &str = r#"{"word_embedding_dimension": 32, "pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false, "pooling_mode_lasttoken": false, "include_prompt": true}"#;

const SPECIAL_TOKENS: &str = r#"{"cls_token": "[CLS]", "eos_token": {"content": "[SEP]", "lstrip": false}, "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"}"#;

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn config_json_never_panics(which in 0..4usize, bytes in inputs(fixture("bert", "config.json")), llama in inputs(fixture("llama", "config.json")), distil in inputs(fixture("distilbert", "config.json")), qwen in inputs(fixture("qwen3", "config.json"))) {
        let bytes = [bytes, llama, distil, qwen][which].clone();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz-config.json");
        write(&path, &bytes);
        let p = path.clone();
        if let Err(e) = bounded("ModelConfig::read", move || ModelConfig::read(&p).map(|_| ())) {
            names(&e, &path);
        }
    }

    #[test]
    fn tokenizer_json_never_panics(which in 0..3usize, bert in inputs(fixture("bert", "tokenizer.json")), llama in inputs(fixture("llama", "tokenizer.json")), xlmr in inputs(fixture("xlm-roberta", "tokenizer.json"))) {
        // WordPiece, BPE, and a Unigram file that is rebuilt as transformers' XLM-R class does.
        let (name, bytes) = [("bert", bert), ("llama", llama), ("xlm-roberta", xlmr)][which].clone();
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        copy_model(name, &model);
        let path = model.join("tokenizer.json");
        write(&path, &bytes);
        load_tokenizer(model, path);
    }

    #[test]
    fn tokenizer_config_json_never_panics(bytes in inputs(fixture("llama", "tokenizer_config.json")), special in inputs(SPECIAL_TOKENS.as_bytes().to_vec()), which in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        copy_model("llama", &model);
        let (name, bytes) = if which {
            ("tokenizer_config.json", bytes)
        } else {
            ("special_tokens_map.json", special)
        };
        let path = model.join(name);
        write(&path, &bytes);
        load_tokenizer(model, path);
    }

    #[test]
    fn sentence_transformers_modules_never_panic(modules in inputs(MODULES.as_bytes().to_vec()), pooling in inputs(POOLING.as_bytes().to_vec()), which in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("st-model");
        copy_model("bert", &model);
        write(&model.join("modules.json"), if which { &modules } else { MODULES.as_bytes() });
        write(&model.join("1_Pooling/config.json"), if which { POOLING.as_bytes() } else { &pooling });
        load_and_embed(model, EncoderOptions::default());
    }

    #[test]
    fn model_safetensors_never_panics(bytes in safetensors_inputs(fixture("bert", "model.safetensors"))) {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        let path = model.join("model.safetensors");
        write(&path, &bytes);
        load_weights(model, path);
    }

    #[test]
    fn sharded_index_never_panics(bytes in inputs(fixture("bert-sharded", "model.safetensors.index.json"))) {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        copy_model("bert-sharded", &model);
        let path = model.join("model.safetensors.index.json");
        write(&path, &bytes);
        let d = model.clone();
        let result = bounded("weights::load", move || weights::load(&d, &["bert."], &Device::Cpu).map(|_| ()));
        if let Err(e) = result {
            // The index, or a shard it names (a mutated name can name another file).
            let text = chain(&e);
            assert!(text.contains(&model.display().to_string()), "the error names no file of {}: {text}", model.display());
        }
    }

    #[test]
    fn pytorch_model_bin_never_panics(bytes in inputs(fixture("bert-pth", "pytorch_model.bin"))) {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        let path = model.join("pytorch_model.bin");
        write(&path, &bytes);
        load_weights(model, path);
    }

    #[test]
    fn lora_adapter_never_panics(config_bytes in inputs(fixture("llama-lora", "adapter_config.json")), weights_bytes in safetensors_inputs(fixture("llama-lora", "adapter_model.safetensors")), which in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let adapter = dir.path().join("adapter");
        copy_model("llama-lora", &adapter);
        let (name, bytes) = if which {
            ("adapter_config.json", config_bytes)
        } else {
            ("adapter_model.safetensors", weights_bytes)
        };
        let path = adapter.join(name);
        write(&path, &bytes);
        let d = adapter.clone();
        let result = bounded("Adapter::load", move || Adapter::load(&d, &Device::Cpu).map(|_| ()));
        if let Err(e) = result {
            names(&e, &path);
        }
    }
}

proptest! {
    // Each case builds and runs a model: fewer of them.
    #![proptest_config(config(48))]

    #[test]
    fn config_json_never_panics_the_model_it_builds(which in any::<bool>(), bert in inputs(fixture("bert", "config.json")), llama in inputs(fixture("llama", "config.json"))) {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        let (name, bytes) = if which { ("bert", bert) } else { ("llama", llama) };
        copy_model(name, &model);
        write(&model.join("config.json"), &bytes);
        let pooling = if which { tevatron_model::Pooling::Cls } else { tevatron_model::Pooling::Last };
        let opts = EncoderOptions { pooling: Some(pooling), normalize: Some(false), ..EncoderOptions::default() };
        load_and_embed(model, opts);
    }
}

/// Offsets that add up to just under 2^64 (random edits do not find them): the weights loader
/// and the adapter loader refuse them, naming the file, instead of overflowing.
#[test]
fn safetensors_offsets_near_u64_max_are_refused() {
    let bytes = fuzz::safetensors_with_offsets_near_u64_max();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let path = model.join("model.safetensors");
    write(&path, &bytes);
    let err = weights::load(&model, &[], &Device::Cpu).map(|_| ()).unwrap_err();
    names(&err, &path);

    let adapter = dir.path().join("adapter");
    copy_model("llama-lora", &adapter);
    let path = adapter.join("adapter_model.safetensors");
    write(&path, &bytes);
    let err = Adapter::load(&adapter, &Device::Cpu).map(|_| ()).unwrap_err();
    names(&err, &path);
}

/// An adapter_config.json that is JSON but not an object: an error naming it (indexing it by
/// key panicked).
#[test]
fn an_adapter_config_that_is_not_an_object_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    copy_model("llama-lora", &adapter);
    let path = adapter.join("adapter_config.json");
    for text in ["[1, 2]", "3", "\"r\"", "true"] {
        write(&path, text.as_bytes());
        let err = Adapter::load(&adapter, &Device::Cpu).map(|_| ()).unwrap_err();
        names(&err, &path);
    }
}

/// A hand-made `pytorch_model.bin` (the zip layout `torch.save` writes) holding one F32 tensor
/// `w` rebuilt by `_rebuild_tensor_v2` from `args` (pickle opcodes after the storage), and
/// `data` as its storage bytes.
fn pth_file(model: &Path, args: &[u8], data: &[u8]) -> PathBuf {
    fn text(s: &str) -> Vec<u8> {
        let mut b = vec![b'X'];
        b.extend((s.len() as u32).to_le_bytes());
        b.extend(s.as_bytes());
        b
    }
    let global = |module: &str, name: &str| format!("c{module}\n{name}\n").into_bytes();
    let mut pickle = vec![0x80, 2, b'}', b'('];
    pickle.extend(text("w"));
    pickle.extend(global("torch._utils", "_rebuild_tensor_v2"));
    pickle.push(b'(');
    // The storage: a persistent id ("storage", FloatStorage, key "0", "cpu", 4 elements).
    pickle.push(b'(');
    pickle.extend(text("storage"));
    pickle.extend(global("torch", "FloatStorage"));
    pickle.extend(text("0"));
    pickle.extend(text("cpu"));
    pickle.extend([b'K', 4, b't', b'Q']);
    pickle.extend(args);
    pickle.extend([b't', b'R', b'u', b'.']);

    std::fs::create_dir_all(model).unwrap();
    let path = model.join("pytorch_model.bin");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in [("archive/data.pkl", &pickle[..]), ("archive/data/0", data)] {
        zip.start_file(name, stored).unwrap();
        std::io::Write::write_all(&mut zip, bytes).unwrap();
    }
    zip.finish().unwrap();
    path
}

/// Pickle opcodes for a tuple of small ints.
fn int_tuple(values: &[i32]) -> Vec<u8> {
    let mut b = vec![b'('];
    for v in values {
        b.push(b'J');
        b.extend(v.to_le_bytes());
    }
    b.push(b't');
    b
}

/// Malformed PyTorch checkpoints that upstream candle's unpickler panicked on, or answered by
/// allocating whatever size they claimed: each is an error naming the file (or, for a tensor
/// whose header cannot be rebuilt, the tensor is skipped as candle skips unsupported ones).
#[test]
fn malformed_pytorch_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let floats: Vec<u8> = [1f32, 2., 3., 4.].iter().flat_map(|v| v.to_le_bytes()).collect();
    let well_formed = |size: &[i32], stride: &[i32]| {
        let mut args = vec![b'J'];
        args.extend(0i32.to_le_bytes());
        args.extend(int_tuple(size));
        args.extend(int_tuple(stride));
        args.extend([0x89, b'}']);
        args
    };

    // The hand-made file itself is right: it loads, with its values.
    let model = dir.path().join("good");
    pth_file(&model, &well_formed(&[2, 2], &[2, 1]), &floats);
    let tensors = weights::load(&model, &[], &Device::Cpu).unwrap();
    let w = tensors["w"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(w, [1., 2., 3., 4.]);

    // Too few arguments to `_rebuild_tensor_v2` (upstream indexed them blindly).
    let model = dir.path().join("short");
    pth_file(&model, &[b'J', 0, 0, 0, 0], &floats);
    let result = bounded("weights::load", move || weights::load(&model, &[], &Device::Cpu));
    assert!(!result.is_ok_and(|t| t.contains_key("w")), "a tensor without its size loaded");

    // A size whose element count overflows: the tensor is not rebuilt.
    let model = dir.path().join("overflow");
    pth_file(&model, &well_formed(&[i32::MAX, i32::MAX, i32::MAX], &[1, 1, 1]), &floats);
    let result = bounded("weights::load", move || weights::load(&model, &[], &Device::Cpu));
    assert!(!result.is_ok_and(|t| t.contains_key("w")), "an overflowing size loaded");

    // A size far beyond the storage the file holds: an error naming the file, not a 4 GB
    // allocation.
    let model = dir.path().join("huge");
    let path = pth_file(&model, &well_formed(&[32768, 32768], &[32768, 1]), &floats);
    let err = bounded("weights::load", move || weights::load(&model, &[], &Device::Cpu))
        .map(|_| ())
        .unwrap_err();
    names(&err, &path);
    assert!(chain(&err).contains("holds 16"), "{}", chain(&err));

    // A LONG1 of more bytes than an i64 has (upstream shifted past 64 bits).
    let model = dir.path().join("long1");
    let mut args = vec![0x8a, 9];
    args.extend([0xff; 9]);
    args.extend(&well_formed(&[2, 2], &[2, 1])[5..]);
    let path = pth_file(&model, &args, &floats);
    let err = bounded("weights::load", move || weights::load(&model, &[], &Device::Cpu))
        .map(|_| ())
        .unwrap_err();
    names(&err, &path);
}
