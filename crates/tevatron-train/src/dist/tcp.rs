//! The TCP transport: ranks that are processes, meeting at rank 0.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Rendezvous, Transport};
use crate::{Error, Result};

/// Ranks that are processes talking over TCP. Rank 0 listens at `MASTER_ADDR:MASTER_PORT`;
/// every other rank connects to it and rank 0 relays each round (a star: fine for the
/// representations and gradients of CPU training, where the model's own work dominates).
pub struct TcpTransport {
    rank: usize,
    world: usize,
    /// Rank 0: the links to ranks 1.. in rank order; other ranks: the link to rank 0.
    links: Mutex<Vec<TcpStream>>,
}

const HELLO: &[u8; 4] = b"TVTR";

fn io_error(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| {
        let why = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                "no answer within --ddp_timeout".to_string()
            }
            std::io::ErrorKind::UnexpectedEof => {
                "the connection closed (that rank probably failed: see its log)".to_string()
            }
            _ => e.to_string(),
        };
        Error::Invalid(format!("{what}: {why}"))
    }
}

fn send_frame(s: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    s.write_all(&(data.len() as u64).to_le_bytes())?;
    s.write_all(data)?;
    s.flush()
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    read_frame_of_at_most(s, usize::MAX)
}

/// A frame from a connection not yet known to be one of our ranks: a short one only.
fn read_frame_of_at_most(s: &mut TcpStream, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len) as usize;
    if len > limit {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a tevatron rank"));
    }
    let mut data = vec![0u8; len];
    s.read_exact(&mut data)?;
    Ok(data)
}

impl TcpTransport {
    /// Meets the other ranks: rank 0 waits for all of them, checking that each was started
    /// with the same `WORLD_SIZE` and a distinct rank; the others connect (retrying while
    /// rank 0 starts). Gives up with a message after `timeout`.
    pub fn connect(rv: &Rendezvous) -> Result<Self> {
        // A --ddp_timeout past what an Instant holds waits a century instead of overflowing.
        let now = Instant::now();
        let century = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
        let deadline = now.checked_add(rv.timeout).unwrap_or(now + century);
        let addr = rv.address();
        let resolved = addr
            .to_socket_addrs()
            .map_err(|e| Error::Invalid(format!("MASTER_ADDR:MASTER_PORT {addr}: {e}")))?
            .next()
            .ok_or_else(|| {
                Error::Invalid(format!("MASTER_ADDR:MASTER_PORT {addr} resolves to nothing"))
            })?;
        let links = if rv.rank == 0 {
            Self::accept_all(rv, &addr, resolved, deadline)?
        } else {
            vec![Self::join(rv, &addr, resolved, deadline)?]
        };
        for link in &links {
            link.set_read_timeout(Some(rv.timeout))
                .and_then(|()| link.set_write_timeout(Some(rv.timeout)))
                .and_then(|()| link.set_nodelay(true))
                .map_err(io_error(format!("rank {}: configuring a link", rv.rank)))?;
        }
        Ok(Self { rank: rv.rank, world: rv.world_size, links: Mutex::new(links) })
    }

