//! sentence-transformers' module pipeline around a Hugging Face model, from `modules.json`: the
//! sub-folder holding the Transformer, its Pooling, the Dense projections applied to the pooled
//! vector, and Normalize. Read so that a folder embeds as `SentenceTransformer` embeds it, and
//! written back so that `SentenceTransformer` loads what we save. Modules are matched by class
//! name, which reads both the `sentence_transformers.models.Dense` names of releases before 6
//! and the `sentence_transformers.base.modules.dense.Dense` names of 6. A module this crate
//! cannot run is refused by name: skipping it would give vectors of another width or meaning.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::pooling::Pooling;
use crate::{weights, Error, Result};

/// What a sentence-transformers folder's `modules.json` states.
pub(crate) struct StModules {
    /// The Transformer module's sub-folder (empty or absent: the folder itself).
    pub transformer_dir: Option<String>,
    /// The Pooling module's mode, if it has one.
    pub pooling: Option<Pooling>,
    /// The Dense modules after pooling, in order, with their sub-folders.
    pub dense: Vec<(PathBuf, DenseConfig)>,
    /// Whether a Normalize module ends the pipeline.
    pub normalize: bool,
}

/// A Dense module's `config.json`, as sentence-transformers writes it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DenseConfig {
    in_features: usize,
    out_features: usize,
    bias: bool,
    activation: Activation,
}

/// The activations a Dense module may name (`torch.nn` classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    Identity,
    Tanh,
    Relu,
    Gelu,
}

impl Activation {
    const NAMES: [(&'static str, Activation); 4] = [
        ("torch.nn.modules.linear.Identity", Activation::Identity),
        ("torch.nn.modules.activation.Tanh", Activation::Tanh),
        ("torch.nn.modules.activation.ReLU", Activation::Relu),
        ("torch.nn.modules.activation.GELU", Activation::Gelu),
    ];

    fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, a)| *a == self).map_or("", |(n, _)| n)
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Identity => Ok(x.clone()),
            Activation::Tanh => x.tanh(),
            Activation::Relu => x.relu(),
            Activation::Gelu => x.gelu_erf(),
        }
    }
}

/// The class name a `modules.json` type ends with.
fn class_name(ty: &str) -> &str {
    ty.rsplit('.').next().unwrap_or(ty)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

/// Reads `dir/modules.json`; `None` when the folder has none.
pub(crate) fn read(dir: &Path) -> Result<Option<StModules>> {
    let path = dir.join("modules.json");
    if !path.is_file() {
        return Ok(None);
    }
    let modules = read_json(&path)?;
    let invalid = |what: String| Error::Invalid(format!("{}: {what}", path.display()));
    let modules = modules.as_array().ok_or_else(|| invalid("not a list of modules".into()))?;
    let mut st =
        StModules { transformer_dir: None, pooling: None, dense: vec![], normalize: false };
    for (i, m) in modules.iter().enumerate() {
        let ty = m["type"].as_str().unwrap_or_default();
        let sub = m["path"].as_str().unwrap_or_default();
        let order = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(invalid(format!("module {i} ({ty}) {what}")))
            }
        };
        match class_name(ty) {
            "Transformer" => {
                order(i == 0, "comes after other modules; it must be the first")?;
                if !sub.is_empty() {
                    st.transformer_dir = Some(sub.to_string());
                }
            }
            "Pooling" => {
                order(i > 0 && st.dense.is_empty() && !st.normalize, "is out of order")?;
                let cfg_path = dir.join(sub).join("config.json");
                st.pooling = Pooling::from_st_config(&read_json(&cfg_path)?)
                    .map_err(|why| Error::Invalid(format!("{}: {why}", cfg_path.display())))?;
            }
            "Dense" => {
                order(!st.normalize, "comes after Normalize, which this crate cannot run")?;
                let cfg_path = dir.join(sub).join("config.json");
                let config = DenseConfig::parse(&read_json(&cfg_path)?)
                    .map_err(|why| Error::Invalid(format!("{}: {why}", cfg_path.display())))?;
                st.dense.push((dir.join(sub), config));
            }
            "Normalize" => st.normalize = true,
            _ => {
                return Err(invalid(format!(
                    "module {i} has type {ty:?}, which this crate cannot run (it runs Transformer, \
                     Pooling, Dense and Normalize modules)"
                )))
            }
        }
    }
    Ok(Some(st))
}

