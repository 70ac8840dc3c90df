//! The load client: blocking sockets, one OS thread per client thread, each opening, using and
//! closing connections back to back (or, as a probe, opening and resetting them). It runs as its own process in the workload's cgroup, so
//! the datapath under test sees its connects exactly as it would see an application's.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::server::{REQUEST_LEN, RESPONSE_LEN};
use super::stats::percentile;

/// One request/response on a fresh connection. Returns (connect time, whole exchange).
fn exchange(dst: SocketAddr, req: &[u8], reply: &mut Vec<u8>) -> Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(dst).with_context(|| format!("connect {dst}"))?;
    let t1 = Instant::now();
    s.write_all(req).context("send request")?;
    reply.clear();
    s.read_to_end(reply).context("read reply")?;
    if reply.len() != RESPONSE_LEN {
        bail!(
            "reply of {} bytes instead of {RESPONSE_LEN} (the proxy closed without forwarding?)",
            reply.len()
        );
    }
    drop(s);
    Ok((t1 - t0, t0.elapsed()))
}

/// A connect-rate probe: connect, then close with a reset (SO_LINGER 0), so that neither side
/// keeps TIME_WAIT and the connection costs little beyond its interception. Returns (connect
/// time, connect time).
fn probe(dst: SocketAddr) -> Result<(Duration, Duration)> {
    let t0 = Instant::now();
    // A dropped SYN costs a 1 s retransmit, which would stall a thread for a whole sample: it
    // is counted as an error instead.
    let s = TcpStream::connect_timeout(&dst, PROBE_CONNECT_TIMEOUT)
        .with_context(|| format!("connect {dst}"))?;
    let took = t0.elapsed();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on a socket we own, with a correctly sized struct linger.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_LINGER: {}", std::io::Error::last_os_error());
    }
    drop(s);
    Ok((took, took))
}

const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

fn request() -> Vec<u8> {
    let mut req = vec![b'x'; REQUEST_LEN];
    req[0] = b'R';
    req
}

#[derive(Default)]
struct ThreadResult {
    conns: u64,
    errors: u64,
    first_error: Option<String>,
    connect_ns: Vec<u64>,
    txn_ns: Vec<u64>,
}

/// `usage_usec` of a cgroup's cpu.stat: CPU time of everything in that subtree.
fn cpu_usage_us(cpu_stat: &Path) -> Option<u64> {
    std::fs::read_to_string(cpu_stat)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
}

/// Connections per second over `duration`, after `warmup`, with `threads` client threads. With
/// `cpu_stat` (the mode's whole cgroup subtree: client, proxy, server), also the CPU time those
/// processes spent per connection over the same window: the cost behind conn/s once the
/// machine is saturated. `probes`: each connection is a [`probe`] instead of an exchange.
pub fn load(
    dst: SocketAddr,
    threads: usize,
    warmup: Duration,
    duration: Duration,
    cpu_stat: Option<&Path>,
    probes: bool,
) -> Value {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let req = request();
                let mut reply = Vec::with_capacity(RESPONSE_LEN);
                let mut r = ThreadResult::default();
                barrier.wait();
                let start = Instant::now();
                let (begin, end) = (start + warmup, start + warmup + duration);
                loop {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    let counted = now >= begin;
                    let result = if probes {
                        probe(dst)
                    } else {
                        exchange(dst, &req, &mut reply)
                    };
                    match result {
                        Ok((c, t)) if counted => {
                            r.conns += 1;
                            r.connect_ns.push(c.as_nanos() as u64);
                            r.txn_ns.push(t.as_nanos() as u64);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            r.errors += 1;
                            r.first_error.get_or_insert_with(|| format!("{e:#}"));
                            // A refused or reset connect must not turn into a busy loop.
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                r
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    thread::sleep(warmup);
    let cpu0 = cpu_stat.and_then(cpu_usage_us);
    thread::sleep((start + warmup + duration).saturating_duration_since(Instant::now()));
    let cpu1 = cpu_stat.and_then(cpu_usage_us);
    let mut all = ThreadResult::default();
    for h in handles {
        let r = h.join().expect("client thread panicked");
        all.conns += r.conns;
        all.errors += r.errors;
        all.first_error = all.first_error.or(r.first_error);
        all.connect_ns.extend(r.connect_ns);
        all.txn_ns.extend(r.txn_ns);
    }
    all.connect_ns.sort_unstable();
    all.txn_ns.sort_unstable();
    let us = |v: &[u64], p: f64| percentile(v, p) / 1000.0;
    json!({
        "threads": threads,
        "seconds": duration.as_secs_f64(),
        "conns": all.conns,
        "conns_per_s": all.conns as f64 / duration.as_secs_f64(),
        "errors": all.errors,
        "first_error": all.first_error,
        "connect_p50_us": us(&all.connect_ns, 0.50),
        "connect_p99_us": us(&all.connect_ns, 0.99),
        "txn_p50_us": us(&all.txn_ns, 0.50),
        "txn_p99_us": us(&all.txn_ns, 0.99),
        "cpu_us_per_conn": match (cpu0, cpu1) {
            (Some(a), Some(b)) if all.conns > 0 => Some((b - a) as f64 / all.conns as f64),
            _ => None,
        },
    })
}

/// One exchange, reporting which address the server saw: the client's own local address means
/// the connection went straight to it, anything else means a proxy sat in between.
pub fn check(dst: SocketAddr) -> Value {
    let run = || -> Result<Value> {
        let mut s = TcpStream::connect(dst).with_context(|| format!("connect {dst}"))?;
        let local = s.local_addr()?;
        let peer = s.peer_addr()?;
        s.write_all(&request())?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)?;
        let text = String::from_utf8_lossy(&reply).trim().to_string();
        Ok(
            json!({"ok": true, "local": local.to_string(), "peer": peer.to_string(),
                  "server_saw": text.strip_prefix("peer=").unwrap_or(&text)}),
        )
    };
    run().unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")}))
}

/// One long upload of `bytes` through whatever sits between the client and the server.
pub fn bulk(dst: SocketAddr, bytes: u64) -> Value {
    let run = || -> Result<Value> {
        let chunk = vec![b'b'; 1 << 18];
        let t0 = Instant::now();
        let mut s = TcpStream::connect(dst).with_context(|| format!("connect {dst}"))?;
        s.write_all(b"B")?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        s.shutdown(Shutdown::Write)?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count)
            .context("read the server's byte count")?;
        let secs = t0.elapsed().as_secs_f64();
        let got = u64::from_le_bytes(count);
        if got != bytes {
            bail!("the server counted {got} bytes of {bytes}");
        }
        Ok(json!({"ok": true, "bytes": bytes, "seconds": secs, "bytes_per_s": bytes as f64 / secs}))
    };
    run().unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")}))
}
