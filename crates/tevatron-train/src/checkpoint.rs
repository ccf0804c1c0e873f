//! What a training run writes, in Hugging Face's layout: `trainer_state.json` (with
//! `log_history`), `checkpoint-<step>/` folders holding the model (`config.json`,
//! `model.safetensors`, tokenizer files), the optimizer moments (`optimizer.safetensors`), the
//! scheduler and data position (`scheduler.json`, `rng_state.json`) and the run's arguments
//! (`training_args.json`). Folders are written under a temporary name and renamed, so a crash
//! or a full disk never leaves a half checkpoint under a real name.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tevatron_ir::atomic::AtomicFile;
use tevatron_model::Encoder;

use crate::optim::AdamW;
use crate::{Error, Result};

/// Hugging Face's `TrainerState`, the fields transformers writes (and reads back).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Fractional epoch reached.
    pub epoch: f64,
    /// Optimizer steps taken.
    pub global_step: usize,
    /// Planned optimizer steps.
    pub max_steps: usize,
    /// `--logging_steps`.
    pub logging_steps: usize,
    /// `--save_steps`.
    pub save_steps: usize,
    /// Epochs planned (whole, as HF stores it).
    pub num_train_epochs: usize,
    /// Queries per device per micro-batch.
    pub train_batch_size: usize,
    /// One entry per logging step: `{step, epoch, loss, grad_norm, learning_rate}`, then a
    /// final summary entry.
    pub log_history: Vec<Value>,
    /// The best value of `--metric_for_best_model` so far (null without validation).
    pub best_metric: Option<f64>,
    /// The checkpoint saved at the best evaluation (null without validation).
    pub best_model_checkpoint: Option<String>,
    /// Always true (one process).
    pub is_local_process_zero: bool,
    /// Always true (one process).
    pub is_world_process_zero: bool,
    /// Always false.
    pub is_hyper_param_search: bool,
    /// Not counted.
    pub total_flos: f64,
    /// Not counted.
    pub num_input_tokens_seen: usize,
    /// Running state this tool needs to resume bit-exactly (HF keeps it in memory).
    #[serde(default)]
    pub tevatron: ResumeState,
}

/// The part of the loop's state that lives between logging steps.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ResumeState {
    /// Sum of step losses since the last log entry.
    pub loss_since_log: f64,
    /// Step of the last log entry.
    pub last_logged_step: usize,
    /// Sum of all step losses (for the final `train_loss`).
    pub total_loss: f64,
    /// The run's seed (a resumed run must use the same one).
    pub seed: u64,
    /// fp16 dynamic loss scale (`None` without fp16).
    pub loss_scale: Option<f64>,
    /// Steps since the loss scale last changed.
    pub scale_growth_tracker: usize,
    /// The ranks that trained it (none in checkpoints written before it was recorded): a run
    /// resumed on another count has another global batch and data position.
    #[serde(default)]
    pub world_size: Option<usize>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Writes JSON through a temporary file and a rename ([`AtomicFile`]).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut file = AtomicFile::create(path)?;
    file.writer().write_all(text.as_bytes()).map_err(|e| file.err(e))?;
    file.writer().write_all(b"\n").map_err(|e| file.err(e))?;
    Ok(file.commit()?)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

