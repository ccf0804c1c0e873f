//! LoRA adapters as PEFT writes them: `adapter_config.json` plus `adapter_model.safetensors`
//! with tensors named `base_model.model.<module>.lora_A.weight` `(r, in)` and `.lora_B.weight`
//! `(out, r)`. A targeted linear layer computes `x W^T + b + (alpha / r) * dropout(x) A^T B^T`.
//!
//! Three uses: training a fresh adapter (A drawn as PEFT draws it, B zero, so the model starts
//! equal to its base), continuing from a saved one, and folding one into the base weights for
//! inference (`W + (alpha / r) B A`, what PEFT's `merge_and_unload` computes).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The adapter settings PEFT stores in `adapter_config.json` (the fields this tool uses).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Scale numerator: the update is multiplied by `lora_alpha / r`.
    pub lora_alpha: f64,
    /// Dropout on the adapter's input while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names (or name suffixes) that get an adapter, PEFT's matching rule.
    pub target_modules: Vec<String>,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
}

impl LoraConfig {
    /// `lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA).
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// PEFT's rule: a module is targeted when its name equals a target or ends with
    /// `.<target>`.
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|t| module == t || module.ends_with(&format!(".{t}")))
    }
}

/// Where an encoder's adapters come from.
#[derive(Clone, Debug)]
pub enum AdapterSource {
    /// New adapters with these settings (A drawn from the seed, B zero).
    Fresh(LoraConfig),
    /// A PEFT adapter folder; its own `adapter_config.json` gives the settings.
    Saved(PathBuf),
}

/// How an encoder uses LoRA.
#[derive(Clone, Debug)]
pub struct LoraOptions {
    /// Fresh adapters, or a saved one to continue from (training) or to merge (inference).
    pub source: AdapterSource,
    /// Fold the adapter into the base weights instead of keeping it trainable.
    pub merge: bool,
    /// Seed of a fresh adapter's A matrices.
    pub seed: u64,
    /// While training adapters, keep the frozen base weights of the targeted modules in this
    /// dtype instead of the compute dtype: the autocast dtype under `--bf16`/`--fp16` on a GPU,
    /// as Tevatron loads the base in half precision there. Products with them run in that
    /// dtype either way (autocast casts the weights to it), so only memory changes.
    pub base_dtype: Option<DType>,
}

