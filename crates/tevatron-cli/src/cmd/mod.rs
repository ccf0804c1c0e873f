//! One module per command; each turns its flags into library options and calls the library.

mod annotate;
mod convert;
mod encode;
mod encode_parts;
mod eval;
mod fuse;
mod index;
mod mine;
mod prepare;
mod rerank;
mod search;
mod train;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tevatron_model::encoder::DefaultsSource;
use tevatron_model::lora::{AdapterSource, LoraOptions};
use tevatron_model::{CpuProducts, Encoder, EncoderOptions};

use crate::args::{Cli, Command};

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train::run(&a, false),
        Command::TrainReranker(a) => train::run(&a, true),
        Command::Encode(a) => encode::run(&a),
        Command::Search(a) => search::run(&a),
        Command::Index(a) => index::run(&a),
        Command::Eval(a) => eval::run(&a),
        Command::Convert(a) => convert::run(&a),
        Command::Fuse(a) => fuse::run(&a),
        Command::Mine(a) => mine::run(&a),
        Command::Rerank(a) => rerank::run(&a),
        Command::Annotate(a) => annotate::run(&a),
        Command::Prepare(a) => prepare::run(&a),
        Command::MergeLora(a) => {
            let cache = a.cache_dir.as_deref();
            let base = tevatron_model::hub::resolve_model(&a.model_name_or_path, cache, true)?;
            let adapter = tevatron_model::hub::resolve_adapter(&a.lora_name_or_path, cache)?;
            tevatron_model::merge::write_merged(
                &base,
                &adapter,
                &a.output_dir,
                a.overwrite_output_dir,
            )
            .with_context(|| format!("merging {} into {}", adapter.display(), base.display()))?;
            tracing::info!("merged model written to {}", a.output_dir.display());
            Ok(())
        }
        Command::Plot(a) => {
            let paths = if a.compare.is_empty() {
                if !a.labels.is_empty() {
                    anyhow::bail!("--labels names the runs of --compare, and none was given");
                }
                crate::plot::plot_training(&a.output_dir)?
            } else {
                let runs: Vec<PathBuf> =
                    std::iter::once(a.output_dir.clone()).chain(a.compare.clone()).collect();
                let labels = if a.labels.is_empty() {
                    runs.iter().map(|r| r.display().to_string()).collect()
                } else if a.labels.len() == runs.len() {
                    a.labels.clone()
                } else {
                    anyhow::bail!(
                        "--labels gives {} label(s) for {} runs (OUTPUT_DIR and each of --compare)",
                        a.labels.len(),
                        runs.len()
                    );
                };
                crate::plot::plot_comparison(&runs, &labels)?
            };
            for path in paths {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

/// The `training_args.json` our trainer writes beside a model, or beside the LoRA adapter when
/// one is given (LoRA training writes its record with the adapter), with the folder it was
/// found in; `None` when there is no such record (a model from elsewhere).
pub fn training_record(
    model: Option<&str>,
    adapter: Option<&str>,
    cache_dir: Option<&Path>,
) -> Option<(PathBuf, serde_json::Value)> {
    let dir = match adapter {
        Some(adapter) => tevatron_model::hub::resolve_adapter(adapter, cache_dir).ok()?,
        None => tevatron_model::hub::resolve_model(model?, cache_dir, false).ok()?,
    };
    let text = std::fs::read_to_string(dir.join("training_args.json")).ok()?;
    let args = serde_json::from_str(&text).unwrap_or_default();
    Some((dir, args))
}

/// The widths a model was trained for with `--matryoshka_dims`, read from its training record
/// ([`training_record`]); `None` when there is no record, or it was trained without them.
pub fn matryoshka_widths(
    model: &str,
    adapter: Option<&str>,
    cache_dir: Option<&Path>,
) -> Option<Vec<usize>> {
    let (_, args) = training_record(Some(model), adapter, cache_dir)?;
    let dims: Vec<usize> = args["matryoshka_dims"]
        .as_array()?
        .iter()
        .filter_map(|d| d.as_u64().map(|d| d as usize))
        .collect();
    (!dims.is_empty()).then_some(dims)
}

/// Warns that cutting representations of `width` dimensions to `k` may cost much quality when
/// the model (`what`) was not trained for that width; `k == width` cuts nothing, so no warning.
pub fn warn_untrained_width(k: usize, width: usize, trained: Option<&[usize]>, what: &str) {
    if k == width {
        return;
    }
    match trained {
        Some(dims) if dims.contains(&k) => {}
        Some(dims) => tracing::warn!(
            "--truncate_dim {k}: {what} was trained with --matryoshka_dims {dims:?}, not {k}; \
             a width it was not trained for can lose much of its quality"
        ),
        None => tracing::warn!(
            "--truncate_dim {k}: there is no record that {what} was trained with \
             --matryoshka_dims (tevatron train writes one); the vectors of a model not trained \
             for truncation can lose much of their quality"
        ),
    }
}

/// `--lora_name_or_path` for inference: the adapter folder (or hub id) to merge.
pub fn merged_adapter(name: &str, cache_dir: Option<&Path>) -> Result<LoraOptions> {
    let dir = tevatron_model::hub::resolve_adapter(name, cache_dir)?;
    tracing::info!("merging the LoRA adapter {}", dir.display());
    Ok(LoraOptions { source: AdapterSource::Saved(dir), merge: true, seed: 0, base_dtype: None })
}

/// The device, compute dtype and CPU products of an inference command (encode, rerank,
/// annotate, mine) from `--device`, `--fp16`, `--bf16` and `--int8`, with what the log should
/// say about them:
/// - the device as given, else a GPU when one is visible, except that `--int8` runs on the CPU
///   and takes it by default;
/// - half precision on a GPU. On the CPU, `--bf16` runs the projections as bf16 products where
///   they outrun F32 (AMX-BF16, or AVX-512 BF16 except on Intel's CPUs: `backbone::bf16`; the rest
///   of the model in F32) and computes in F32 elsewhere, as does `--fp16` everywhere: this build has no other half-precision CPU
///   kernels (candle widens each product to F32 and half precision skips the raw-buffer layers;
///   `--bf16` so measured 2.2x slower than F32). The log says which.
pub fn inference_precision(
    device: Option<&str>,
    fp16: bool,
    bf16: bool,
    int8: bool,
) -> Result<(candle_core::Device, candle_core::DType, CpuProducts)> {
    use candle_core::DType;
    if fp16 && bf16 {
        anyhow::bail!("--fp16 and --bf16 are exclusive");
    }
    if int8 && (fp16 || bf16) {
        anyhow::bail!("--int8 is exclusive with --fp16 and --bf16");
    }
    let spec = if int8 { Some(device.unwrap_or("cpu")) } else { device };
    let device = tevatron_model::device::select(spec)?;
    if int8 {
        if !device.is_cpu() {
            anyhow::bail!("--int8 runs on the CPU: not with --device {}", spec.unwrap_or_default());
        }
        let kernels = tevatron_model::backbone::int8::Int8Kernels::detect();
        if kernels.is_simd() {
            tracing::info!("int8 projections on the CPU with the {} kernels", kernels.name());
        } else {
            tracing::warn!(
                "this CPU has none of the int8 kernels' instructions (AVX2, VNNI): --int8 runs \
                 plain loops, likely slower than F32"
            );
        }
        return Ok((device, DType::F32, CpuProducts::Int8));
    }
    let (half, flag) = match (fp16, bf16) {
        (true, _) => (DType::F16, "--fp16"),
        (_, true) => (DType::BF16, "--bf16"),
        _ => return Ok((device, DType::F32, CpuProducts::F32)),
    };
    if device.is_cpu() {
        let kernels = tevatron_model::backbone::bf16::Bf16Kernels::detect().filter(|_| bf16);
        if let Some(kernels) = kernels.filter(|k| k.faster_than_f32()) {
            tracing::info!(
                "--bf16 on the CPU: the projections as bf16 products with {}, the rest in F32",
                kernels.name()
            );
            return Ok((device, DType::F32, CpuProducts::Bf16));
        }
        let why = if kernels.is_some() {
            "this Intel CPU's vdpbf16ps (AVX-512 BF16) does no more multiply-adds a cycle than \
             its F32 FMAs and AMX-BF16 is not usable here"
        } else if bf16 {
            "this CPU has neither AMX-BF16 nor AVX-512 BF16, one of which the bf16 kernels need"
        } else {
            "this build has no fp16 CPU kernels"
        };
        tracing::warn!(
            "{flag} on the CPU computes in F32: {why}, and F32 is the faster path there \
             (docs/encode.md)"
        );
        return Ok((device, DType::F32, CpuProducts::F32));
    }
    Ok((device, half, CpuProducts::F32))
}

/// Resolves `--model_name_or_path` / `--tokenizer_name` (local folders or hub ids), loads the
/// encoder and says where its pooling and normalisation came from.
pub fn load_encoder(
    model: &str,
    tokenizer: Option<&str>,
    cache_dir: Option<&Path>,
    opts: &EncoderOptions,
) -> Result<Encoder> {
    let model_dir = tevatron_model::hub::resolve_model(model, cache_dir, tokenizer.is_none())?;
    let tok_dir = tokenizer
        .map(|t| tevatron_model::hub::resolve_model_tokenizer(t, cache_dir))
        .transpose()?;
    let encoder = Encoder::load(&model_dir, tok_dir.as_deref(), opts)
        .with_context(|| format!("loading model {model}"))?;
    if encoder.is_cross_encoder() {
        return Ok(encoder);
    }
    let prompts = encoder.st_prompts();
    if !prompts.is_empty() {
        let stated: Vec<String> = prompts.iter().map(|(k, v)| format!("{k}: {v:?}")).collect();
        tracing::info!(
            "{model} states sentence-transformers prompts ({}), which are not prepended here: \
             as in Tevatron, only --query_prefix and --passage_prefix are",
            stated.join(", ")
        );
    }
    let (pooling, normalize) = (encoder.pooling().name(), encoder.normalize());
    match encoder.defaults_source() {
        DefaultsSource::SentenceTransformers(what) => tracing::info!("using {what}"),
        DefaultsSource::Tevatron => {
            tracing::info!("using Tevatron's defaults: pooling cls, no normalization")
        }
        DefaultsSource::User => {
            tracing::info!("using pooling {pooling} and normalize {normalize}, as given")
        }
        DefaultsSource::UserAndTevatron { folder } => {
            let set_aside = folder.as_ref().map_or(String::new(), |f| {
                format!(
                    "; the folder's sentence-transformers settings ({f}) apply only when neither \
                     --pooling nor --normalize is given"
                )
            });
            tracing::info!(
                "using pooling {pooling} and normalize {normalize}: the flag given, and \
                 Tevatron's default (pooling cls, normalize false) for the other{set_aside}"
            )
        }
    }
    Ok(encoder)
}
