//! Where ranks meet: torchrun's variables and the wait allowed.

use std::time::Duration;

use crate::{Error, Result};

/// Where ranks meet and how long they wait for each other.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    /// This process's rank (`RANK`).
    pub rank: usize,
    /// Number of ranks (`WORLD_SIZE`).
    pub world_size: usize,
    /// Rank 0's host (`MASTER_ADDR`).
    pub master_addr: String,
    /// Rank 0's port (`MASTER_PORT`).
    pub master_port: u16,
    /// Longest wait for another rank, at the meeting and in every collective (`--ddp_timeout`).
    pub timeout: Duration,
}

impl Rendezvous {
    /// Reads torchrun's variables (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) through
    /// `var`; `None` when `WORLD_SIZE` is unset or 1.
    pub fn from_env(
        var: impl Fn(&str) -> Option<String>,
        timeout: Duration,
    ) -> Result<Option<Self>> {
        let number = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::Invalid(format!("{name}={v:?} is not a non-negative integer"))
                }),
            }
        };
        let world_size = number("WORLD_SIZE")?.unwrap_or(1);
        if world_size <= 1 {
            return Ok(None);
        }
        let rank = number("RANK")?.ok_or_else(|| {
            Error::Invalid(format!("WORLD_SIZE={world_size} but RANK is not set"))
        })?;
        if rank >= world_size {
            return Err(Error::Invalid(format!(
                "RANK={rank} is out of range for WORLD_SIZE={world_size}"
            )));
        }
        let master_addr = var("MASTER_ADDR").ok_or_else(|| {
            Error::Invalid("WORLD_SIZE > 1 needs MASTER_ADDR (rank 0's host)".into())
        })?;
        let port = var("MASTER_PORT").ok_or_else(|| {
            Error::Invalid("WORLD_SIZE > 1 needs MASTER_PORT (a free port on rank 0's host)".into())
        })?;
        // 0 would let rank 0 listen on a port the system picks, which the other ranks cannot
        // know: they would retry until --ddp_timeout.
        let master_port = port.trim().parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| {
            Error::Invalid(format!("MASTER_PORT={port:?} is not a port number from 1 to 65535"))
        })?;
        Ok(Some(Self { rank, world_size, master_addr, master_port, timeout }))
    }

    pub(super) fn address(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}
