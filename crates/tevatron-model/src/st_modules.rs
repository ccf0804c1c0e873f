//! sentence-transformers' module pipeline around a Hugging Face model, from `modules.json`: the
//! sub-folder holding the Transformer, its Pooling, the Dense projections applied to the pooled
//! vector, and Normalize. Read so that a folder embeds as `SentenceTransformer` embeds it, and
//! written back so that `SentenceTransformer` loads what we save. Modules are matched by class
//! name within the `sentence_transformers` package, which reads both the
//! `sentence_transformers.models.Dense` names of releases before 6 and the
//! `sentence_transformers.base.modules.dense.Dense` names of 6. A module this crate cannot run
//! is refused by name where it would be used: skipping it would give vectors of another width
//! or meaning.

use std::path::{Component, Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::pooling::Pooling;
use crate::{weights, Error, Result};

/// What a sentence-transformers folder's `modules.json` states.
pub(crate) struct StModules {
    /// The Transformer module's sub-folder (empty or absent: the folder itself).
    pub transformer_dir: Option<String>,
    /// The Pooling module's mode, if the folder has one; why it cannot run here, if so (it
    /// matters only where the folder's pooling is used).
    pub pooling: Option<std::result::Result<Pooling, String>>,
    /// The Dense modules after pooling, in order, with their sub-folders.
    pub dense: Vec<(PathBuf, DenseConfig)>,
    /// Whether a Normalize module ends the pipeline.
    pub normalize: bool,
    /// Why the pipeline after the Transformer cannot run here (a module of another kind, a
    /// Dense that cannot run, modules out of order), naming the file: an error for a retriever,
    /// nothing for a cross-encoder, whose score head replaces the pipeline.
    pub unsupported: Option<String>,
}

/// The kinds of module this crate runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Transformer,
    Pooling,
    Dense,
    Normalize,
}

