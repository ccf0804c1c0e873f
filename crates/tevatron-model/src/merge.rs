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
/// encode` load without PEFT. Written in `out.tmp` and renamed.
pub fn write_merged(base_dir: &Path, adapter_dir: &Path, out: &Path) -> Result<()> {
    let config = ModelConfig::read(&base_dir.join("config.json"))?;
    let adapter = Adapter::load(adapter_dir, &Device::Cpu)?;
    if !adapter.saved_modules.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: a cross-encoder's adapter (PEFT's SEQ_CLS, with its score head): tevatron rerank and annotate take it with --lora_name_or_path; merging it into a standalone folder is not supported",
            adapter_dir.display()
        )));
    }
    let mut tensors = weights::load(base_dir, &[], &Device::Cpu)?;
    merge_into(&mut tensors, &adapter, config.weight_prefixes())?;
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Write { path, source }
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    std::fs::copy(base_dir.join("config.json"), tmp.join("config.json"))
        .map_err(io(&tmp.join("config.json")))?;
    copy_tokenizer_files(base_dir, &tmp)?;
    // The base's sentence-transformers pipeline (pooling, Dense, Normalize), so that the merged
    // folder embeds as the base with the adapter does.
    st_modules::copy(base_dir, &tmp)?;
    weights::save(&tmp.join("model.safetensors"), tensors.into_iter().collect())?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    }
    std::fs::rename(&tmp, out).map_err(io(out))
}
