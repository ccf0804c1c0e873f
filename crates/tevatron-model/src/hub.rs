//! Where a `--model_name_or_path` lives: a local folder, or a Hugging Face hub id resolved
//! through the standard cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`) and downloaded with the hub client when the network allows.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::{st_modules, Error, Result};

/// Files beside a model's `tokenizer.json` that shape its tokenizer, fetched when they exist.
const TOKENIZER_FILES: &[&str] = &["tokenizer_config.json", "special_tokens_map.json"];
const WEIGHT_FILES: &[&str] =
    &["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"];

/// The hub cache folder, honouring `cache_dir`, `HF_HUB_CACHE` and `HF_HOME` (as
/// huggingface_hub does, without its `XDG_CACHE_HOME` fallback), else
/// `~/.cache/huggingface/hub`; an error naming the ways to set it
/// when there is no home folder (hf-hub's own default panics there).
pub fn cache_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    cache_dir_from(explicit, |name| std::env::var_os(name), std::env::home_dir)
}

/// [`cache_dir`] with the environment and the home folder given, so that tests need not
/// change the process's environment.
fn cache_dir_from(
    explicit: Option<&Path>,
    var: impl Fn(&str) -> Option<OsString>,
    home: impl FnOnce() -> Option<PathBuf>,
) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = var("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    match hf_home(&var, home) {
        Some(h) => Ok(h.join("hub")),
        None => Err(Error::NotFound(
            "no Hugging Face cache folder: HOME is unset or empty and the user has no home folder; \
             set HF_HOME or HF_HUB_CACHE, or pass --cache_dir"
                .into(),
        )),
    }
}