/// The sub-folders of the modules a `modules.json` text lists after the Transformer, each with
/// whether it is a Dense module (which has weights): what to download from the hub beside the
/// model. Unreadable text lists none (loading reports it).
pub(crate) fn module_folders(modules_json: &str) -> Vec<(String, bool)> {
    let modules: Vec<serde_json::Value> = serde_json::from_str(modules_json).unwrap_or_default();
    modules
        .iter()
        .filter_map(|m| {
            let ty = m["type"].as_str().unwrap_or_default();
            let path = m["path"].as_str().filter(|p| !p.is_empty())?;
            (class_name(ty) != "Transformer").then(|| (path.to_string(), class_name(ty) == "Dense"))
        })
        .collect()
}

impl DenseConfig {
    /// Reads a Dense `config.json`; an error says what it holds that cannot run here.
    fn parse(cfg: &serde_json::Value) -> std::result::Result<Self, String> {
        let features = |key: &str| {
            cfg[key]
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| format!("{key} is missing or not a positive integer"))
        };
        // sentence-transformers' defaults: a bias, tanh.
        let activation = match cfg["activation_function"].as_str() {
            None => Activation::Tanh,
            Some(name) => {
                Activation::NAMES.iter().find(|(n, _)| *n == name).map(|(_, a)| *a).ok_or_else(
                    || {
                        let known: Vec<&str> = Activation::NAMES.iter().map(|(n, _)| *n).collect();
                        format!(
                            "activation_function {name} is not supported (supported: {})",
                            known.join(", ")
                        )
                    },
                )?
            }
        };
        for key in ["module_input_name", "module_output_name"] {
            if let Some(name) = cfg[key].as_str().filter(|n| *n != "sentence_embedding") {
                return Err(format!(
                    "{key} {name}: only a Dense on the pooled vector (sentence_embedding) is supported"
                ));
            }
        }
        if cfg["use_residual"].as_bool().unwrap_or(false) {
            return Err("use_residual true is not supported".into());
        }
        Ok(Self {
            in_features: features("in_features")?,
            out_features: features("out_features")?,
            bias: cfg["bias"].as_bool().unwrap_or(true),
            activation,
        })
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
            "activation_function": self.activation.name(),
        })
    }
}

/// A sentence-transformers Dense module, `activation(x W^T + b)` on the pooled vector, with its
/// weights in F32 (trainable ones are variables' tensors, updated in place).
pub(crate) struct Dense {
    config: DenseConfig,
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Dense {
    /// Loads the module in `dir` (configured by `config`) onto `device`, checking that it takes
    /// vectors of `width`.
    pub fn load(dir: &Path, config: &DenseConfig, width: usize, device: &Device) -> Result<Self> {
        let bad = |what: String| Error::Weights { path: dir.to_path_buf(), what };
        if config.in_features != width {
            return Err(bad(format!(
                "in_features is {}, but the vectors before it have {width} dimensions",
                config.in_features
            )));
        }
        let mut tensors = weights::load(dir, &[], device)?;
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors.remove(name).ok_or_else(|| bad(format!("no tensor {name}")))?;
            if t.dims() != shape {
                return Err(bad(format!("{name} has shape {:?}, not {shape:?}", t.dims())));
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let weight = take("linear.weight", &[config.out_features, config.in_features])?;
        let bias =
            if config.bias { Some(take("linear.bias", &[config.out_features])?) } else { None };
        Ok(Self { config: config.clone(), weight, bias })
    }

    /// The width of the vectors it outputs.
    pub fn out_features(&self) -> usize {
        self.config.out_features
    }

    /// Its tensors by the names sentence-transformers saves them under.
    pub fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = vec![("linear.weight", &self.weight)];
        out.extend(self.bias.iter().map(|b| ("linear.bias", b)));
        out
    }

    /// Makes its tensors variables (for full training) and returns them with their names.
    pub fn make_trainable(&mut self) -> candle_core::Result<Vec<(&'static str, candle_core::Var)>> {
        let weight = candle_core::Var::from_tensor(&self.weight)?;
        self.weight = weight.as_tensor().clone();
        let mut vars = vec![("linear.weight", weight)];
        if let Some(b) = &self.bias {
            let bias = candle_core::Var::from_tensor(b)?;
            self.bias = Some(bias.as_tensor().clone());
            vars.push(("linear.bias", bias));
        }
        Ok(vars)
    }

    /// `activation(x W^T + b)` for `x` `(b, in)`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.weight.to_dtype(x.dtype())?.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        };
        self.config.activation.apply(&y)
    }

    /// Writes the module into `dir` (created): its `config.json` and `model.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|source| Error::Write { path: dir.to_path_buf(), source })?;
        let text = serde_json::to_string_pretty(&self.config.to_json()).unwrap_or_default();
        let path = dir.join("config.json");
        std::fs::write(&path, text + "\n").map_err(|source| Error::Write { path, source })?;
        let tensors = self.tensors().into_iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
        weights::save(&dir.join("model.safetensors"), tensors)
    }
}

