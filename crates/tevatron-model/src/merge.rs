//! `tevatron merge-lora`: a base model with a LoRA adapter folded in, written as a Hugging Face
//! folder. Apart from `lora` because it needs the model's config, weights and tokenizer files,
//! which `lora` (used by the backbones' layers) must not reach up to.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::config::ModelConfig;
use crate::encoder::copy_tokenizer_files;
use crate::lora::{merge_into, Adapter};
use crate::{st_modules, weights, Error, Result};

/// `tevatron merge-lora`: writes a Hugging Face folder `out` holding the base model of
/// `base_dir` with the adapter of `adapter_dir` folded in (`config.json`, tokenizer files, one
/// `model.safetensors` with the base checkpoint's tensor names and dtypes, and the base's
/// sentence-transformers modules), which transformers, sentence-transformers and `tevatron
/// encode` load without PEFT. Written in a sibling folder `.NAME.tmp` and renamed. An `out`
/// that exists and holds anything is replaced whole only when `replace` says so (everything in
/// it goes); otherwise it is refused, as a training output folder is.
pub fn write_merged(base_dir: &Path, adapter_dir: &Path, out: &Path, replace: bool) -> Result<()> {
    let out = &replaceable(out, &[base_dir, adapter_dir])?;
    let occupied = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if (occupied || out.is_file()) && !replace {
        return Err(Error::Invalid(format!(
            "{} exists and is not empty: give --overwrite_output_dir to replace it whole \
             (everything in it is removed), or another folder",
            out.display()
        )));
    }
    let config = ModelConfig::read(&base_dir.join("config.json"))?;
    let adapter = Adapter::load(adapter_dir, &Device::Cpu)?;
    if let Some(saved) = adapter.saved_modules.keys().min() {
        return Err(Error::Invalid(format!(
            "{}: the adapter saves whole modules beside its LoRA weights ({saved}, PEFT's modules_to_save), and merging them is not supported (a cross-encoder's adapter with its score head: tevatron rerank and annotate take it with --lora_name_or_path)",
            adapter_dir.display()
        )));
    }
    let mut tensors = weights::load(base_dir, &[], &Device::Cpu)?;
    merge_into(&mut tensors, &adapter, config.weight_prefixes())?;
    // A sibling of `out`, so that `merged/` does not put it inside the folder it replaces.
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = out.with_file_name(format!(".{name}.tmp"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Write { path, source }
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let written = (|| {
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        std::fs::copy(base_dir.join("config.json"), tmp.join("config.json"))
            .map_err(io(&tmp.join("config.json")))?;
        copy_tokenizer_files(base_dir, &tmp)?;
        // The base's sentence-transformers pipeline (pooling, Dense, Normalize), so that the
        // merged folder embeds as the base with the adapter does.
        st_modules::copy(base_dir, &tmp)?;
        weights::save(&tmp.join("model.safetensors"), tensors.into_iter().collect())
    })();
    if written.is_err() {
        // Nothing of the old folder is touched yet: only the half-written new one goes.
        let _ = std::fs::remove_dir_all(&tmp);
        return written;
    }
    // From here the new folder is whole: kept under its temporary name if the swap fails.
    if out.is_dir() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    } else if out.exists() {
        std::fs::remove_file(out).map_err(io(out))?;
    }
    std::fs::rename(&tmp, out).map_err(io(out))
}

/// `out` as the folder `write_merged` replaces whole: absolute, its `.` and `..` and trailing
/// separators resolved. Refused when it is the current folder or one holding it (`--output_dir
/// .` deleted everything in the current folder before failing), or when it is or holds one of
/// `inputs` (the base model or the adapter, which replacing it would delete).
fn replaceable(out: &Path, inputs: &[&Path]) -> Result<PathBuf> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Write { path, source }
    };
    let cwd = std::env::current_dir().map_err(io(out))?;
    let mut resolved = PathBuf::new();
    for part in cwd.join(out).components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                resolved.pop();
            }
            other => resolved.push(other),
        }
    }
    // Through symbolic links, as the inputs are compared.
    let real = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let resolved = match (resolved.parent(), resolved.file_name()) {
        (Some(parent), Some(name)) => real(parent).join(name),
        _ => resolved,
    };
    let refuse = |what: String| {
        Err(Error::Invalid(format!(
            "--output_dir {}: {what}; the merged model replaces the folder whole, so name a new one",
            out.display()
        )))
    };
    if resolved.file_name().is_none() || real(&cwd).starts_with(&resolved) {
        return refuse("it is the current folder or holds it".into());
    }
    for input in inputs {
        let input = real(input);
        if input.starts_with(&resolved) {
            return refuse(format!("it is or holds {}", input.display()));
        }
    }
    Ok(resolved)
}
