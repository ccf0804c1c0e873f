//! Outputs are written to a temporary file beside the target and renamed into place, so that a
//! crash or an error never leaves a half-written file under the final name.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A file being written under a temporary name; [`AtomicFile::commit`] renames it into place.
/// Dropping it without committing removes the temporary file.
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    writer: Option<BufWriter<File>>,
    /// Set once the rename succeeded: until then, dropping removes the temporary file (a
    /// failed sync or rename left the whole output there under its temporary name).
    committed: bool,
}

impl AtomicFile {
    /// Creates the parent folder if needed and opens `target.tmp.<pid>.<n>` for writing (`n`
    /// counts this process's files, so that threads writing the same target, such as ranks
    /// of a data-parallel test indexing one dataset, never share a temporary file).
    pub fn create(target: &Path) -> Result<Self> {
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|source| Error::Write { path: parent.to_path_buf(), source })?;
        }
        remove_orphans(target);
        let mut name = target.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        name.push(format!(".tmp.{}.{n}", std::process::id()));
        let temp = target.with_file_name(name);
        let file = File::create(&temp)
            .map_err(|source| Error::Write { path: target.to_path_buf(), source })?;
        // Held until the rename: another process (on another machine sharing the folder, whose
        // pids this one cannot see) tells a live temporary file from an orphan by it. A file
        // system without locks leaves the file unlocked, and the pid check still guards it.
        let _ = file.try_lock();
        Ok(Self {
            target: target.to_path_buf(),
            temp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            committed: false,
        })
    }

    /// The buffered writer of the temporary file.
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.writer.as_mut().expect("writer is present until commit")
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Maps an I/O error to a write error naming the final path.
    pub fn err(&self, source: std::io::Error) -> Error {
        Error::Write { path: self.target.clone(), source }
    }

    /// Flushes, syncs and renames the temporary file to the final path.
    pub fn commit(mut self) -> Result<()> {
        let writer = self.writer.take().expect("writer is present until commit");
        let file = writer.into_inner().map_err(|e| self.err(e.into_error()))?;
        file.sync_all().map_err(|e| self.err(e))?;
        // Renamed while still open, so that its lock is held until it has its final name.
        std::fs::rename(&self.temp, &self.target).map_err(|e| self.err(e))?;
        self.committed = true;
        drop(file);
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.writer().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            drop(self.writer.take());
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Removes the temporary files of `target` that processes which are no longer running left
/// (killed before they could rename or remove them: `target.tmp.<pid>.<n>`): those whose pid
/// no process of this machine has and whose lock no writer holds (a writer on another machine
/// sharing the folder holds its file's lock). Where the running processes cannot be known (no
/// `/proc`), nothing is removed.
fn remove_orphans(target: &Path) {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!("{}.tmp.", name.to_string_lossy());
    let counter = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    for file in orphans_in(dir, &prefix, counter, Path::to_path_buf) {
        let _ = std::fs::remove_file(file);
    }
}

/// The entries of `dir` named `<prefix><pid>.<suffix>` (`suffix_ok` saying which suffixes are
/// the maker's) that a run which is gone left: no process of this machine has the pid, and
/// none holds the lock file `lock_of` names for the entry. The one rule for a killed run's
/// temporary files and folders.
pub fn orphans_in(
    dir: &Path,
    prefix: &str,
    suffix_ok: impl Fn(&str) -> bool,
    lock_of: impl Fn(&Path) -> PathBuf,
) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((pid, suffix)) = name.strip_prefix(prefix).and_then(|r| r.split_once('.'))
            else {
                return false;
            };
            suffix_ok(suffix) && orphaned(pid, &lock_of(&entry.path()))
        })
        .map(|entry| entry.path())
        .collect()
}

/// Whether two files' metadata are of one file: the same device and inode where there are
/// such (a hard link or another spelling of the path included).
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        a.dev() == b.dev() && a.ino() == b.ino()
    }
    #[cfg(not(unix))]
    {
        a.len() == b.len()
            && a.modified().ok() == b.modified().ok()
            && a.created().ok() == b.created().ok()
    }
}