/// The sub-folder the `i`-th Dense module is saved in (after the Transformer and Pooling), and
/// the prefix of its variables' names: `2_Dense/linear.weight`.
pub(crate) fn dense_folder(i: usize) -> String {
    format!("{}_Dense", 2 + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_modules(dir: &Path, types: &[(&str, &str)]) {
        let modules: Vec<serde_json::Value> = types
            .iter()
            .enumerate()
            .map(|(i, (ty, path))| serde_json::json!({"idx": i, "path": path, "type": ty}))
            .collect();
        std::fs::write(dir.join("modules.json"), serde_json::Value::from(modules).to_string())
            .unwrap();
    }

    #[test]
    fn both_generations_of_module_names_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("1_Pooling")).unwrap();
        std::fs::write(dir.path().join("1_Pooling/config.json"), r#"{"pooling_mode": "mean"}"#)
            .unwrap();
        for (t, p, n) in [
            (
                "sentence_transformers.models.",
                "sentence_transformers.models.",
                "sentence_transformers.models.",
            ),
            (
                "sentence_transformers.base.modules.transformer.",
                "sentence_transformers.sentence_transformer.modules.pooling.",
                "sentence_transformers.base.modules.normalize.",
            ),
        ] {
            let (t, p, n) =
                (format!("{t}Transformer"), format!("{p}Pooling"), format!("{n}Normalize"));
            write_modules(dir.path(), &[(&t, ""), (&p, "1_Pooling"), (&n, "2_Normalize")]);
            let st = read(dir.path()).unwrap().unwrap();
            assert_eq!(st.pooling, Some(Pooling::Mean));
            assert!(st.normalize);
            assert!(st.transformer_dir.is_none() && st.dense.is_empty());
        }
    }

    #[test]
    fn modules_that_cannot_run_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let t = "sentence_transformers.models.Transformer";
        write_modules(dir.path(), &[(t, ""), ("sentence_transformers.models.WordWeights", "1_W")]);
        let err = read(dir.path()).err().unwrap().to_string();
        assert!(err.contains("modules.json") && err.contains("WordWeights"), "{err}");

        std::fs::create_dir_all(dir.path().join("2_Dense")).unwrap();
        let dense = |cfg: serde_json::Value| {
            std::fs::write(dir.path().join("2_Dense/config.json"), cfg.to_string()).unwrap();
            write_modules(
                dir.path(),
                &[(t, ""), ("sentence_transformers.models.Dense", "2_Dense")],
            );
            read(dir.path()).map(|st| st.unwrap().dense[0].1.clone())
        };
        let ok = dense(serde_json::json!({"in_features": 4, "out_features": 2}));
        let ok = ok.unwrap();
        assert_eq!(
            (ok.bias, ok.activation),
            (true, Activation::Tanh),
            "sentence-transformers' defaults"
        );
        for (cfg, why) in [
            (serde_json::json!({"in_features": 4}), "out_features"),
            (
                serde_json::json!({"in_features": 4, "out_features": 2, "activation_function": "torch.nn.modules.activation.SiLU"}),
                "SiLU",
            ),
            (
                serde_json::json!({"in_features": 4, "out_features": 2, "module_input_name": "token_embeddings"}),
                "token_embeddings",
            ),
            (
                serde_json::json!({"in_features": 4, "out_features": 4, "use_residual": true}),
                "use_residual",
            ),
        ] {
            let err = dense(cfg).err().unwrap().to_string();
            assert!(err.contains("2_Dense/config.json") && err.contains(why), "{err}");
        }
        write_modules(
            dir.path(),
            &[
                (t, ""),
                ("sentence_transformers.models.Normalize", "1_Normalize"),
                ("sentence_transformers.models.Dense", "2_Dense"),
            ],
        );
        let err = read(dir.path()).err().unwrap().to_string();
        assert!(err.contains("after Normalize"), "{err}");
    }

    #[test]
    fn dense_applies_its_projection_and_activation() {
        let dev = Device::Cpu;
        let config = DenseConfig {
            in_features: 2,
            out_features: 2,
            bias: true,
            activation: Activation::Relu,
        };
        let dense = Dense {
            config,
            weight: Tensor::new(&[[1f32, 2.], [-1., 0.5]], &dev).unwrap(),
            bias: Some(Tensor::new(&[0.5f32, -1.], &dev).unwrap()),
        };
        let x = Tensor::new(&[[1f32, 1.], [2., -1.]], &dev).unwrap();
        // [1+2+0.5, -1+0.5-1] = [3.5, -1.5] -> relu; [2-2+0.5, -2-0.5-1] = [0.5, -3.5] -> relu
        assert_eq!(dense.forward(&x).unwrap().to_vec2::<f32>().unwrap(), [[3.5, 0.], [0.5, 0.]]);
    }
}
