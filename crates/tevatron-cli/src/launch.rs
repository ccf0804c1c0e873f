//! `--nproc_per_node N`: torchrun's job inside the binary. The command starts itself N times
//! with the rendezvous variables set, waits for all ranks, and stops the others as soon as
//! one fails (a rank left alone would wait for its peers until `--ddp_timeout`).

use std::ffi::OsString;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Set in the ranks this launcher starts, so that a flag read from a JSON arguments file
/// (where it cannot be removed) does not start ranks again.
const LAUNCHED: &str = "TEVATRON_LAUNCHED_RANK";

/// Whether this process is a rank started by [`spawn_ranks`].
pub fn is_launched_rank() -> bool {
    std::env::var_os(LAUNCHED).is_some()
}

/// The arguments without `--nproc_per_node` and its value (in either spelling).
fn without_launcher_flag(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_value = false;
    for a in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = a.to_string_lossy().replace('-', "_");
        if text == "__nproc_per_node" {
            skip_value = true;
            continue;
        }
        if text.starts_with("__nproc_per_node=") {
            continue;
        }
        out.push(a.clone());
    }
    out
}

/// A port free on this machine now (the OS picks it); used when MASTER_PORT is not set.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Runs this command as `n` ranks on this machine and waits for them.
pub fn spawn_ranks(n: usize) -> Result<()> {
    spawn_some_ranks(n, &(0..n).collect::<Vec<_>>(), &[])
}

/// Makes a rank die with the launcher (Linux's parent-death signal): killed alone, the
/// launcher left its ranks running, writing the files a rerun then cleared beneath them.
fn die_with_launcher(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: `getpid` before the fork, and `prctl`/`getppid`/`_exit` after it, are
        // async-signal-safe calls that allocate nothing.
        let launcher = unsafe { libc::getpid() };
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                // The launcher may have died before the signal was asked for.
                if libc::getppid() != launcher {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Runs ranks `ranks` of an `n`-rank run of this command (the others' work is done already: an
/// encode resumed), with the variables `env` set in each besides the rendezvous ones, and
/// waits for them.
pub fn spawn_some_ranks(n: usize, ranks: &[usize], env: &[(&str, &str)]) -> Result<()> {
    if std::env::var_os("WORLD_SIZE").is_some() {
        bail!(
            "--nproc_per_node {n} with WORLD_SIZE already set: this process was started by a \
             launcher (torchrun, SLURM); drop --nproc_per_node or the launcher"
        );
    }
    let exe = std::env::current_exe().context("locating this binary to start the ranks")?;
    let args = without_launcher_flag(&std::env::args_os().skip(1).collect::<Vec<_>>());
    let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p,
        Err(_) => free_port()?.to_string(),
    };
    tracing::info!("starting {} of {n} ranks (MASTER_ADDR={addr} MASTER_PORT={port})", ranks.len());
    let mut children: Vec<Option<Child>> = Vec::with_capacity(ranks.len());
    for &rank in ranks {
        let mut command = Command::new(&exe);
        die_with_launcher(&mut command);
        let child = command
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", &port)
            .env(LAUNCHED, "1")
            .envs(env.iter().copied())
            .spawn()
            .with_context(|| format!("starting rank {rank}"));
        match child {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                stop(&mut children);
                return Err(e);
            }
        }
    }
    let mut failed: Vec<(usize, std::process::ExitStatus)> = Vec::new();
    let mut since_failure = 0;
    loop {
        let mut running = 0;
        for (k, &rank) in ranks.iter().enumerate() {
            let Some(child) = children[k].as_mut() else { continue };
            match child.try_wait().with_context(|| format!("waiting for rank {rank}"))? {
                None => running += 1,
                Some(status) if status.success() => children[k] = None,
                Some(status) => {
                    children[k] = None;
                    failed.push((rank, status));
                }
            }
        }
        // After a failure the others are given a moment to end by themselves: a rank killed
        // from outside (a signal, the OOM killer) makes its peers fail on the closed
        // connection, and the one to name is the rank that failed first, not rank 0.
        if !failed.is_empty() {
            since_failure += 1;
            if running == 0 || since_failure > 10 {
                let stopped = stop(&mut children);
                return Err(ranks_failed(&failed, stopped));
            }
        } else if running == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The error of a launch whose ranks failed: each with its status, those ended by a signal
/// first (no log of theirs says why), then in the order they were seen to end (by polls 0.1 s
/// apart: ranks that ended within one are in rank order); and how many were still running and
/// stopped.
fn ranks_failed(failed: &[(usize, std::process::ExitStatus)], stopped: usize) -> anyhow::Error {
    #[cfg(unix)]
    let by_signal = |s: &std::process::ExitStatus| {
        use std::os::unix::process::ExitStatusExt;
        s.signal().is_some()
    };
    #[cfg(not(unix))]
    let by_signal = |_: &std::process::ExitStatus| false;
    let mut order: Vec<&(usize, std::process::ExitStatus)> = failed.iter().collect();
    order.sort_by_key(|(_, s)| !by_signal(s));
    let said: Vec<String> =
        order.iter().map(|(rank, status)| format!("rank {rank} ({status})")).collect();
    let rest = match stopped {
        0 => String::new(),
        n => format!("; the {n} rank(s) still running were stopped"),
    };
    anyhow::anyhow!("{} failed{rest}", said.join(", then "))
}

/// Stops the children still running; returns how many were.
fn stop(children: &mut [Option<Child>]) -> usize {
    let mut stopped = 0;
    for child in children.iter_mut().flatten() {
        if matches!(child.try_wait(), Ok(None)) {
            stopped += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank killed by a signal is named first, whichever rank was seen to end first (its
    /// peers then fail on the closed connection, rank 0 among them).
    #[cfg(unix)]
    #[test]
    fn a_rank_killed_by_a_signal_is_named_first() {
        use std::os::unix::process::ExitStatusExt;
        let exit2 = std::process::ExitStatus::from_raw(2 << 8);
        let killed = std::process::ExitStatus::from_raw(9);
        let said = ranks_failed(&[(0, exit2), (1, killed)], 0).to_string();
        assert!(said.starts_with("rank 1 (signal: 9"), "{said}");
        assert!(said.ends_with("then rank 0 (exit status: 2) failed"), "{said}");
        let said = ranks_failed(&[(0, exit2)], 3).to_string();
        assert!(said.ends_with("failed; the 3 rank(s) still running were stopped"), "{said}");
    }

    #[test]
    fn the_launcher_flag_is_removed_in_both_spellings() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            without_launcher_flag(&args(&["train", "--nproc_per_node", "2", "--seed", "3"])),
            args(&["train", "--seed", "3"])
        );
        assert_eq!(
            without_launcher_flag(&args(&["train", "--nproc-per-node=4", "--quiet"])),
            args(&["train", "--quiet"])
        );
    }
}