/// The name PEFT gives a module's adapter tensor.
pub fn peft_name(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// A saved adapter: its settings, the `(A, B)` pair of each module, and the whole modules PEFT
/// trains beside them (`modules_to_save`: a `SEQ_CLS` adapter's score head).
pub struct Adapter {
    /// `adapter_config.json`.
    pub config: LoraConfig,
    /// Module path (without PEFT's `base_model.model.` and any `model.` prefix) → `(A, B)`.
    pub modules: HashMap<String, (Tensor, Tensor)>,
    /// Weight name (without PEFT's `base_model.model.`, e.g. `score.weight`) → its trained
    /// value, for the modules `adapter_config.json` lists in `modules_to_save`.
    pub saved_modules: HashMap<String, Tensor>,
}

/// The modules PEFT's `SEQ_CLS` task trains whole and saves in the adapter: the score heads of
/// transformers' sequence-classification classes.
pub const SEQ_CLS_MODULES: [&str; 2] = ["classifier", "score"];

impl Adapter {
    /// Reads a PEFT adapter folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|source| Error::Read { path: config_path.clone(), source })?;
        // An object, or a clear error: indexing any other JSON value by key would panic.
        let raw: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .map_err(|source| Error::Json { path: config_path.clone(), source })?;
        if let Some(t) = raw.get("peft_type").and_then(|t| t.as_str()) {
            if t != "LORA" {
                return Err(Error::Invalid(format!(
                    "{}: peft_type {t:?} is not supported (only LORA)",
                    config_path.display()
                )));
            }
        }
        for unsupported in ["use_dora", "use_qalora"] {
            if raw.get(unsupported).and_then(|v| v.as_bool()) == Some(true) {
                return Err(Error::Invalid(format!(
                    "{}: {unsupported} adapters are not supported (plain LoRA and rsLoRA are)",
                    config_path.display()
                )));
            }
        }
        // Settings that change which layers an adapter touches, or its scale per module: used
        // without them the adapter would be merged otherwise than PEFT merges it.
        let set = |key: &str| match raw.get(key) {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Object(m)) => !m.is_empty(),
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        for key in ["alpha_pattern", "rank_pattern", "layers_to_transform"] {
            if set(key) {
                return Err(Error::Invalid(format!(
                    "{}: {key} is not supported (every targeted module takes lora_alpha / r, in every layer)",
                    config_path.display()
                )));
            }
        }
        let mut raw_targets = raw.get("target_modules").cloned().unwrap_or_default();
        if let Some(s) = raw_targets.as_str() {
            // PEFT also allows one string, a regular expression over whole module names; a
            // plain name is the common case, and a pattern is refused rather than read as one.
            if s.contains(|c: char| "\\.*+?[](){}|^$".contains(c)) {
                return Err(Error::Invalid(format!(
                    "{}: target_modules {s:?} is a regular expression, which is not supported: list the module names",
                    config_path.display()
                )));
            }
            raw_targets = serde_json::json!([s]);
        }
        let mut fixed = raw.clone();
        fixed.insert("target_modules".into(), raw_targets);
        let config: LoraConfig = serde_json::from_value(serde_json::Value::Object(fixed))
            .map_err(|source| Error::Json { path: config_path.clone(), source })?;
        if config.r == 0 || !config.lora_alpha.is_finite() {
            return Err(Error::Invalid(format!(
                "{}: r {} and lora_alpha {}: a LoRA rank must be at least 1 and its alpha a \
                 finite number",
                config_path.display(),
                config.r,
                config.lora_alpha
            )));
        }
        // PEFT writes safetensors, and before 0.6 (RepLLaMA's adapters among them) a PyTorch
        // pickle of the same tensors.
        let (weights, pickle) =
            (dir.join("adapter_model.safetensors"), dir.join("adapter_model.bin"));
        let weights = if weights.is_file() || !pickle.is_file() { weights } else { pickle };
        if !weights.is_file() {
            return Err(Error::NotFound(format!(
                "{}: no adapter_model.safetensors (nor adapter_model.bin)",
                dir.display()
            )));
        }
        let cannot_read = |e: &dyn std::fmt::Display| Error::Weights {
            path: weights.clone(),
            what: format!("cannot read ({e})"),
        };
        let tensors: HashMap<String, Tensor> = if weights.extension() == Some("bin".as_ref()) {
            let read = candle_core::pickle::read_all(&weights).map_err(|e| cannot_read(&e))?;
            read.into_iter()
                .map(|(name, t)| Ok((name, t.to_device(device).map_err(|e| cannot_read(&e))?)))
                .collect::<Result<_>>()?
        } else {
            tevatron_ir::safetensors_check::check_file(&weights).map_err(|e| cannot_read(&e))?;
            candle_core::safetensors::load(&weights, device).map_err(|e| cannot_read(&e))?
        };
        let to_save: Vec<String> = raw
            .get("modules_to_save")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|m| m.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let mut halves: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        let mut saved_modules = HashMap::new();
        for (name, t) in tensors {
            let whole = name.strip_prefix("base_model.model.").filter(|n| {
                let n = n.strip_suffix(".weight").or_else(|| n.strip_suffix(".bias")).unwrap_or(n);
                !n.contains(".lora_")
                    && to_save.iter().any(|m| n == m || n.starts_with(&format!("{m}.")))
            });
            if let Some(whole) = whole {
                saved_modules.insert(whole.to_string(), t);
                continue;
            }
            let module = name
                .strip_prefix("base_model.model.")
                .map(|m| m.strip_prefix("model.").unwrap_or(m))
                .and_then(|m| {
                    m.strip_suffix(".lora_A.weight")
                        .map(|m| (m, 'A'))
                        .or_else(|| m.strip_suffix(".lora_B.weight").map(|m| (m, 'B')))
                });
            let Some((module, which)) = module else {
                return Err(Error::Weights {
                    path: weights.clone(),
                    what: format!("tensor {name:?} is not a LoRA weight (base_model.model.<module>.lora_A/B.weight)"),
                });
            };
            let slot = halves.entry(module.to_string()).or_default();
            if which == 'A' {
                slot.0 = Some(t);
            } else {
                slot.1 = Some(t);
            }
        }
        let mut modules = HashMap::new();
        for (module, pair) in halves {
            match pair {
                (Some(a), Some(b)) => {
                    // A NaN or infinity would be merged into every weight it touches, and the
                    // model written (or encoded with) as if it were whole.
                    for (half, t) in [("lora_A", &a), ("lora_B", &b)] {
                        let finite = t
                            .to_dtype(DType::F32)
                            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                            .map_err(|e| cannot_read(&e))?
                            .iter()
                            .all(|x| x.is_finite());
                        if !finite {
                            return Err(Error::Weights {
                                path: weights.clone(),
                                what: format!("{module}.{half} holds NaN or infinite values"),
                            });
                        }
                    }
                    modules.insert(module, (a, b));
                }
                _ => {
                    return Err(Error::Weights {
                        path: weights.clone(),
                        what: format!("module {module} has only one of lora_A and lora_B"),
                    })
                }
            }
        }
        Ok(Self { config, modules, saved_modules })
    }
}