impl Kind {
    /// The kind a `modules.json` type names: a class of the `sentence_transformers` package,
    /// by its last name (remote-code classes of the same names are not ours).
    fn of(ty: &str) -> Option<Self> {
        if !ty.starts_with("sentence_transformers.") {
            return None;
        }
        match ty.rsplit('.').next().unwrap_or(ty) {
            "Transformer" => Some(Kind::Transformer),
            "Pooling" => Some(Kind::Pooling),
            "Dense" => Some(Kind::Dense),
            "Normalize" => Some(Kind::Normalize),
            _ => None,
        }
    }
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

/// A Dense module's `config.json`, as sentence-transformers writes it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DenseConfig {
    in_features: usize,
    out_features: usize,
    bias: bool,
    activation: Activation,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

/// Whether a module's `path` stays inside the model folder (sentence-transformers refuses the
/// others too): no root, no `..`.
fn inside(path: &str) -> bool {
    Path::new(path).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// The modules a `modules.json` text lists, as (type, sub-folder) pairs; an error naming
/// `path` when it is not a list or a sub-folder leaves the model folder.
fn entries(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let invalid = |what: String| Error::Invalid(format!("{}: {what}", path.display()));
    let modules: serde_json::Value = serde_json::from_str(text)
        .map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    let modules = modules.as_array().ok_or_else(|| invalid("not a list of modules".into()))?;
    modules
        .iter()
        .map(|m| {
            let ty = m["type"].as_str().unwrap_or_default().to_string();
            let sub = m["path"].as_str().unwrap_or_default().to_string();
            if inside(&sub) {
                Ok((ty, sub))
            } else {
                Err(invalid(format!("module path {sub:?} leaves the model folder")))
            }
        })
        .collect()
}

/// Reads `dir/modules.json`; `None` when the folder has none.
pub(crate) fn read(dir: &Path) -> Result<Option<StModules>> {
    let path = dir.join("modules.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|source| Error::Read { path: path.clone(), source })?;
    let mut st = StModules {
        transformer_dir: None,
        pooling: None,
        dense: vec![],
        normalize: false,
        unsupported: None,
    };
    let listed = entries(&text, &path)?;
    if listed.is_empty() {
        // sentence-transformers would run nothing: no embedding comes of such a folder.
        st.unsupported = Some(format!(
            "{}: lists no module (sentence-transformers would run nothing): remove the file, or \
             list the Transformer and Pooling modules",
            path.display()
        ));
    }
    for (i, (ty, sub)) in listed.into_iter().enumerate() {
        let problem = |what: &str| format!("{}: module {i} ({ty}) {what}", path.display());
        let kind = Kind::of(&ty);
        let out_of_order = match kind {
            Some(Kind::Transformer) => i != 0,
            Some(Kind::Pooling) => i == 0 || !st.dense.is_empty() || st.normalize,
            Some(Kind::Dense) => st.pooling.is_none() || st.normalize,
            Some(Kind::Normalize) => i == 0,
            None => false,
        };
        if out_of_order {
            st.unsupported.get_or_insert_with(|| problem("is out of the order this crate runs (Transformer, Pooling, Dense..., Normalize)"));
            continue;
        }
        match kind {
            Some(Kind::Transformer) => {
                if !sub.is_empty() {
                    st.transformer_dir = Some(sub);
                }
            }
            // A config that cannot be read is kept as the reason too: a cross-encoder does not
            // need it.
            Some(Kind::Pooling) => {
                let cfg_path = dir.join(&sub).join("config.json");
                let mode = read_json(&cfg_path).map_err(|e| e.to_string()).and_then(|cfg| {
                    Pooling::from_st_config(&cfg)
                        .map_err(|why| format!("{}: {why}", cfg_path.display()))
                });
                st.pooling = Some(mode);
            }
            Some(Kind::Dense) => {
                let cfg_path = dir.join(&sub).join("config.json");
                let config = read_json(&cfg_path).map_err(|e| e.to_string()).and_then(|cfg| {
                    DenseConfig::parse(&cfg).map_err(|why| format!("{}: {why}", cfg_path.display()))
                });
                match config {
                    Ok(config) => st.dense.push((dir.join(&sub), config)),
                    Err(why) => {
                        st.unsupported.get_or_insert(why);
                    }
                }
            }
            Some(Kind::Normalize) => st.normalize = true,
            None => {
                st.unsupported.get_or_insert_with(|| {
                    problem("is a module this crate cannot run (it runs sentence-transformers' Transformer, Pooling, Dense and Normalize)")
                });
            }
        }
    }
    Ok(Some(st))
}

/// The sub-folders of the modules a `modules.json` text lists after the Transformer, with
/// their kinds: what to download from the hub beside the model. Unreadable text, and paths
/// that would leave the folder, list none (loading reports them).
pub(crate) fn module_folders(modules_json: &str) -> Vec<(String, Option<Kind>)> {
    entries(modules_json, Path::new("modules.json"))
        .unwrap_or_default()
        .into_iter()
        .filter(|(ty, sub)| !sub.is_empty() && Kind::of(ty) != Some(Kind::Transformer))
        .map(|(ty, sub)| (sub, Kind::of(&ty)))
        .collect()
}

/// The sub-folder a `modules.json` text puts the Transformer in, with a trailing `/` (`""` when
/// it is the folder itself, as in every folder sentence-transformers 2 and later writes; older
/// ones used `0_Transformer/`): where a hub download finds the model's config and weights.
pub(crate) fn transformer_prefix(modules_json: &str) -> String {
    entries(modules_json, Path::new("modules.json"))
        .unwrap_or_default()
        .into_iter()
        .find(|(ty, sub)| Kind::of(ty) == Some(Kind::Transformer) && !sub.is_empty())
        .map(|(_, sub)| format!("{}/", sub.trim_end_matches('/')))
        .unwrap_or_default()
}

/// The files a module folder of `kind` must have, the weights as alternatives: a Pooling's and
/// a Dense module's config, a Dense module's weights (what a hub cache must hold before it is
/// used without downloading).
pub(crate) fn required_files(kind: Option<Kind>) -> Vec<&'static [&'static str]> {
    match kind {
        Some(Kind::Pooling) => vec![&["config.json"]],
        Some(Kind::Dense) => vec![&["config.json"], &["model.safetensors", "pytorch_model.bin"]],
        _ => vec![],
    }
}

/// The non-empty prompts a folder's `config_sentence_transformers.json` states (`"query":
/// "query: "`), which `SentenceTransformer.encode(..., prompt_name=...)` prepends; none when it
/// has no such file or states none.
pub(crate) fn prompts(dir: &Path) -> Vec<(String, String)> {
    let path = dir.join("config_sentence_transformers.json");
    let config: serde_json::Value = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let Some(prompts) = config["prompts"].as_object() else { return vec![] };
    prompts
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str().filter(|p| !p.is_empty())?.to_string())))
        .collect()
}

