//! redirect-testproxy: a minimal transparent proxy, standing in for Envoy/Pipy/HAProxy.
//!
//! `redirect-testproxy [--listen ADDR]... [--v6] [--mode tag|forward|close] [--uid N]
//! [--fallback ADDR] [--stats]`
//!
//! Listens on 127.0.0.1:15001 by default (plus `[::1]:15001` with `--v6`; `--listen` replaces the
//! defaults and may repeat). For each accepted connection it asks the kernel for the original
//! destination exactly as a netfilter-based proxy does (IP6T_SO_ORIGINAL_DST first on AF_INET6
//! sockets, then SO_ORIGINAL_DST) and logs `orig=<ip:port|unknown> peer=<ip:port>` to stdout.
//! - `--mode tag` (default) answers `proxy orig=<ip:port|unknown> peer=<ip:port>\n` and closes,
//!   so a test sees both that the bytes reached the proxy and what the original destination was.
//! - `--mode forward` connects to the original destination and splices bytes both ways
//!   (splice(2) through a pipe: zero-copy, since the benchmark reuses this proxy). With
//!   `--fallback ADDR`, a connection without an original destination goes to ADDR (the
//!   benchmark's direct-to-proxy mode, where nothing was redirected).
//! - `--mode close` closes every accepted connection at once (the benchmark's interception-only
//!   mode, where the proxy's own work must not hide the cost of intercepting).
//!
//! `--uid N` drops to uid N after binding, so a datapath can exempt the proxy by uid.
//! `--stats` replaces the line per connection with a line of counters every 250 ms (when they
//! changed): `stats accepted=… orig=… fallback=… no_orig=… upstream_failed=…`, so that a
//! benchmark's connection rate does not depend on a pipe to the log.
//! Once every listener is bound it prints one `listening <addr>` line per listener (the first
//! line therefore means all are ready).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use redirect_tests::original_dst;

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Answer with the original destination and close.
    Tag,
    /// Forward to the original destination.
    Forward,
    /// Close at once.
    Close,
}

#[derive(Parser)]
#[command(
    name = "redirect-testproxy",
    about = "Transparent test proxy using SO_ORIGINAL_DST"
)]
struct Cli {
    /// Address to listen on (repeatable); replaces the defaults.
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Also listen on `[::1]:15001` when using the defaults.
    #[arg(long)]
    v6: bool,
    #[arg(long, value_enum, default_value_t = Mode::Tag)]
    mode: Mode,
    /// Drop to this uid after binding.
    #[arg(long)]
    uid: Option<u32>,
    /// Timeout for connecting to the original destination in forward mode.
    #[arg(long, default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// Forward mode: where connections without an original destination go.
    #[arg(long)]
    fallback: Option<SocketAddr>,
    /// Log counters every 250 ms instead of one line per connection.
    #[arg(long)]
    stats: bool,
}

/// What `--stats` reports.
static ACCEPTED: AtomicU64 = AtomicU64::new(0);
static ORIG: AtomicU64 = AtomicU64::new(0);
static FALLBACK: AtomicU64 = AtomicU64::new(0);
static NO_ORIG: AtomicU64 = AtomicU64::new(0);
static UPSTREAM_FAILED: AtomicU64 = AtomicU64::new(0);

fn report_stats() {
    let mut last = String::new();
    loop {
        thread::sleep(Duration::from_millis(250));
        let line = format!(
            "stats accepted={} orig={} fallback={} no_orig={} upstream_failed={}",
            ACCEPTED.load(Relaxed),
            ORIG.load(Relaxed),
            FALLBACK.load(Relaxed),
            NO_ORIG.load(Relaxed),
            UPSTREAM_FAILED.load(Relaxed),
        );
        if line != last {
            log(&line);
            last = line;
        }
    }
}

fn log(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn show(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "unknown".to_string(), |a| a.to_string())
}

