//! The collectives over both transports, and the rendezvous variables.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use super::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn rendezvous(rank: usize, world: usize, port: u16, secs: u64) -> Rendezvous {
    Rendezvous {
        rank,
        world_size: world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        timeout: Duration::from_secs(secs),
    }
}

/// Many rounds of messages of different lengths arrive whole, in rank order, each in its
/// own round; rows gather around the local tensor and sums are equal on every rank.
fn exercise(group: Group) {
    let (rank, world) = (group.rank(), group.world_size());
    for round in 0..40u8 {
        let mine = vec![rank as u8; rank + round as usize % 3];
        let all = group.transport.as_ref().unwrap().all_gather_bytes(&mine).unwrap();
        for (r, got) in all.iter().enumerate() {
            assert_eq!(got, &vec![r as u8; r + round as usize % 3], "round {round}");
        }
    }
    let local = Tensor::full(rank as f32, (rank + 1, 2), &Device::Cpu).unwrap();
    let rows = group.gather_rows(&local).unwrap();
    assert_eq!(rows.dims2().unwrap(), ((1..=world).sum::<usize>(), 2));
    let first: Vec<f32> = rows.get(0).unwrap().to_vec1().unwrap();
    assert_eq!(first, vec![0.0, 0.0]);
    let x = Tensor::new(&[1f32 + rank as f32, 10.0], &Device::Cpu).unwrap();
    let summed = group.all_reduce_sum(vec![x]).unwrap();
    let want = (1..=world).sum::<usize>() as f32;
    assert_eq!(summed[0].to_vec1::<f32>().unwrap(), vec![want, 10.0 * world as f32]);
    assert_eq!(group.broadcast_bytes(&[rank as u8 + 7]).unwrap(), vec![7]);
    group.barrier().unwrap();
}

#[test]
fn local_ranks_exchange_in_order() {
    let ranks = LocalTransport::group(3, Duration::from_secs(20));
    std::thread::scope(|s| {
        for t in ranks {
            s.spawn(move || exercise(Group::new(Arc::new(t))));
        }
    });
}

#[test]
fn tcp_ranks_exchange_in_order() {
    let port = free_port();
    std::thread::scope(|s| {
        for rank in 0..3 {
            s.spawn(move || {
                let t = TcpTransport::connect(&rendezvous(rank, 3, port, 20)).unwrap();
                exercise(Group::new(Arc::new(t)));
            });
        }
    });
}

/// A `--ddp_timeout` past what an `Instant` holds (u64::MAX seconds) still meets the ranks.
#[test]
fn the_longest_timeout_meets_the_ranks() {
    let port = free_port();
    std::thread::scope(|s| {
        for rank in 0..2 {
            s.spawn(move || TcpTransport::connect(&rendezvous(rank, 2, port, u64::MAX)).unwrap());
        }
    });
}

#[test]
fn mismatched_world_sizes_are_refused_on_both_sides() {
    let port = free_port();
    let (zero, one) = std::thread::scope(|s| {
        let zero = s.spawn(move || TcpTransport::connect(&rendezvous(0, 2, port, 10)).err());
        let one = s.spawn(move || TcpTransport::connect(&rendezvous(1, 3, port, 10)).err());
        (zero.join().unwrap(), one.join().unwrap())
    });
    let want = "rank 1 was started with WORLD_SIZE=3 but rank 0 with WORLD_SIZE=2";
    assert!(zero.unwrap().to_string().contains(want));
    assert!(one.unwrap().to_string().contains(want));
}

#[test]
fn an_absent_rank_zero_is_a_timeout_with_a_message() {
    let port = free_port();
    let start = Instant::now();
    let e = TcpTransport::connect(&rendezvous(1, 2, port, 1)).err().unwrap().to_string();
    assert!(e.contains("rank 1: could not reach rank 0 at 127.0.0.1:"), "{e}");
    assert!(e.contains("within 1 s"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(10));
    // And rank 0 waiting for a rank that never comes.
    let e = TcpTransport::connect(&rendezvous(0, 2, port, 1)).err().unwrap().to_string();
    assert!(e.contains("rank(s) 1 did not connect"), "{e}");
}

#[test]
fn a_rank_that_stops_answering_fails_the_others() {
    let ranks = LocalTransport::group(2, Duration::from_millis(200));
    let e = ranks[0].all_gather_bytes(b"x").err().unwrap().to_string();
    assert!(e.contains("did not answer within 0.2 s"), "{e}");
}

/// Over TCP: a rank that meets the others and then never sends makes rank 0 end with a
/// message naming it once `--ddp_timeout` has passed, and the rank waiting on rank 0 end
/// with a message too, instead of hanging.
#[test]
fn a_silent_tcp_rank_fails_the_others_with_a_message() {
    let port = free_port();
    let secs = 2;
    let (done, silent_may_go) = std::sync::mpsc::channel::<()>();
    let start = Instant::now();
    let (zero, one) = std::thread::scope(|s| {
        let silent = s.spawn(move || {
            let t = TcpTransport::connect(&rendezvous(2, 3, port, secs)).unwrap();
            // Connected, then silent until the others have given up.
            silent_may_go.recv().unwrap();
            drop(t);
        });
        let talk = |rank: usize| {
            s.spawn(move || {
                let t = TcpTransport::connect(&rendezvous(rank, 3, port, secs)).unwrap();
                let e = t.all_gather_bytes(b"x").err().map(|e| e.to_string());
                (e, Instant::now())
            })
        };
        let (zero, one) = (talk(0), talk(1));
        let zero = zero.join().unwrap();
        let one = one.join().unwrap();
        done.send(()).unwrap();
        silent.join().unwrap();
        (zero, one)
    });
    let e = zero.0.expect("rank 0 gathered without rank 2");
    assert_eq!(e, "rank 0 waiting for rank 2: no answer within --ddp_timeout");
    let e = one.0.expect("rank 1 gathered without rank 2");
    assert!(e.starts_with("rank 1 waiting for rank 0: "), "{e}");
    assert!(
        e.ends_with("no answer within --ddp_timeout")
            || e.ends_with("the connection closed (that rank probably failed: see its log)"),
        "{e}"
    );
    for (rank, end) in [(0, zero.1), (1, one.1)] {
        let took = end.duration_since(start);
        assert!(took >= Duration::from_secs(secs), "rank {rank} gave up after {took:?}");
        assert!(took < Duration::from_secs(4 * secs), "rank {rank} took {took:?}");
    }
}

#[test]
fn environment_is_checked() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    };
    let t = Duration::from_secs(1);
    assert!(Rendezvous::from_env(env(&[]), t).unwrap().is_none());
    assert!(Rendezvous::from_env(env(&[("WORLD_SIZE", "1")]), t).unwrap().is_none());
    let e = |p| Rendezvous::from_env(env(p), t).unwrap_err().to_string();
    assert_eq!(e(&[("WORLD_SIZE", "two")]), "WORLD_SIZE=\"two\" is not a non-negative integer");
    assert_eq!(e(&[("WORLD_SIZE", "2")]), "WORLD_SIZE=2 but RANK is not set");
    assert_eq!(e(&[("WORLD_SIZE", "2"), ("RANK", "2")]), "RANK=2 is out of range for WORLD_SIZE=2");
    assert!(e(&[("WORLD_SIZE", "2"), ("RANK", "1")]).contains("MASTER_ADDR"));
    let ok = Rendezvous::from_env(
        env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "29500")]),
        t,
    )
    .unwrap()
    .unwrap();
    assert_eq!((ok.rank, ok.world_size, ok.address()), (1, 2, "h:29500".to_string()));
}