/// huggingface_hub's own folder: `HF_HOME`, else `~/.cache/huggingface` (the cache's parent by
/// default, and where `huggingface-cli login` writes the token).
fn hf_home(
    var: impl Fn(&str) -> Option<OsString>,
    home: impl FnOnce() -> Option<PathBuf>,
) -> Option<PathBuf> {
    if let Some(p) = var("HF_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let home = home().filter(|h| !h.as_os_str().is_empty())?;
    Some(home.join(".cache").join("huggingface"))
}

/// Whether `HF_HUB_OFFLINE` forbids downloads (set, and neither empty nor `0`), as
/// huggingface_hub reads it; for models and datasets alike.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Whether a name that is not a local folder can be a hub id (`name` or `org/name`).
fn looks_like_id(name: &str) -> bool {
    !name.is_empty() && !name.starts_with(['.', '/']) && name.split('/').count() <= 2
}

/// Resolves a model folder or hub id to a local folder holding its files. `needs_tokenizer`
/// is false when the tokenizer comes from elsewhere (`--tokenizer_name`): a repository without
/// a `tokenizer.json` is then fine. The config, tokenizer and weights are looked for in the
/// folder sentence-transformers' `modules.json` puts the Transformer in (`0_Transformer/` in
/// older models), as loading a local folder does.
pub fn resolve_model(
    name_or_path: &str,
    cache: Option<&Path>,
    needs_tokenizer: bool,
) -> Result<PathBuf> {
    let path = Path::new(name_or_path);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_id(name_or_path) {
        return Err(Error::NotFound(format!("model folder {name_or_path} does not exist")));
    }
    let cache_path = cache_dir(cache)?;
    let repo = Repo::new(name_or_path.to_string(), RepoType::Model);
    let cached = Cache::new(cache_path.clone()).repo(repo.clone());
    let mut repo = repo;
    let modules = cached.get("modules.json");
    let modules_text = read_modules(modules.as_deref());
    let t = modules_text.as_deref().map(st_modules::transformer_prefix).unwrap_or_default();
    let tokenizer_cached = !needs_tokenizer
        || cached.get(&format!("{t}tokenizer.json")).is_some()
        || cached.get("tokenizer.json").is_some();
    if let (Some(config), true) = (cached.get(&format!("{t}config.json")), tokenizer_cached) {
        let snapshot = snapshot_of(&config, modules.as_deref(), &t);
        if WEIGHT_FILES.iter().any(|w| cached.get(&format!("{t}{w}")).is_some()) {
            if (weights_cached(&cached, &t) && modules_cached(&cached, modules_text.as_deref()))
                || offline()
            {
                tracing::info!("using {name_or_path} from the hub cache at {}", snapshot.display());
                return Ok(snapshot);
            }
            // A cache filled by a build that fetched no module folders, or by a download of
            // a sharded model that stopped between shards, is completed, at the cached
            // snapshot's revision (files of a newer one would land in another folder).
            if let Some(commit) = snapshot.file_name().and_then(|c| c.to_str()) {
                repo =
                    Repo::with_revision(name_or_path.to_string(), RepoType::Model, commit.into());
            }
        }
    }
    if offline() {
        return Err(Error::NotFound(format!(
            "model {name_or_path:?} is not a local folder and not in the Hugging Face cache at {} \
             (HF_HUB_OFFLINE is set, so it was not downloaded)",
            cache_path.display()
        )));
    }
    download(name_or_path, repo, &cache_path, needs_tokenizer).map_err(|cause| {
        Error::NotFound(format!(
            "model {name_or_path:?} is not a local folder and not in the Hugging Face cache at {}, \
             and downloading it failed: {cause}",
            cache_path.display()
        ))
    })
}

/// The text of a model's `modules.json`, read once for every use; `None` without one, or when
/// it cannot be read (loading reports that).
fn read_modules(modules: Option<&Path>) -> Option<String> {
    std::fs::read_to_string(modules?).ok()
}

/// The snapshot folder of a model whose config was found at `config`: its folder, or, for a
/// Transformer in a sub-folder, the folder of the `modules.json` that named it.
fn snapshot_of(config: &Path, modules: Option<&Path>, t: &str) -> PathBuf {
    let file = match modules {
        Some(m) if !t.is_empty() => m,
        _ => config,
    };
    file.parent().expect("a cached file has a folder").to_path_buf()
}

/// The shard files a `model.safetensors.index.json` names, each once.
fn index_shards(index: &Path) -> std::result::Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index).map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let mut shards: Vec<String> = v["weight_map"]
        .as_object()
        .map(|m| m.values().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    shards.sort_unstable();
    shards.dedup();
    Ok(shards)
}

/// Whether a cached model holds its weights: a weight file, and with a sharded checkpoint's
/// index every shard it names (a download stopped between shards left the others out, and
/// every later run failed on the first missing one).
fn weights_cached(cached: &hf_hub::CacheRepo, t: &str) -> bool {
    WEIGHT_FILES.iter().any(|w| match cached.get(&format!("{t}{w}")) {
        None => false,
        Some(index) if *w == "model.safetensors.index.json" => index_shards(&index)
            .is_ok_and(|shards| shards.iter().all(|s| cached.get(&format!("{t}{s}")).is_some())),
        Some(_) => true,
    })
}

/// Whether a cached model holds the files its sentence-transformers modules (its
/// `modules.json` text) need (true when it has none).
fn modules_cached(cached: &hf_hub::CacheRepo, modules: Option<&str>) -> bool {
    let Some(text) = modules else { return true };
    st_modules::module_folders(text).into_iter().all(|(folder, kind)| {
        st_modules::required_files(kind).iter().all(|alternatives| {
            alternatives.iter().any(|f| cached.get(&format!("{folder}/{f}")).is_some())
        })
    })
}

/// The hub client, for models and datasets alike: files go to `cache_path` in the hub's cache
/// layout; `HF_ENDPOINT` (a mirror or a private hub, as huggingface_hub reads it) replaces
/// `https://huggingface.co`; the token is found as huggingface_hub finds it (`HF_TOKEN`, then
/// `HF_TOKEN_PATH`, then `$HF_HOME/token`).
pub fn api(cache_path: &Path) -> std::result::Result<hf_hub::api::sync::Api, String> {
    let mut builder =
        hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(cache_path.to_path_buf()))
            .with_progress(false);
    if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.trim().is_empty()) {
        builder = builder.with_endpoint(endpoint.trim().trim_end_matches('/').to_string());
    }
    if let Some(token) = token() {
        builder = builder.with_token(Some(token));
    }
    builder.build().map_err(|e| e.to_string())
}