/// Copies the sentence-transformers files of `from` into `to` (a model rewritten with the same
/// pipeline, such as a merged LoRA adapter): `modules.json`, the package's own config files, and
/// every module folder's files.
pub(crate) fn copy(from: &Path, to: &Path) -> Result<()> {
    let copy_file = |src: PathBuf, dst: PathBuf| -> Result<()> {
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|source| Error::Write { path: parent.to_path_buf(), source })?;
        }
        std::fs::copy(&src, &dst).map(|_| ()).map_err(|source| Error::Write { path: dst, source })
    };
    let modules = from.join("modules.json");
    if !modules.is_file() {
        return Ok(());
    }
    for f in ["modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"] {
        if from.join(f).is_file() {
            copy_file(from.join(f), to.join(f))?;
        }
    }
    let text = std::fs::read_to_string(&modules)
        .map_err(|source| Error::Read { path: modules.clone(), source })?;
    for (ty, sub) in entries(&text, &modules)? {
        if sub.is_empty() || Kind::of(&ty) == Some(Kind::Transformer) {
            continue;
        }
        std::fs::create_dir_all(to.join(&sub))
            .map_err(|source| Error::Write { path: to.join(&sub), source })?;
        // A module without files has no folder where the hub or git kept it (Normalize before
        // sentence-transformers 6): the empty folder above stands for it.
        let Ok(listing) = std::fs::read_dir(from.join(&sub)) else { continue };
        for entry in listing.flatten() {
            if entry.path().is_file() {
                copy_file(entry.path(), to.join(&sub).join(entry.file_name()))?;
            }
        }
    }
    Ok(())
}

