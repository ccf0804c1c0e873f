//! Where `--dataset_name/--dataset_path/--dataset_config/--dataset_split` point: local files
//! (`json` + a path or glob), a local folder, or a Hugging Face hub dataset id (looked up in the
//! hub cache, then downloaded when the network allows). The result is a sorted list of files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const DATA_EXTS: &[&str] = &[".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet"];

/// Files of a dataset folder that are no data whatever their extension (Hugging Face's
/// `FILES_TO_IGNORE`): its cards and the `datasets` library's own records.
const FILES_TO_IGNORE: &[&str] =
    &["README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json"];

fn is_data_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    DATA_EXTS.iter().any(|e| name.ends_with(e)) && !FILES_TO_IGNORE.contains(&name)
}

/// A data file in a compression this tool does not read (`train.jsonl.xz`): refused by name
/// rather than skipped, which would lose its rows in silence.
fn unread_compression(p: &Path) -> Option<&'static str> {
    let c = tevatron_ir::records::unread_compression(p)?;
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let inner = &name[..name.len() - c.len()];
    DATA_EXTS.iter().any(|e| inner.ends_with(e)).then_some(c)
}

/// Whether a file or folder name is hidden (`.cache`, `.gitattributes`) or a folder is
/// private (`__pycache__`): Hugging Face's data-file patterns leave those out.
fn hidden(p: &Path) -> bool {
    p.file_name().is_some_and(|n| {
        let n = n.to_string_lossy();
        n.starts_with('.') || (n.starts_with("__") && p.is_dir())
    })
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))?
    {
        let path = entry.with_context(|| format!("reading folder {}", dir.display()))?.path();
        if hidden(&path) {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if unread_compression(&path).is_some() {
            // Refused by name, with the readers' own message.
            tevatron_ir::records::check_readable(&path)?;
        } else if is_data_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Hugging Face's split keywords (`datasets.data_files.SPLIT_KEYWORDS`): a file or folder named
/// with one of a group's words belongs to that split.
const SPLIT_KEYWORDS: &[(&str, &[&str])] = &[
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];

/// What may stand beside a split keyword in a name (Hugging Face's `NON_WORDS_CHARS`).
fn separator(c: char) -> bool {
    "-._ ".contains(c) || c.is_ascii_digit()
}

/// Whether `name` holds `keyword` as a word: at its start or after a separator, and at its end
/// or before one; at the very end only where `at_end` allows it (a folder `nq-dev/`, not a file
/// `nq-dev`, which has an extension after it in Hugging Face's patterns).
fn names_word(name: &str, keyword: &str, at_end: bool) -> bool {
    name.match_indices(keyword).any(|(i, _)| {
        let before = name[..i].chars().next_back();
        let after = name[i + keyword.len()..].chars().next();
        let starts = before.is_none_or(separator);
        let ends = match after {
            None => at_end,
            Some(c) => separator(c),
        };
        starts && ends
    })
}

/// The split a name asks for, as its group of keywords (`dev` is one of `validation`'s); a name
/// of no group (`dl19`) is its own single keyword.
fn split_keywords(split: &str) -> Vec<&str> {
    SPLIT_KEYWORDS
        .iter()
        .find(|(name, words)| *name == split || words.contains(&split))
        .map_or_else(|| vec![split], |(_, words)| words.to_vec())
}

/// A sharded split file as the hub writes them: `data/<split>-00000-of-00003.parquet`; the
/// split's name, if so.
fn sharded_split(rel: &Path) -> Option<String> {
    if rel.parent()?.file_name()? != "data" {
        return None;
    }
    let name = rel.file_name()?.to_str()?;
    let (left, right) = name.split_once("-of-")?;
    let (split, shard) = left.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    let whole = !split.is_empty() && digits(shard) && right.get(..5).is_some_and(digits);
    whole.then(|| split.to_string())
}

/// Picks the files of one split (and configuration) from a dataset folder as Hugging Face's
/// data-file patterns do (`datasets.data_files.get_data_patterns`): sharded files
/// (`data/dev-00000-of-00001.parquet`, any split name) first; else folders named with a split
/// keyword (`train/`, `nq-dev/`), else file names holding one (`train.jsonl`, `nq-dev.jsonl`,
/// `eval.jsonl` for `test`); else every file is `train`. At each stage, once any file names a
/// split, only named files count: a split none names is refused, naming those found.
fn split_files(root: &Path, config: Option<&str>, split: &str) -> Result<Vec<PathBuf>> {
    let mut all = Vec::new();
    walk(root, &mut all)?;
    let rel = |p: &PathBuf| p.strip_prefix(root).map(Path::to_path_buf).unwrap_or_default();
    if let Some(cfg) = config {
        let named: Vec<PathBuf> = all
            .iter()
            .filter(|p| rel(p).components().any(|c| c.as_os_str() == cfg))
            .cloned()
            .collect();
        // Hugging Face names the one configuration of a dataset without any `default`.
        if !named.is_empty() || cfg != "default" {
            all = named;
        }
        if all.is_empty() {
            bail!(
                "{}: no folder is named after --dataset_config {cfg:?}, so no file belongs to it",
                root.display()
            );
        }
    }
    all.sort();
    let sharded: Vec<(String, &PathBuf)> =
        all.iter().filter_map(|p| Some((sharded_split(&rel(p))?, p))).collect();
    let pick = |found: Vec<(&str, &PathBuf)>, how: &str| -> Result<Vec<PathBuf>> {
        let wanted = split_keywords(split);
        let files: Vec<PathBuf> =
            found.iter().filter(|(s, _)| wanted.contains(s)).map(|(_, p)| (*p).clone()).collect();
        if files.is_empty() {
            let mut names: Vec<&str> = found.iter().map(|(s, _)| *s).collect();
            names.sort_unstable();
            names.dedup();
            bail!(
                "{}: no data files for split {split:?} (the splits its {how} name: {})",
                root.display(),
                names.join(", ")
            );
        }
        Ok(files)
    };
    if !sharded.is_empty() {
        return pick(sharded.iter().map(|(s, p)| (s.as_str(), *p)).collect(), "sharded file names");
    }
    // Every keyword a file's folders, or else its name, hold, with the file.
    let stage = |in_dirs: bool| -> Vec<(&str, &PathBuf)> {
        let mut found = Vec::new();
        let words = SPLIT_KEYWORDS.iter().flat_map(|(_, w)| w.iter().copied());
        let words: Vec<&str> =
            words.chain((split_keywords(split) == [split]).then_some(split)).collect();
        for p in &all {
            let r = rel(p);
            let names: Vec<String> = if in_dirs {
                r.parent()
                    .into_iter()
                    .flat_map(|d| d.components())
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect()
            } else {
                r.file_name().map(|n| n.to_string_lossy().into_owned()).into_iter().collect()
            };
            for w in &words {
                if names.iter().any(|n| names_word(n, w, in_dirs)) {
                    found.push((*w, p));
                }
            }
        }
        found
    };
    for (in_dirs, how) in [(true, "folder names"), (false, "file names")] {
        let found = stage(in_dirs);
        if !found.is_empty() {
            return pick(found, how);
        }
    }
    if split_keywords(split).contains(&"train") {
        return Ok(all);
    }
    bail!("{}: no data files for split {split:?} (no file or folder names a split: every file is train)", root.display())
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
    let p = flags.prefix();
    if split.contains('[') {
        bail!(
            "--{p}_split {split}: split slices are not supported here; cut the file (head -n), \
             or take a part with --dataset_number_of_shards and --dataset_shard_index"
        );
    }
    if path.is_none() && name != "json" && Path::new(name).is_file() {
        bail!("--{p}_name {name} is a file: give --{p}_name json --{p}_path {name}");
    }
    if let Some(pattern) = path {
        let base =
            if name != "json" && Path::new(name).is_dir() { Some(Path::new(name)) } else { None };
        // The files given are read whole: what else names a dataset or a part of one is said
        // to change nothing, rather than taken silently.
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
        // `data/**` is every file below `data` to Hugging Face (fsspec's glob); the glob here
        // reads a final `**` as folders only.
        let pattern = match pattern.strip_suffix("**") {
            Some(dir) if dir.is_empty() || dir.ends_with('/') => format!("{pattern}/*"),
            _ => pattern,
        };
        return tevatron_ir::vectors::expand_glob(&pattern)
            .with_context(|| format!("resolving --{}_path", flags.prefix()));
    }
    if name == "json" {
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
        if split != "train" && split != v1_split {
            bail!(
                "{name} names split {v1_split} (Tevatron v1's form) and --{p}_split names {split}: give one"
            );
        }
        tracing::info!("reading {name} as dataset {id}, split {v1_split} (Tevatron v1's form)");
        let root = hub_dataset(&id, cache_dir)?;
        return split_files(&root, config, v1_split);
    }
    let root = hub_dataset(name, cache_dir)?;
    split_files(&root, config, split)
}

/// The file a download of this tool leaves beside a dataset's snapshots while it fetches a
/// revision's data files (the revision's commit inside), removed once every file is in: a
/// snapshot it names is incomplete (the download stopped).
const PARTIAL: &str = "tevatron-partial";

/// The cached snapshot of a dataset folder (`datasets--org--name`): the one `refs/main` names,
/// else the newest; with whether a download of this tool stopped while filling it.
fn cached_snapshot(folder: &Path) -> Option<(PathBuf, bool)> {
    let snapshots = folder.join("snapshots");
    let main = std::fs::read_to_string(folder.join("refs/main")).ok();
    let snapshot = match main.map(|c| snapshots.join(c.trim())).filter(|s| s.is_dir()) {
        Some(s) => s,
        None => {
            let entries = std::fs::read_dir(&snapshots).ok()?;
            let mut snaps: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            snaps.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
            snaps.pop()?
        }
    };
    let partial = std::fs::read_to_string(folder.join(PARTIAL))
        .is_ok_and(|c| snapshot.file_name().is_some_and(|n| n.to_string_lossy() == c.trim()));
    Some((snapshot, partial))
}

/// A hub dataset's snapshot folder: from the cache, or downloaded (data files only).
fn hub_dataset(id: &str, cache_dir: Option<&Path>) -> Result<PathBuf> {
    let cache = tevatron_model::hub::cache_dir(cache_dir)?;
    let folder = cache.join(format!("datasets--{}", id.replace('/', "--")));
    let offline = tevatron_model::hub::offline();
    match cached_snapshot(&folder) {
        Some((snapshot, false)) => {
            tracing::info!("using dataset {id} from the hub cache at {}", snapshot.display());
            return Ok(snapshot);
        }
        Some((snapshot, true)) if offline => bail!(
            "dataset {id:?}: its cached snapshot {} is incomplete (a download stopped), and \
             HF_HUB_OFFLINE is set; run once online to complete it",
            snapshot.display()
        ),
        Some((snapshot, true)) => tracing::info!(
            "dataset {id}: completing the snapshot {} (a download stopped)",
            snapshot.display()
        ),
        None if offline => bail!(
            "dataset {id:?} is not a local folder and not in the Hugging Face cache at {} (HF_HUB_OFFLINE is set)",
            cache.display()
        ),
        None => {}
    }
    let download = || -> std::result::Result<PathBuf, String> {
        // The models' client: the same endpoint (HF_ENDPOINT) and token.
        let api = tevatron_model::hub::api(&cache)?;
        let repo = api.dataset(id.to_string());
        let info = repo.info().map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
        std::fs::write(folder.join(PARTIAL), &info.sha).map_err(|e| e.to_string())?;
        let mut root = None;
        for s in info.siblings {
            if is_data_file(Path::new(&s.rfilename)) {
                let local = repo.get(&s.rfilename).map_err(|e| e.to_string())?;
                let depth = Path::new(&s.rfilename).components().count();
                root = local.ancestors().nth(depth).map(Path::to_path_buf);
            }
        }
        let root = root.ok_or_else(|| format!("{id} has no JSONL or Parquet data files"))?;
        // Another process fetching the same revision (shards of one encode) may have finished
        // first and removed the marker, or started on a newer revision: only this download's
        // marker is removed, and its absence is no failure.
        let marker = folder.join(PARTIAL);
        if std::fs::read_to_string(&marker).is_ok_and(|c| c.trim() == info.sha) {
            let _ = std::fs::remove_file(&marker);
        }
        Ok(root)
    };
    download().map_err(|cause| match cached_snapshot(&folder) {
        Some((snapshot, true)) => anyhow::anyhow!(
            "dataset {id:?}: its cached snapshot {} is incomplete (a download stopped), and \
             completing it failed: {cause}",
            snapshot.display()
        ),
        _ => anyhow::anyhow!(
            "dataset {id:?} is not a local folder and not in the Hugging Face cache at {}, and downloading it failed: {cause}",
            cache.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files of each split of a folder holding `files` (relative paths, sorted), or the
    /// error.
    fn splits(files: &[&str], config: Option<&str>, split: &str) -> Result<Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "").unwrap();
        }
        Ok(split_files(dir.path(), config, split)?
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().to_string_lossy().into_owned())
            .collect())
    }

    /// The cached snapshot is `refs/main`'s, else the newest; one a stopped download of this
    /// tool named is marked incomplete.
    #[test]
    fn a_cached_snapshot_is_mains_and_a_stopped_download_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path();
        assert!(cached_snapshot(folder).is_none());
        for c in ["aaa", "bbb"] {
            std::fs::create_dir_all(folder.join("snapshots").join(c)).unwrap();
        }
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::write(folder.join("refs/main"), "aaa").unwrap();
        assert_eq!(cached_snapshot(folder), Some((folder.join("snapshots/aaa"), false)));
        std::fs::write(folder.join(PARTIAL), "aaa").unwrap();
        assert_eq!(cached_snapshot(folder), Some((folder.join("snapshots/aaa"), true)));
        std::fs::write(folder.join(PARTIAL), "bbb").unwrap();
        assert_eq!(cached_snapshot(folder), Some((folder.join("snapshots/aaa"), false)));
        // refs/main naming a folder that is not there: the newest snapshot.
        std::fs::write(folder.join("refs/main"), "ccc").unwrap();
        assert!(
            cached_snapshot(folder).is_some_and(|(s, _)| s.starts_with(folder.join("snapshots")))
        );
    }

    /// Forms Hugging Face reads otherwise are refused with what to give instead: a split slice,
    /// a file given as a dataset name, a v1 id's split beside another --dataset_split.
    #[test]
    fn forms_read_otherwise_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.jsonl");
        std::fs::write(&file, "{}\n").unwrap();
        let f = file.to_string_lossy().into_owned();
        let e = resolve(Flags::Dataset, "json", Some(&f), None, "train[:100]", None).unwrap_err();
        assert!(e.to_string().contains("split slices are not supported"), "{e}");
        let e = resolve(Flags::Corpus, &f, None, None, "train", None).unwrap_err().to_string();
        assert!(e.contains(&format!("give --corpus_name json --corpus_path {f}")), "{e}");
        let e = resolve(Flags::Dataset, "Tevatron/wikipedia-nq/test", None, None, "dev", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("names split test") && e.contains("names dev: give one"), "{e}");
        assert_eq!(resolve(Flags::Dataset, "json", Some(&f), None, "train", None).unwrap(), [file]);
        // `dir/**` is every file below it, as Hugging Face reads it.
        std::fs::create_dir_all(dir.path().join("d/e")).unwrap();
        std::fs::write(dir.path().join("d/e/x.jsonl"), "{}\n").unwrap();
        let all = format!("{}/d/**", dir.path().display());
        let got = resolve(Flags::Dataset, "json", Some(&all), None, "train", None).unwrap();
        assert_eq!(got, [dir.path().join("d/e/x.jsonl")]);
    }

    /// Hugging Face's data-file patterns: sharded names first, then folder names, then file
    /// names (a keyword as a word anywhere, with its group's other words), else all is train.
    #[test]
    fn folder_splits_follow_hugging_face_patterns() {
        let plain = ["train.jsonl", "dev.jsonl", "data/test-00000.jsonl.gz", "README.md"];
        assert_eq!(splits(&plain, None, "dev").unwrap(), ["dev.jsonl"]);
        assert_eq!(splits(&plain, None, "validation").unwrap(), ["dev.jsonl"]);
        assert_eq!(splits(&plain, None, "test").unwrap(), ["data/test-00000.jsonl.gz"]);
        assert_eq!(splits(&plain, None, "train").unwrap(), ["train.jsonl"]);
        let e = splits(&plain, None, "dl19").unwrap_err().to_string();
        assert!(e.contains("no data files for split \"dl19\""), "{e}");
        // A keyword as a word anywhere in the name, not only at its start.
        let nq = ["nq-train.jsonl", "nq-dev.jsonl"];
        assert_eq!(splits(&nq, None, "train").unwrap(), ["nq-train.jsonl"]);
        assert_eq!(splits(&nq, None, "dev").unwrap(), ["nq-dev.jsonl"]);
        // The groups' other words: training is train, eval is test.
        let words = ["training.jsonl", "eval.jsonl"];
        assert_eq!(splits(&words, None, "train").unwrap(), ["training.jsonl"]);
        assert_eq!(splits(&words, None, "test").unwrap(), ["eval.jsonl"]);
        // Once a file names a split, a file that names none is no split's.
        let e = splits(&["corpus.jsonl", "test.jsonl"], None, "train").unwrap_err().to_string();
        assert!(e.contains("file names name: test"), "{e}");
        // No keyword in a word's middle: "trainer" and "devices" name no split.
        let none = ["trainer.jsonl", "devices.jsonl"];
        assert_eq!(splits(&none, None, "train").unwrap(), ["devices.jsonl", "trainer.jsonl"]);
        // Folder names before file names.
        let dirs = ["train/a.jsonl", "dev/b.jsonl", "test.jsonl"];
        assert_eq!(splits(&dirs, None, "train").unwrap(), ["train/a.jsonl"]);
        assert!(splits(&dirs, None, "test").is_err(), "test.jsonl is not read at the folder stage");
        // The hub's sharded names, any split name.
        let sharded = [
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/dl19-00000-of-00001-abc.parquet",
        ];
        assert_eq!(
            splits(&sharded, None, "dl19").unwrap(),
            ["data/dl19-00000-of-00001-abc.parquet"]
        );
        assert_eq!(splits(&sharded, None, "train").unwrap().len(), 2);
        // Hidden files are no data; a configuration names a folder, and one that names none is
        // refused.
        let cfgs = ["scifact/test.jsonl", "nfcorpus/test.jsonl", ".cache/test.jsonl"];
        assert_eq!(splits(&cfgs, Some("scifact"), "test").unwrap(), ["scifact/test.jsonl"]);
        assert_eq!(splits(&cfgs, None, "test").unwrap().len(), 2);
        let e = splits(&cfgs, Some("fiqa"), "test").unwrap_err().to_string();
        assert!(e.contains("--dataset_config \"fiqa\""), "{e}");
        // The datasets library's own records are no data.
        let recorded = ["dataset_info.json", "config.json", "corpus.jsonl", "__x/a.jsonl"];
        assert_eq!(splits(&recorded, None, "train").unwrap(), ["corpus.jsonl"]);
        // A compression not read here is refused by name, not skipped.
        let e = splits(&["train-0.jsonl", "train-1.jsonl.xz"], None, "train").unwrap_err();
        assert!(e.to_string().contains("train-1.jsonl.xz: .xz files are not read here"), "{e}");
    }
}