/// Whether a temporary file or folder that process `pid` made, locked by its `lock` file while
/// in use, was left by a run that is gone: no process of this machine has the pid, and no
/// process (of any machine sharing the folder, whose pids this one cannot see) holds the lock;
/// a lock file that is not there is held by no one. False where the running processes cannot
/// be known (no `/proc`), or `pid` is not one.
fn orphaned(pid: &str, lock: &Path) -> bool {
    let unlocked = |p: &Path| File::open(p).is_ok_and(|f| f.try_lock().is_ok());
    Path::new("/proc/self").exists()
        && pid.parse::<u32>().is_ok()
        && !Path::new("/proc").join(pid).exists()
        && (!lock.exists() || unlocked(lock))
}

/// Refuses an output path that names one of the command's inputs of another kind (a corpus
/// written over by its embeddings), which would destroy the input; inputs of the output's own
/// kind, read whole before the output is written, may be replaced in place and are not passed.
pub fn refuse_input_as_output(output: &Path, inputs: &[PathBuf], flag: &str) -> Result<()> {
    let Ok(out) = std::fs::metadata(output) else { return Ok(()) };
    for input in inputs {
        if std::fs::metadata(input).is_ok_and(|i| same_file(&i, &out)) {
            return Err(Error::Invalid(format!(
                "{flag} {} is one of the inputs ({}): writing it would destroy that input; \
                 give another path",
                output.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed rename (the target is a folder) leaves no temporary file, and a temporary file
    /// of a process that is gone is removed by the next write of the same target.
    #[test]
    fn temporary_files_do_not_outlive_their_writer() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("out");
        std::fs::create_dir(&folder).unwrap();
        let mut f = AtomicFile::create(&folder).unwrap();
        f.writer().write_all(b"x").unwrap();
        assert!(f.commit().is_err());
        let names = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(), ["out"]);
        // A pid no process has (beyond Linux's pid_max), and this process's own.
        let target = dir.path().join("r.tsv");
        std::fs::write(dir.path().join("r.tsv.tmp.4294967290.0"), "stale").unwrap();
        let mine = format!("r.tsv.tmp.{}.999", std::process::id());
        std::fs::write(dir.path().join(&mine), "live").unwrap();
        // A dead pid whose file a writer still locks (another machine's process) is kept.
        let held = "r.tsv.tmp.4294967291.0".to_string();
        let lock = File::create(dir.path().join(&held)).unwrap();
        lock.try_lock().unwrap();
        let mut f = AtomicFile::create(&target).unwrap();
        f.writer().write_all(b"new").unwrap();
        f.commit().unwrap();
        drop(lock);
        let want: Vec<String> = if Path::new("/proc/self").exists() {
            vec!["out".into(), "r.tsv".into(), held, mine]
        } else {
            vec!["out".into(), "r.tsv".into(), "r.tsv.tmp.4294967290.0".into(), held, mine]
        };
        let mut want = want;
        want.sort();
        assert_eq!(names(), want);
    }

    #[test]
    fn an_input_of_another_kind_is_not_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("c.jsonl");
        std::fs::write(&corpus, "{}\n").unwrap();
        let spelled = dir.path().join(".").join("c.jsonl");
        let e = refuse_input_as_output(&spelled, std::slice::from_ref(&corpus), "--out");
        assert!(e.unwrap_err().to_string().contains("is one of the inputs"));
        let other = dir.path().join("e.safetensors");
        assert!(refuse_input_as_output(&other, std::slice::from_ref(&corpus), "--out").is_ok());
        // A hard link of the input is the input.
        let link = dir.path().join("link.jsonl");
        std::fs::hard_link(&corpus, &link).unwrap();
        assert!(refuse_input_as_output(&link, &[corpus], "--out").is_err());
    }
}