/// Writes the modules of a model we save into `dir`: `modules.json` (Transformer, Pooling of
/// `pooling` over vectors of `width`, `dense` in order, Normalize when `normalize`), the Pooling
/// config, and each Dense module's folder, numbered as [`dense_folder`] names them.
pub(crate) fn write(
    dir: &Path,
    width: usize,
    pooling: Pooling,
    dense: &[Dense],
    normalize: bool,
) -> Result<()> {
    let write = |path: PathBuf, value: serde_json::Value| -> Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|source| Error::Write { path: parent.to_path_buf(), source })?;
        }
        let text = serde_json::to_string_pretty(&value).unwrap_or_default();
        std::fs::write(&path, text + "\n").map_err(|source| Error::Write { path, source })
    };
    let module = |idx: usize, path: &str, ty: &str| {
        serde_json::json!({"idx": idx, "name": idx.to_string(), "path": path,
                           "type": format!("sentence_transformers.models.{ty}")})
    };
    let mut modules = vec![module(0, "", "Transformer"), module(1, "1_Pooling", "Pooling")];
    for (i, d) in dense.iter().enumerate() {
        let folder = dense_folder(i);
        d.save(&dir.join(&folder))?;
        modules.push(module(modules.len(), &folder, "Dense"));
    }
    if normalize {
        let folder = format!("{}_Normalize", modules.len());
        modules.push(module(modules.len(), &folder, "Normalize"));
        std::fs::create_dir_all(dir.join(&folder))
            .map_err(|source| Error::Write { path: dir.join(&folder), source })?;
    }
    write(dir.join("modules.json"), serde_json::Value::from(modules))?;
    let mut config = serde_json::Map::new();
    config.insert("word_embedding_dimension".into(), width.into());
    config.extend(pooling.st_modes());
    config.insert("include_prompt".into(), true.into());
    write(dir.join("1_Pooling/config.json"), serde_json::Value::Object(config))
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
        if config.in_features != width {
            return Err(Error::Invalid(format!(
                "{}: in_features is {}, but the vectors before it have {width} dimensions",
                dir.join("config.json").display(),
                config.in_features
            )));
        }
        let mut tensors = weights::load(dir, &[], device)?;
        let file = ["model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .find(|f| f.is_file())
            .unwrap_or_else(|| dir.to_path_buf());
        let bad = |what: String| Error::Weights { path: file.clone(), what };
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

    /// What it does, for the log: `32 -> 16, Tanh`.
    pub fn describe(&self) -> String {
        let activation = self.config.activation.name().rsplit('.').next().unwrap_or_default();
        format!("{} -> {}, {activation}", self.config.in_features, self.config.out_features)
    }

    /// `activation(x W^T + b)` for `x` `(b, in)`, in `x`'s dtype. `x` is made contiguous first:
    /// a first- or last-token pool is a strided view, which CUDA's matrix product refuses.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
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

/// The sub-folder the `i`-th Dense module is saved in by [`write`] (after the Transformer and
/// Pooling), and the prefix of its variables' names: `2_Dense/linear.weight`.
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

    /// The Transformer's sub-folder as a prefix of its files: none for the folder itself, one
    /// `/` whether or not the path ends in one, nested paths kept whole.
    #[test]
    fn the_transformer_prefix_names_its_folder() {
        let t = "sentence_transformers.models.Transformer";
        let modules = |path: &str| format!(r#"[{{"idx": 0, "path": "{path}", "type": "{t}"}}]"#);
        assert_eq!(transformer_prefix(&modules("")), "");
        assert_eq!(transformer_prefix(&modules("0_Transformer")), "0_Transformer/");
        assert_eq!(transformer_prefix(&modules("0_Transformer/")), "0_Transformer/");
        assert_eq!(transformer_prefix(&modules("a/b")), "a/b/");
        assert_eq!(transformer_prefix("not json"), "");
    }

    #[test]
    fn both_generations_of_module_names_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("1_Pooling")).unwrap();
        std::fs::write(dir.path().join("1_Pooling/config.json"), r#"{"pooling_mode": "cls"}"#)
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
            assert_eq!(st.pooling, Some(Ok(Pooling::Cls)));
            assert!(st.normalize);
            assert!(st.transformer_dir.is_none() && st.dense.is_empty());
            assert_eq!(st.unsupported, None);
        }
    }

    /// What cannot run is kept as the reason, naming the file: a retriever refuses it, a
    /// cross-encoder (whose head replaces the pipeline) does not need it.
    #[test]
    fn modules_that_cannot_run_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (t, pool) =
            ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling");
        std::fs::create_dir_all(dir.path().join("1_Pooling")).unwrap();
        std::fs::write(dir.path().join("1_Pooling/config.json"), r#"{"pooling_mode": "max"}"#)
            .unwrap();
        let unsupported = |modules: &[(&str, &str)]| {
            write_modules(dir.path(), modules);
            read(dir.path()).unwrap().unwrap().unsupported.unwrap_or_default()
        };
        for ty in ["sentence_transformers.models.WordWeights", "custom_st.Dense"] {
            let why = unsupported(&[(t, ""), (ty, "1_W")]);
            assert!(why.contains("modules.json") && why.contains(ty), "{why}");
        }
        write_modules(dir.path(), &[(t, ""), (pool, "1_Pooling")]);
        let st = read(dir.path()).unwrap().unwrap();
        let why = st.pooling.unwrap().unwrap_err();
        assert!(why.contains("1_Pooling/config.json") && why.contains("max"), "{why}");

        std::fs::create_dir_all(dir.path().join("2_Dense")).unwrap();
        let dense = |cfg: serde_json::Value| {
            std::fs::write(dir.path().join("2_Dense/config.json"), cfg.to_string()).unwrap();
            write_modules(
                dir.path(),
                &[(t, ""), (pool, "1_Pooling"), ("sentence_transformers.models.Dense", "2_Dense")],
            );
            let st = read(dir.path()).unwrap().unwrap();
            st.dense.first().map(|d| d.1.clone()).ok_or(st.unsupported.unwrap_or_default())
        };
        let ok = dense(serde_json::json!({"in_features": 4, "out_features": 2})).unwrap();
        let defaults = (ok.bias, ok.activation);
        assert_eq!(defaults, (true, Activation::Tanh), "sentence-transformers' defaults");
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
            let err = dense(cfg).unwrap_err();
            assert!(err.contains("2_Dense/config.json") && err.contains(why), "{err}");
        }
        let dense_ty = "sentence_transformers.models.Dense";
        let normalize = "sentence_transformers.models.Normalize";
        for order in [
            &[(t, ""), (pool, "1_Pooling"), (normalize, "2_N"), (dense_ty, "2_Dense")][..],
            &[(t, ""), (dense_ty, "2_Dense")][..],
        ] {
            let why = unsupported(order);
            assert!(why.contains("out of the order"), "{why}");
        }
        let why = unsupported(&[]);
        assert!(why.contains("modules.json: lists no module"), "{why}");
    }

    /// A module folder the source lacks (an empty Normalize folder, which git and the hub do
    /// not keep) is written empty; the others are copied.
    #[test]
    fn copy_writes_the_modules_and_stands_in_for_missing_folders() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::create_dir_all(from.path().join("1_Pooling")).unwrap();
        std::fs::write(from.path().join("1_Pooling/config.json"), r#"{"pooling_mode": "mean"}"#)
            .unwrap();
        write_modules(
            from.path(),
            &[
                ("sentence_transformers.models.Transformer", ""),
                ("sentence_transformers.models.Pooling", "1_Pooling"),
                ("sentence_transformers.models.Normalize", "2_Normalize"),
            ],
        );
        copy(from.path(), to.path()).unwrap();
        let st = read(to.path()).unwrap().unwrap();
        assert_eq!((st.pooling, st.normalize), (Some(Ok(Pooling::Mean)), true));
        assert!(to.path().join("2_Normalize").is_dir());
    }

    #[test]
    fn prompts_are_the_non_empty_ones() {
        let dir = tempfile::tempdir().unwrap();
        assert!(prompts(dir.path()).is_empty(), "no file");
        let config = r#"{"prompts": {"query": "query: ", "document": "", "x": 3}}"#;
        std::fs::write(dir.path().join("config_sentence_transformers.json"), config).unwrap();
        assert_eq!(prompts(dir.path()), [("query".to_string(), "query: ".to_string())]);
    }

    #[test]
    fn module_paths_stay_inside_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let t = "sentence_transformers.models.Transformer";
        for path in ["../elsewhere", "/etc", "a/../../b"] {
            write_modules(dir.path(), &[(t, ""), ("sentence_transformers.models.Pooling", path)]);
            let err = read(dir.path()).err().unwrap().to_string();
            assert!(
                err.contains("modules.json") && err.contains("leaves the model folder"),
                "{err}"
            );
            let text = std::fs::read_to_string(dir.path().join("modules.json")).unwrap();
            assert!(module_folders(&text).is_empty(), "{path}");
        }
        write_modules(dir.path(), &[(t, ""), ("sentence_transformers.models.Dense", "2_Dense")]);
        let text = std::fs::read_to_string(dir.path().join("modules.json")).unwrap();
        assert_eq!(module_folders(&text), [("2_Dense".to_string(), Some(Kind::Dense))]);
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