/// The access token for gated and private repositories, found as huggingface_hub finds it:
/// `HF_TOKEN`, else the file `HF_TOKEN_PATH` names, else `$HF_HOME/token` (by default
/// `~/.cache/huggingface/token`, where `huggingface-cli login` writes it). None when there is
/// none, and the client then also looks beside its cache folder, as hf-hub does by itself
/// (which alone missed `HF_TOKEN` and any cache outside `HF_HOME/hub`).
fn token() -> Option<String> {
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if let Some(token) = set("HF_TOKEN") {
        return Some(token.trim().to_string());
    }
    let file = match set("HF_TOKEN_PATH") {
        Some(path) => PathBuf::from(path),
        None => hf_home(|name| std::env::var_os(name), std::env::home_dir)?.join("token"),
    };
    let text = std::fs::read_to_string(file).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

fn download(
    name: &str,
    repo: Repo,
    cache_path: &Path,
    needs_tokenizer: bool,
) -> std::result::Result<PathBuf, String> {
    let api = api(cache_path)?.repo(repo);
    // Optional files: a 404 just means the model does not have them.
    let modules = api.get("modules.json").ok();
    let modules_text = read_modules(modules.as_deref());
    let t = modules_text.as_deref().map(st_modules::transformer_prefix).unwrap_or_default();
    let config = api.get(&format!("{t}config.json")).map_err(|e| e.to_string())?;
    // The tokenizer beside the config, else (a Transformer in a sub-folder) at the top.
    let tokenizer = api.get(&format!("{t}tokenizer.json")).or_else(|e| match t.is_empty() {
        true => Err(e),
        false => api.get("tokenizer.json"),
    });
    match tokenizer {
        Ok(found) => {
            let prefix = if found.parent() == config.parent() { t.as_str() } else { "" };
            for f in TOKENIZER_FILES {
                let _ = api.get(&format!("{prefix}{f}"));
            }
        }
        Err(e) if needs_tokenizer => {
            return Err(format!(
                "{name} has no tokenizer.json ({e}); give one with --tokenizer_name"
            ))
        }
        Err(_) => {}
    }
    // The sentence-transformers modules' folders: each one's config (a Normalize folder may
    // have none), and the files its kind needs (a Dense module's weights).
    if let Some(text) = &modules_text {
        for (folder, kind) in st_modules::module_folders(text) {
            let _ = api.get(&format!("{folder}/config.json"));
            for alternatives in st_modules::required_files(kind) {
                let _ = alternatives.iter().find(|f| api.get(&format!("{folder}/{f}")).is_ok());
            }
        }
    }
    let mut found = false;
    for w in WEIGHT_FILES {
        if let Ok(p) = api.get(&format!("{t}{w}")) {
            found = true;
            if *w == "model.safetensors.index.json" {
                for s in index_shards(&p)? {
                    api.get(&format!("{t}{s}")).map_err(|e| e.to_string())?;
                }
            }
            break;
        }
    }
    if !found {
        return Err(format!("{name} has none of {WEIGHT_FILES:?}"));
    }
    Ok(snapshot_of(&config, modules.as_deref(), &t))
}

/// Resolves `--tokenizer_name`: a local folder, or a hub id of which only the tokenizer files
/// are needed.
pub fn resolve_model_tokenizer(name_or_path: &str, cache: Option<&Path>) -> Result<PathBuf> {
    resolve_files(
        name_or_path,
        cache,
        "tokenizer",
        &[&["tokenizer.json"]],
        // `config.json` too: transformers' AutoTokenizer reads the model type from it (an
        // XLM-R repository without a tokenizer_config.json is told apart by it alone).
        &["tokenizer_config.json", "special_tokens_map.json", "config.json"],
    )
}

/// Resolves `--lora_name_or_path`: a local adapter folder, or a hub id of which only the
/// adapter files (`adapter_config.json`, and `adapter_model.safetensors` or the pickle older
/// PEFT wrote, `adapter_model.bin`) are needed.
pub fn resolve_adapter(name_or_path: &str, cache: Option<&Path>) -> Result<PathBuf> {
    resolve_files(
        name_or_path,
        cache,
        "adapter",
        &[&["adapter_config.json"], &["adapter_model.safetensors", "adapter_model.bin"]],
        &[],
    )
}

/// A local folder, or the hub-cache (or freshly downloaded) snapshot of a repository holding
/// the `required` files, each requirement met by one of its alternatives (and the `optional`
/// ones when they exist).
fn resolve_files(
    name_or_path: &str,
    cache: Option<&Path>,
    what: &str,
    required: &[&[&str]],
    optional: &[&str],
) -> Result<PathBuf> {
    let path = Path::new(name_or_path);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_id(name_or_path) {
        return Err(Error::NotFound(format!("{what} folder {name_or_path} does not exist")));
    }
    let cache_path = cache_dir(cache)?;
    let repo = Repo::new(name_or_path.to_string(), RepoType::Model);
    let cached = Cache::new(cache_path.clone()).repo(repo.clone());
    // Each requirement is met by the first of its alternatives there is.
    let found: Option<Vec<PathBuf>> =
        required.iter().map(|any| any.iter().find_map(|f| cached.get(f))).collect();
    if let Some(first) = found.as_ref().and_then(|f| f.first()) {
        return Ok(first.parent().expect("cached file has a folder").to_path_buf());
    }
    if offline() {
        return Err(Error::NotFound(format!(
            "{what} {name_or_path:?} is not a local folder and not in the Hugging Face cache at {} (HF_HUB_OFFLINE is set)",
            cache_path.display()
        )));
    }
    let fetch = || -> std::result::Result<PathBuf, String> {
        let api = api(&cache_path)?.repo(repo);
        let mut folder = None;
        for any in required {
            let mut got = Err(format!("none of {any:?}"));
            for f in *any {
                got = api.get(f).map_err(|e| e.to_string());
                if got.is_ok() {
                    break;
                }
            }
            folder = got?.parent().map(Path::to_path_buf);
        }
        for f in optional {
            let _ = api.get(f);
        }
        folder.ok_or_else(|| "nothing to download".to_string())
    };
    fetch().map_err(|cause| {
        Error::NotFound(format!(
            "{what} {name_or_path:?} is not a local folder and not in the Hugging Face cache at {}, and downloading it failed: {cause}",
            cache_path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn cache_dir_follows_huggingface_hub_order() {
        let home = || Some(PathBuf::from("/home/u"));
        let all = [("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h")];
        let explicit = cache_dir_from(Some(Path::new("/e")), env(&all), home).unwrap();
        assert_eq!(explicit, Path::new("/e"));
        assert_eq!(cache_dir_from(None, env(&all), home).unwrap(), Path::new("/c"));
        let hf_home = [("HF_HUB_CACHE", ""), ("HF_HOME", "/h")];
        assert_eq!(cache_dir_from(None, env(&hf_home), home).unwrap(), Path::new("/h/hub"));
        assert_eq!(
            cache_dir_from(None, env(&[]), home).unwrap(),
            Path::new("/home/u/.cache/huggingface/hub")
        );
    }

    /// No HOME and no passwd entry: hf-hub's `Cache::default` panicked; this is an error that
    /// says what to set.
    #[test]
    fn no_home_folder_is_an_error_naming_the_remedies() {
        let err = cache_dir_from(None, env(&[]), || None).unwrap_err().to_string();
        assert!(err.contains("HF_HOME") && err.contains("--cache_dir"), "{err}");
    }
}