/// `checkpoint-<step>` folders of `output_dir`, sorted by step.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join("trainer_state.json").is_file().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Saves `checkpoint-<step>` into `output_dir` and removes the oldest checkpoints beyond
/// `limit`. Returns the folder.
pub fn save(
    output_dir: &Path,
    encoder: &Encoder,
    opt: &AdamW,
    state: &TrainerState,
    args: &Value,
    limit: Option<usize>,
) -> Result<PathBuf> {
    let step = state.global_step;
    let final_dir = output_dir.join(format!("checkpoint-{step}"));
    let tmp = output_dir.join(format!(".checkpoint-{step}.tmp"));
    let written = (|| {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        encoder.save_pretrained(&tmp)?;
        let (moments, steps) = opt.state();
        tevatron_model::weights::save(&tmp.join("optimizer.safetensors"), moments)?;
        write_json(&tmp.join("scheduler.json"), &serde_json::json!({ "step": steps }))?;
        write_json(
            &tmp.join("rng_state.json"),
            &serde_json::json!({
                "seed": state.tevatron.seed,
                "global_step": step,
                "note": "dropout, sampling and query order are drawn from streams seeded by (seed, step, ...), so the seed and the step are the whole random state",
            }),
        )?;
        write_json(&tmp.join("training_args.json"), args)?;
        write_json(&tmp.join("trainer_state.json"), state)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // A limit of 0 keeps every checkpoint, as Hugging Face's.
    if let Some(limit) = limit.filter(|&l| l > 0) {
        // The oldest go first, but never the best checkpoint (Hugging Face keeps it too, so
        // a limit of 1 may leave the best and the latest). The best is known by its folder's
        // name: the path recorded may spell the output folder otherwise (`./out`, `out`).
        let best = state.best_model_checkpoint.as_deref().and_then(|b| Path::new(b).file_name());
        let all = list(output_dir);
        let mut excess = all.len().saturating_sub(limit);
        for (_, dir) in all {
            if excess == 0 {
                break;
            }
            if best.is_some() && dir.file_name() == best || dir == final_dir {
                continue;
            }
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
            excess -= 1;
        }
    }
    Ok(final_dir)
}

/// candle's reader, behind the header check it lacks ([`tevatron_ir::safetensors_check`]).
fn load_safetensors(
    path: &Path,
    device: &Device,
) -> candle_core::Result<HashMap<String, candle_core::Tensor>> {
    tevatron_ir::safetensors_check::check_file(path).map_err(candle_core::Error::Msg)?;
    candle_core::safetensors::load(path, device)
}

/// Restores weights (from `weights_file`, the one [`Encoder::weights_file`] names), optimizer
/// moments and the loop state from a checkpoint folder.
pub fn load(
    dir: &Path,
    weights_file: &str,
    prefixes: &[&str],
    opt: &mut AdamW,
) -> Result<TrainerState> {
    let state_path = dir.join("trainer_state.json");
    let state: TrainerState = read_json(&state_path)?;
    if state.tevatron.last_logged_step > state.global_step {
        return Err(Error::Invalid(format!(
            "{}: tevatron.last_logged_step {} is past global_step {}",
            state_path.display(),
            state.tevatron.last_logged_step,
            state.global_step
        )));
    }
    load_weights(dir, weights_file, prefixes, opt)?;
    let bad = |path: &Path, e: candle_core::Error| {
        Error::Invalid(format!("{}: cannot read ({e})", path.display()))
    };
    let device = opt.vars().first().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
    let opt_path = dir.join("optimizer.safetensors");
    let moments = load_safetensors(&opt_path, &device).map_err(|e| bad(&opt_path, e))?;
    let sched: Value = read_json(&dir.join("scheduler.json"))?;
    let steps = sched["step"].as_u64().unwrap_or(state.global_step as u64) as usize;
    opt.load_state(&moments, steps).map_err(|e| bad(&opt_path, e))?;
    Ok(state)
}

/// Sets the trained variables to a checkpoint's weights (`weights_file` of `dir`): the
/// weights half of a resume, and `--load_best_model_at_end`. A variable is found by its name,
/// or by its name after one of the model family's `prefixes` (a cross-encoder saves its base
/// model's weights as `bert.…`, `model.…`); one named `<folder>/<tensor>` (a
/// sentence-transformers Dense module's) in that folder's `model.safetensors`.
pub fn load_weights(dir: &Path, weights_file: &str, prefixes: &[&str], opt: &AdamW) -> Result<()> {
    let bad = |path: &Path, e: candle_core::Error| {
        Error::Invalid(format!("{}: cannot read ({e})", path.display()))
    };
    let device = opt.vars().first().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
    let mut files: HashMap<&str, HashMap<String, candle_core::Tensor>> = HashMap::new();
    for (full_name, var) in opt.named_vars() {
        let (folder, name) = full_name.rsplit_once('/').unwrap_or(("", full_name));
        let model_path = match folder {
            "" => dir.join(weights_file),
            sub => dir.join(sub).join("model.safetensors"),
        };
        if !files.contains_key(folder) {
            let loaded = load_safetensors(&model_path, &device).map_err(|e| bad(&model_path, e))?;
            files.insert(folder, loaded);
        }
        let weights = &files[folder];
        let t = weights
            .get(name)
            .or_else(|| prefixes.iter().find_map(|p| weights.get(&format!("{p}{name}"))))
            .ok_or_else(|| Error::Invalid(format!("{}: no tensor {name}", model_path.display())))?;
        // A tensor of another shape (or a dtype that does not convert) is the file's fault.
        t.to_dtype(var.dtype()).and_then(|t| var.set(&t)).map_err(|e| {
            bad(&model_path, candle_core::Error::Msg(format!("tensor {name}: {e}")))
        })?;
    }
    Ok(())
}

/// Writes the final model into `output_dir` (file by file through a temporary folder).
pub fn save_final(output_dir: &Path, encoder: &Encoder) -> Result<()> {
    let tmp = output_dir.join(".final.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    encoder.save_pretrained(&tmp)?;
    for entry in std::fs::read_dir(&tmp).map_err(io(&tmp))? {
        let entry = entry.map_err(io(&tmp))?;
        let target = output_dir.join(entry.file_name());
        if target.is_dir() {
            std::fs::remove_dir_all(&target).map_err(io(&target))?;
        }
        std::fs::rename(entry.path(), &target).map_err(io(&target))?;
    }
    std::fs::remove_dir_all(&tmp).map_err(io(&tmp))
}