    fn accept_all(
        rv: &Rendezvous,
        addr: &str,
        at: std::net::SocketAddr,
        deadline: Instant,
    ) -> Result<Vec<TcpStream>> {
        let listener = TcpListener::bind(at).map_err(|e| {
            Error::Invalid(format!("rank 0 cannot listen on {addr} (MASTER_ADDR:MASTER_PORT): {e}"))
        })?;
        listener.set_nonblocking(true).map_err(io_error(format!("rank 0 listening on {addr}")))?;
        let mut peers: Vec<Option<TcpStream>> = (1..rv.world_size).map(|_| None).collect();
        while peers.iter().any(Option::is_none) {
            let (mut s, _) = match listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = (peers.iter().enumerate())
                            .filter(|(_, p)| p.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(Error::Invalid(format!(
                            "rank 0: rank(s) {} did not connect to {addr} within {} s (--ddp_timeout); were they started with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE?",
                            missing.join(", "),
                            rv.timeout.as_secs_f64()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(io_error(format!("rank 0 accepting on {addr}"))(e)),
            };
            let what = || format!("rank 0: a rank connecting to {addr}");
            s.set_nonblocking(false).map_err(io_error(what()))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).map_err(io_error(what()))?;
            let Ok(hello) = read_frame_of_at_most(&mut s, 64) else {
                continue; // not one of our ranks: ignore the stranger
            };
            let field = |i: usize| {
                hello.get(i..i + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            };
            let (rank, world) = match (hello.starts_with(HELLO), field(4), field(8)) {
                (true, Some(r), Some(w)) => (r, w),
                _ => continue,
            };
            let problem = if world != rv.world_size {
                Some(format!(
                    "rank {rank} was started with WORLD_SIZE={world} but rank 0 with WORLD_SIZE={}; start every rank with the same WORLD_SIZE",
                    rv.world_size
                ))
            } else if rank == 0 || rank >= rv.world_size || peers[rank - 1].is_some() {
                Some(format!("two processes claim RANK={rank}; give each rank its own RANK"))
            } else {
                None
            };
            if let Some(problem) = problem {
                let _ = send_frame(&mut s, format!("ERR {problem}").as_bytes());
                return Err(Error::Invalid(problem));
            }
            peers[rank - 1] = Some(s);
        }
        let mut links: Vec<TcpStream> = peers.into_iter().flatten().collect();
        for s in &mut links {
            send_frame(s, b"OK").map_err(io_error("rank 0 greeting the ranks".into()))?;
        }
        Ok(links)
    }

    fn join(
        rv: &Rendezvous,
        addr: &str,
        at: std::net::SocketAddr,
        deadline: Instant,
    ) -> Result<TcpStream> {
        let mut s = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(&at, left.max(Duration::from_millis(1))) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(Error::Invalid(format!(
                        "rank {}: could not reach rank 0 at {addr} (MASTER_ADDR:MASTER_PORT) within {} s (--ddp_timeout): {e}; is rank 0 running?",
                        rv.rank,
                        rv.timeout.as_secs_f64()
                    )))
                }
            }
        };
        let what = || format!("rank {}: meeting rank 0 at {addr}", rv.rank);
        let mut hello = HELLO.to_vec();
        hello.extend((rv.rank as u32).to_le_bytes());
        hello.extend((rv.world_size as u32).to_le_bytes());
        send_frame(&mut s, &hello).map_err(io_error(what()))?;
        s.set_read_timeout(Some(
            deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1)),
        ))
        .map_err(io_error(what()))?;
        let answer = read_frame(&mut s).map_err(io_error(what()))?;
        if answer != b"OK" {
            let text = String::from_utf8_lossy(&answer);
            return Err(Error::Invalid(text.strip_prefix("ERR ").unwrap_or(&text).to_string()));
        }
        Ok(s)
    }
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut links = self.links.lock().map_err(|_| Error::Invalid("a link panicked".into()))?;
        if self.rank == 0 {
            let mut all = vec![data.to_vec()];
            for (i, s) in links.iter_mut().enumerate() {
                all.push(
                    read_frame(s)
                        .map_err(io_error(format!("rank 0 waiting for rank {}", i + 1)))?,
                );
            }
            let mut packed = Vec::new();
            for part in &all {
                packed.extend((part.len() as u64).to_le_bytes());
                packed.extend(part);
            }
            for (i, s) in links.iter_mut().enumerate() {
                send_frame(s, &packed)
                    .map_err(io_error(format!("rank 0 sending to rank {}", i + 1)))?;
            }
            return Ok(all);
        }
        let s = &mut links[0];
        let what = || format!("rank {} waiting for rank 0", self.rank);
        send_frame(s, data).map_err(io_error(what()))?;
        let packed = read_frame(s).map_err(io_error(what()))?;
        let mut all = Vec::with_capacity(self.world);
        let mut at = 0;
        while at < packed.len() {
            let len = packed
                .get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
                .filter(|&n| at + 8 + n <= packed.len())
                .ok_or_else(|| {
                    Error::Invalid(format!("rank {}: a garbled message from rank 0", self.rank))
                })?;
            all.push(packed[at + 8..at + 8 + len].to_vec());
            at += 8 + len;
        }
        if all.len() != self.world {
            return Err(Error::Invalid(format!(
                "rank {}: rank 0 relayed {} parts for {} ranks",
                self.rank,
                all.len(),
                self.world
            )));
        }
        Ok(all)
    }
}