fn tag(mut client: TcpStream, orig: Option<SocketAddr>, peer: Option<SocketAddr>) {
    let reply = format!("proxy orig={} peer={}\n", show(orig), show(peer));
    if client.write_all(reply.as_bytes()).is_err() {
        return;
    }
    // Half-close, then drain: closing with unread request bytes would send an RST that can
    // overtake the reply.
    let _ = client.shutdown(Shutdown::Write);
    let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 4096];
    while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // Not SPLICE_F_MORE: on the socket side it means MSG_MORE, which holds a short request or
    // reply back for up to 200 ms waiting for more bytes.
    let flags = libc::SPLICE_F_MOVE;
    loop {
        // SAFETY: splice(2) on fds owned by the caller, without offsets.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                flags,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Moves bytes from `from` to `to` until EOF, through a pipe so the data never enters user
/// space. Falls back to a plain copy if this kernel refuses to splice these sockets.
fn pump(mut from: &TcpStream, mut to: &TcpStream) -> io::Result<()> {
    let (pr, pw): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut moved_any = false;
    loop {
        let n = match splice(from.as_raw_fd(), pw.as_raw_fd(), 1 << 16) {
            Ok(n) => n,
            Err(e) if !moved_any && e.raw_os_error() == Some(libc::EINVAL) => {
                io::copy(&mut from, &mut to)?;
                break;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        moved_any = true;
        let mut left = n;
        while left > 0 {
            left -= splice(pr.as_raw_fd(), to.as_raw_fd(), left)?;
        }
    }
    to.shutdown(Shutdown::Write)
}

fn forward(client: TcpStream, dst: Option<SocketAddr>, timeout: Duration) {
    let Some(dst) = dst else {
        // Nothing to forward to; closing tells the client.
        NO_ORIG.fetch_add(1, Relaxed);
        return;
    };
    let upstream = match TcpStream::connect_timeout(&dst, timeout) {
        Ok(s) => s,
        Err(e) => {
            if UPSTREAM_FAILED.fetch_add(1, Relaxed) < 3 {
                eprintln!("redirect-testproxy: connect {dst}: {e}");
            }
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    thread::scope(|s| {
        let up = s.spawn(|| {
            if pump(&client, &upstream).is_err() {
                // Unblock the other direction too.
                let _ = client.shutdown(Shutdown::Both);
                let _ = upstream.shutdown(Shutdown::Both);
            }
        });
        if pump(&upstream, &client).is_err() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
        let _ = up.join();
    });
}

#[derive(Clone, Copy)]
struct Opts {
    mode: Mode,
    timeout: Duration,
    fallback: Option<SocketAddr>,
    stats: bool,
}

fn handle(client: TcpStream, o: Opts) {
    ACCEPTED.fetch_add(1, Relaxed);
    let orig = original_dst(&client).ok();
    if orig.is_some() {
        ORIG.fetch_add(1, Relaxed);
    }
    let peer = client.peer_addr().ok();
    if !o.stats {
        log(&format!("orig={} peer={}", show(orig), show(peer)));
    }
    match o.mode {
        Mode::Tag => tag(client, orig, peer),
        Mode::Forward => {
            let dst = orig.or_else(|| {
                o.fallback.inspect(|_| {
                    FALLBACK.fetch_add(1, Relaxed);
                })
            });
            forward(client, dst, o.timeout)
        }
        Mode::Close => drop(client),
    }
}

fn run(cli: Cli) -> Result<()> {
    let addrs = if cli.listen.is_empty() {
        let mut v: Vec<SocketAddr> = vec!["127.0.0.1:15001".parse()?];
        if cli.v6 {
            v.push("[::1]:15001".parse()?);
        }
        v
    } else {
        cli.listen
    };
    let listeners = addrs
        .iter()
        .map(|a| TcpListener::bind(a).with_context(|| format!("bind {a}")))
        .collect::<Result<Vec<_>>>()?;
    if let Some(uid) = cli.uid {
        // Before any thread exists, so the whole process is on the new uid.
        nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).context("setuid")?;
    }
    for l in &listeners {
        log(&format!("listening {}", l.local_addr()?));
    }
    let o = Opts {
        mode: cli.mode,
        timeout: Duration::from_millis(cli.connect_timeout_ms.max(1)),
        fallback: cli.fallback,
        stats: cli.stats,
    };
    if o.stats {
        thread::spawn(report_stats);
    }
    thread::scope(|s| {
        for l in &listeners {
            s.spawn(move || {
                for conn in l.incoming() {
                    match conn {
                        Ok(c) => {
                            if matches!(o.mode, Mode::Close) {
                                // No thread: the point of this mode is that the proxy costs
                                // next to nothing.
                                handle(c, o);
                            } else {
                                thread::spawn(move || handle(c, o));
                            }
                        }
                        Err(e) => eprintln!("redirect-testproxy: accept: {e}"),
                    }
                }
            });
        }
    });
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redirect-testproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
