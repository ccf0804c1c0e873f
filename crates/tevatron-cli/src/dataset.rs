//! Where `--dataset_name/--dataset_path/--dataset_config/--dataset_split` point: local files
//! (`json` + a path or glob), a local folder, or a Hugging Face hub dataset id (looked up in the
//! hub cache, then downloaded when the network allows). The result is a sorted list of files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const DATA_EXTS: &[&str] = &[".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet"];

fn is_data_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    DATA_EXTS.iter().any(|e| name.ends_with(e))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))?
    {
        let path = entry.with_context(|| format!("reading folder {}", dir.display()))?.path();
        if path.is_dir() {
            if !path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                walk(&path, out)?;
            }
        } else if is_data_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Picks the files of one split (and configuration) from a dataset folder, the way Hugging Face
/// data-file patterns do: files or folders named after the split (`dev.jsonl`,
/// `data/dev-00000.parquet`), or, for `train`, everything when nothing names a split.
fn split_files(root: &Path, config: Option<&str>, split: &str) -> Result<Vec<PathBuf>> {
    let mut all = Vec::new();
    walk(root, &mut all)?;
    if let Some(cfg) = config {
        let in_cfg: Vec<PathBuf> = all
            .iter()
            .filter(|p| {
                p.strip_prefix(root).is_ok_and(|r| r.components().any(|c| c.as_os_str() == cfg))
            })
            .cloned()
            .collect();
        if !in_cfg.is_empty() {
            all = in_cfg;
        }
    }
    let names_split = |p: &Path, s: &str| {
        p.strip_prefix(root).is_ok_and(|r| {
            r.components().any(|c| {
                let c = c.as_os_str().to_string_lossy();
                c == s
                    || c.starts_with(&format!("{s}."))
                    || c.starts_with(&format!("{s}-"))
                    || c.starts_with(&format!("{s}_"))
            })
        })
    };
    let mut files: Vec<PathBuf> = all.iter().filter(|p| names_split(p, split)).cloned().collect();
    if files.is_empty() && split == "train" {
        let known = ["dev", "test", "validation", "valid"];
        files = all.into_iter().filter(|p| !known.iter().any(|s| names_split(p, s))).collect();
    }
    files.sort();
    if files.is_empty() {
        bail!("{}: no data files for split {split:?}", root.display());
    }
    Ok(files)
}

/// Which flags name the data, for messages.
#[derive(Clone, Copy, Debug)]
pub enum Flags {
    /// `--dataset_name`, `--dataset_path`, ...
    Dataset,
    /// `--corpus_name`, `--corpus_path`, ...
    Corpus,
}

impl Flags {
    fn prefix(self) -> &'static str {
        match self {
            Flags::Dataset => "dataset",
            Flags::Corpus => "corpus",
        }
    }
}

/// Resolves the dataset flags to data files.
pub fn resolve(
    flags: Flags,
    name: &str,
    path: Option<&str>,
    config: Option<&str>,
    split: &str,
    cache_dir: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    if let Some(pattern) = path {
        let base =
            if name != "json" && Path::new(name).is_dir() { Some(Path::new(name)) } else { None };
        // The files given are read whole: what else names a dataset or a part of one is said
        // to change nothing, rather than taken silently.
        let p = flags.prefix();
        let unused = [
            (name != "json" && base.is_none()).then(|| format!("--{p}_name {name}")),
            config.map(|c| format!("--{p}_config {c}")),
            (split != "train").then(|| format!("--{p}_split {split}")),
        ];
        for flag in unused.into_iter().flatten() {
            tracing::info!("{flag} changes nothing here: --{p}_path {pattern} is read whole");
        }
        let pattern = match base {
            Some(b) if Path::new(pattern).is_relative() => {
                b.join(pattern).to_string_lossy().into_owned()
            }
            _ => pattern.to_string(),
        };
        return tevatron_ir::vectors::expand_glob(&pattern)
            .with_context(|| format!("resolving --{}_path", flags.prefix()));
    }
    if name == "json" {
        let p = flags.prefix();
        bail!("--{p}_name json needs --{p}_path (a file or a quoted glob)");
    }
    let dir = Path::new(name);
    if dir.is_dir() {
        return split_files(dir, config, split);
    }
    // Tevatron v1 spelled a split into the id (`Tevatron/wikipedia-nq/test`); its DataArguments
    // cut the last part off as the split, and so does this.
    let hub_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let parts: Vec<&str> = name.split('/').collect();
    if let [org, dataset, v1_split] = parts[..] {
        if !parts.iter().all(|p| hub_part(p)) {
            bail!("dataset {name:?} is neither a local folder nor a hub dataset id (org/name)");
        }
        let id = format!("{org}/{dataset}");
        tracing::info!("reading {name} as dataset {id}, split {v1_split} (Tevatron v1's form)");
        let root = hub_dataset(&id, cache_dir)?;
        return split_files(&root, config, v1_split);
    }
    let root = hub_dataset(name, cache_dir)?;
    split_files(&root, config, split)
}

/// A hub dataset's snapshot folder: from the cache, or downloaded (data files only).
fn hub_dataset(id: &str, cache_dir: Option<&Path>) -> Result<PathBuf> {
    let cache = tevatron_model::hub::cache_dir(cache_dir)?;
    let folder = cache.join(format!("datasets--{}", id.replace('/', "--")));
    let snapshots = folder.join("snapshots");
    if let Ok(entries) = std::fs::read_dir(&snapshots) {
        let mut snaps: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        snaps.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        if let Some(latest) = snaps.pop() {
            tracing::info!("using dataset {id} from the hub cache at {}", latest.display());
            return Ok(latest);
        }
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    if offline {
        bail!(
            "dataset {id:?} is not a local folder and not in the Hugging Face cache at {} (HF_HUB_OFFLINE is set)",
            cache.display()
        );
    }
    let download = || -> std::result::Result<PathBuf, String> {
        // The models' client: the same endpoint (HF_ENDPOINT) and token.
        let api = tevatron_model::hub::api(&cache)?;
        let repo = api.dataset(id.to_string());
        let info = repo.info().map_err(|e| e.to_string())?;
        let mut root = None;
        for s in info.siblings {
            if is_data_file(Path::new(&s.rfilename)) {
                let local = repo.get(&s.rfilename).map_err(|e| e.to_string())?;
                let depth = Path::new(&s.rfilename).components().count();
                root = local.ancestors().nth(depth).map(Path::to_path_buf);
            }
        }
        root.ok_or_else(|| format!("{id} has no JSONL or Parquet data files"))
    };
    download().map_err(|cause| {
        anyhow::anyhow!(
            "dataset {id:?} is not a local folder and not in the Hugging Face cache at {}, and downloading it failed: {cause}",
            cache.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_splits_follow_file_names() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["train.jsonl", "dev.jsonl", "data/test-00000.jsonl.gz", "README.md"] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "").unwrap();
        }
        let names = |split: &str| -> Vec<String> {
            split_files(dir.path(), None, split)
                .unwrap()
                .iter()
                .map(|p| p.strip_prefix(dir.path()).unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names("dev"), ["dev.jsonl"]);
        assert_eq!(names("test"), ["data/test-00000.jsonl.gz"]);
        assert_eq!(names("train"), ["train.jsonl"]);
        let e = split_files(dir.path(), None, "dl19").unwrap_err().to_string();
        assert!(e.ends_with(": no data files for split \"dl19\""), "{e}");
    }
}