/// Folds `adapter` into a checkpoint's tensors (`W += alpha/r * B A`, computed in F32 and stored
/// in the weight's dtype), as PEFT's `merge_and_unload` does. `tensors` keep their file names;
/// a module's weight is found under `<module>.weight` or with one of `prefixes` before it.
pub fn merge_into(
    tensors: &mut HashMap<String, Tensor>,
    adapter: &Adapter,
    prefixes: &[&str],
) -> Result<()> {
    let scale = adapter.config.scale();
    let mut modules: Vec<&String> = adapter.modules.keys().collect();
    modules.sort();
    for module in modules {
        let (a, b) = &adapter.modules[module];
        let plain = format!("{module}.weight");
        let name = std::iter::once(plain.clone())
            .chain(prefixes.iter().map(|p| format!("{p}{plain}")))
            .find(|n| tensors.contains_key(n))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "the adapter has weights for {module}, which this model does not have (it was trained on another base model)"
                ))
            })?;
        let w = &tensors[&name];
        if let Some(why) = misfit(module, w, a, b, adapter.config.r) {
            return Err(Error::Invalid(why));
        }
        let merged = merged(w, a, b, scale)?;
        tensors.insert(name, merged);
    }
    Ok(())
}

/// Why an adapter pair `a` `(r, in)`, `b` `(out, r)` cannot apply to the base weight `w`
/// `(out, in)`, if it cannot.
fn misfit(module: &str, w: &Tensor, a: &Tensor, b: &Tensor, r: usize) -> Option<String> {
    let fits = matches!((w.dims(), a.dims(), b.dims()),
        ([o, i], [ar, ai], [bo, br]) if ai == i && bo == o && *ar == r && *br == r);
    (!fits).then(|| {
        format!(
            "the adapter's {module} has shapes {:?} and {:?} (r = {r}), but the base weight is {:?}: the adapter was trained on another base model",
            a.dims(),
            b.dims(),
            w.dims()
        )
    })
}

/// `W + scale * B A`, computed in F32 and stored in `W`'s dtype: PEFT's merge.
fn merged(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
    (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` (F32) into `dir`, as PEFT does,
/// from `(module path, A, B)` triples, and, for a cross-encoder, the score head's weights
/// (`saved`, named as the model names them): PEFT's `SEQ_CLS` task, whose `modules_to_save`
/// are saved whole.
pub fn save_adapter(
    dir: &Path,
    config: &LoraConfig,
    base_model: &str,
    modules: &[(String, Tensor, Tensor)],
    saved: &[(String, Tensor)],
) -> Result<()> {
    let (task, to_save) = if saved.is_empty() {
        ("FEATURE_EXTRACTION", serde_json::Value::Null)
    } else {
        ("SEQ_CLS", serde_json::json!(SEQ_CLS_MODULES))
    };
    let config_json = serde_json::json!({
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": config.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": to_save,
        "use_rslora": config.use_rslora,
        "use_dora": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config_json).unwrap_or_default() + "\n";
    std::fs::write(&path, text).map_err(|source| Error::Write { path: path.clone(), source })?;
    let mut tensors = Vec::with_capacity(modules.len() * 2);
    for (module, a, b) in modules {
        tensors.push((peft_name(module, 'A'), a.to_dtype(DType::F32)?));
        tensors.push((peft_name(module, 'B'), b.to_dtype(DType::F32)?));
    }
    for (name, t) in saved {
        tensors.push((format!("base_model.model.{name}"), t.to_dtype(DType::F32)?));
    }
    crate::weights::save(&dir.join("adapter_model.safetensors"), tensors)
}

/// What a backbone's linear layers consult while loading: which modules get an adapter, with
/// which starting weights, and a record of what was built.
pub struct LoraPlan {
    /// The settings in force (the adapter folder's, else the options').
    pub config: LoraConfig,
    merge: bool,
    /// Whether the adapter is a saved one (its targets from its `adapter_config.json`), not one
    /// made from the flags.
    saved: bool,
    start: HashMap<String, (Tensor, Tensor)>,
    /// A loaded adapter's whole modules (a `SEQ_CLS` adapter's score head).
    saved_modules: HashMap<String, Tensor>,
    seed: u64,
    dtype: DType,
    /// [`LoraOptions::base_dtype`], when training.
    base_dtype: Option<DType>,
    device: Device,
    /// Every linear module the backbone built, for the error when no target matches.
    seen: Mutex<BTreeSet<String>>,
    /// Every adapter built for training.
    built: Mutex<Vec<TrainableAdapter>>,
}

/// One module's adapter as trainable variables.
#[derive(Clone, Debug)]
pub struct TrainableAdapter {
    /// Module path, e.g. `layers.0.self_attn.q_proj`.
    pub module: String,
    /// `(r, in)`.
    pub a: Var,
    /// `(out, r)`.
    pub b: Var,
}

/// A linear layer's adapter in training form.
#[derive(Clone, Debug)]
pub struct LoraWeights {
    /// `(r, in)`.
    pub a: Tensor,
    /// `(out, r)`.
    pub b: Tensor,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout on the adapter's input.
    pub dropout: f64,
}

impl LoraPlan {
    /// Resolves the options: reads the adapter folder when one is given. A module name that
    /// starts with one of the model family's `prefixes` (a `SEQ_CLS` adapter names
    /// `bert.encoder…`, the backbone `encoder…`) is read without it. `hidden` is the model's
    /// hidden size, which one side of every linear layer has: a fresh adapter's rank past it
    /// adds nothing and is refused.
    pub fn new(
        opts: &LoraOptions,
        dtype: DType,
        device: &Device,
        prefixes: &[&str],
        hidden: usize,
    ) -> Result<Self> {
        let (config, start, saved_modules) = match &opts.source {
            AdapterSource::Saved(dir) => {
                let adapter = Adapter::load(dir, device)?;
                let strip = |m: String| {
                    prefixes.iter().find_map(|p| m.strip_prefix(p).map(str::to_owned)).unwrap_or(m)
                };
                let modules = adapter.modules.into_iter().map(|(m, ab)| (strip(m), ab)).collect();
                (adapter.config, modules, adapter.saved_modules)
            }
            AdapterSource::Fresh(config) => (config.clone(), HashMap::new(), HashMap::new()),
        };
        if config.r == 0 {
            return Err(Error::Invalid("--lora_r must be at least 1".into()));
        }
        if matches!(opts.source, AdapterSource::Fresh(_)) && config.r > hidden {
            // The product B A has rank at most min(out, in) <= hidden; a rank past it is a
            // typo, and allocating it could exhaust memory (an abort, not an error).
            return Err(Error::Invalid(format!(
                "--lora_r {} is larger than the model's hidden size {hidden}: an adapter's rank \
                 cannot exceed it",
                config.r
            )));
        }
        Ok(Self {
            config,
            merge: opts.merge,
            saved: matches!(opts.source, AdapterSource::Saved(_)),
            start,
            saved_modules,
            seed: opts.seed,
            dtype,
            base_dtype: opts.base_dtype.filter(|_| !opts.merge),
            device: device.clone(),
            seen: Mutex::new(BTreeSet::new()),
            built: Mutex::new(Vec::new()),
        })
    }

    /// The dtype the frozen base weight of linear layer `module` is kept in, when it is not the
    /// compute dtype: [`LoraOptions::base_dtype`] for the modules the adapters target.
    pub fn base_dtype(&self, module: &str) -> Option<DType> {
        self.base_dtype.filter(|_| self.config.targets(module))
    }

    /// Called for every linear layer `module` with base weight `weight` `(out, in)`: returns
    /// the weight to use (merged when merging) and the adapter to apply (when training).
    pub fn apply(
        &self,
        module: &str,
        weight: Tensor,
    ) -> candle_core::Result<(Tensor, Option<LoraWeights>)> {
        self.seen.lock().expect("lora plan lock").insert(module.to_string());
        if !self.config.targets(module) {
            return Ok((weight, None));
        }
        let (out_dim, in_dim) = weight.dims2()?;
        let start = self.start.get(module);
        if let Some((a, b)) = start {
            if let Some(why) = misfit(module, &weight, a, b, self.config.r) {
                fail!("{why}");
            }
        }
        if self.merge {
            let Some((a, b)) = start else {
                fail!("the adapter has no weights for {module}, which its target_modules name")
            };
            return Ok((merged(&weight, a, b, self.config.scale())?, None));
        }
        let (a, b) = match start {
            Some((a, b)) => (a.to_dtype(self.dtype)?, b.to_dtype(self.dtype)?),
            None => (
                self.fresh_a(module, in_dim)?,
                Tensor::zeros((out_dim, self.config.r), self.dtype, &self.device)?,
            ),
        };
        let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        self.built.lock().expect("lora plan lock").push(TrainableAdapter {
            module: module.to_string(),
            a: a.clone(),
            b: b.clone(),
        });
        let lora = LoraWeights {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: self.config.scale(),
            dropout: self.config.lora_dropout,
        };
        Ok((weight, Some(lora)))
    }

    /// PEFT's initialisation of A: Kaiming-uniform with `a = sqrt(5)`, i.e. uniform in
    /// `±1/sqrt(in)`, drawn from a stream seeded by `(seed, module)` (the module name hashed,
    /// so initial weights do not depend on the order modules are built in).
    fn fresh_a(&self, module: &str, in_dim: usize) -> candle_core::Result<Tensor> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let key = crate::rng::mix(self.seed, &[fnv1a(module)]);
        let mut rng = crate::rng::SplitMix64::new(key);
        let n = self.config.r * in_dim;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                ((2.0 * u - 1.0) * bound) as f32
            })
            .collect();
        Tensor::from_vec(values, (self.config.r, in_dim), &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)
    }

    /// Checks that the targets matched something, listing the modules that exist if not.
    pub fn check_matched(&self) -> Result<()> {
        let seen = self.seen.lock().expect("lora plan lock");
        if seen.iter().any(|m| self.config.targets(m)) {
            return Ok(());
        }
        let names: BTreeSet<&str> =
            seen.iter().map(|m| m.rsplit('.').next().unwrap_or(m)).collect();
        let names = names.into_iter().collect::<Vec<_>>().join(", ");
        let targets = self.config.target_modules.join(",");
        Err(Error::Invalid(if !self.saved {
            format!(
                "--lora_target_modules {targets} match no module of this model; its linear modules are: {names}"
            )
        } else {
            // A saved adapter's targets come from its adapter_config.json, not from a flag.
            format!(
                "the adapter's target modules ({targets}, in its adapter_config.json) match no module of this model: it was trained on another base model; this model's linear modules are: {names}"
            )
        }))
    }

    /// Checks that every module of a loaded adapter exists in the model.
    pub fn check_adapter_fits(&self) -> Result<()> {
        let seen = self.seen.lock().expect("lora plan lock");
        let mut missing: Vec<&String> = self.start.keys().filter(|m| !seen.contains(*m)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort();
        Err(Error::Invalid(format!(
            "the adapter has weights for modules this model does not have (it was trained on another base model): {}",
            missing.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )))
    }

    /// The adapters built for training, in load order.
    pub fn built(&self) -> Vec<TrainableAdapter> {
        self.built.lock().expect("lora plan lock").clone()
    }

    /// Whether adapters are folded into the base weights.
    pub fn merges(&self) -> bool {
        self.merge
    }

    /// The whole modules a loaded adapter carries (a `SEQ_CLS` adapter's score head), by the
    /// model's weight names.
    pub fn saved_modules(&self) -> &HashMap<String, Tensor> {
        &self.saved_modules
    }
}

/// FNV-1a of a module name: the stable key of its adapter's initial weights. (Not the project's
/// `FxHasher`: switching would change every fresh adapter's initial weights.)
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
