//! The benchmark's proxy: accepts on 127.0.0.1:15001, reads each connection's original
//! destination with getsockopt(SO_ORIGINAL_DST) exactly as Envoy does under iptables, connects
//! there and splices bytes both ways. The same binary and code path serve every mode; only
//! `direct-to-proxy` passes `--fallback`, because a connection that was never redirected has no
//! original destination to read.
//!
//! tokio drives readiness (epoll); the bytes move with splice(2) through a pipe, so they never
//! enter user space. Pipes are pooled per worker thread: creating two pipes per connection would
//! otherwise be a visible share of a connection's cost.
use std::{
    cell::RefCell,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{
    io::Interest,
    net::{TcpListener, TcpStream},
};

#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    orig: AtomicU64,
    fallback: AtomicU64,
    no_orig: AtomicU64,
    upstream_failed: AtomicU64,
}

pub struct ProxyArgs {
    pub listen: SocketAddr,
    pub fallback: Option<SocketAddr>,
    pub uid: Option<u32>,
    pub threads: usize,
}

pub fn run(args: ProxyArgs) -> Result<()> {
    let std_listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("bind {}", args.listen))?;
    std_listener.set_nonblocking(true)?;
    if let Some(uid) = args.uid {
        // Before the runtime starts any thread, so the whole process runs as the proxy uid
        // (the iptables lane exempts the proxy's own connects by uid, as Istio does).
        // SAFETY: setuid has no memory-safety preconditions.
        if unsafe { libc::setuid(uid) } != 0 {
            return Err(io::Error::last_os_error()).context(format!("setuid({uid})"));
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(std_listener)?;
        let stats = Arc::new(Stats::default());
        println!("listening {}", listener.local_addr()?);
        tokio::spawn(report(stats.clone()));
        loop {
            let (client, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("bench proxy: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            };
            let stats = stats.clone();
            tokio::spawn(async move { handle(client, args.fallback, &stats).await });
        }
    })
}

/// One stats line per second while something changes; the bench reads the last one to prove
/// which way the connections went (original destination read, or fallback).
async fn report(stats: Arc<Stats>) {
    let mut last = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let line = format!(
            "stats accepted={} orig={} fallback={} no_orig={} upstream_failed={}",
            stats.accepted.load(Ordering::Relaxed),
            stats.orig.load(Ordering::Relaxed),
            stats.fallback.load(Ordering::Relaxed),
            stats.no_orig.load(Ordering::Relaxed),
            stats.upstream_failed.load(Ordering::Relaxed),
        );
        if line != last {
            println!("{line}");
            last = line;
        }
    }
}

async fn handle(client: TcpStream, fallback: Option<SocketAddr>, stats: &Stats) {
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    let dst = match redirect_tests::original_dst(&client) {
        Ok(a) => {
            stats.orig.fetch_add(1, Ordering::Relaxed);
            a
        }
        Err(e) => match fallback {
            Some(a) => {
                stats.fallback.fetch_add(1, Ordering::Relaxed);
                a
            }
            None => {
                if stats.no_orig.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("bench proxy: no original destination: {e}");
                }
                return;
            }
        },
    };
    let upstream = match TcpStream::connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            if stats.upstream_failed.fetch_add(1, Ordering::Relaxed) < 3 {
                eprintln!("bench proxy: connect {dst}: {e}");
            }
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (a, b) = tokio::join!(pump(&client, &upstream), pump(&upstream, &client));
    if a.is_err() || b.is_err() {
        // Unblocks nothing here (both pumps have returned), but makes the peers see the error
        // as a reset rather than a clean EOF.
        shutdown(&client, libc::SHUT_RDWR);
        shutdown(&upstream, libc::SHUT_RDWR);
    }
}

fn shutdown(s: &TcpStream, how: libc::c_int) {
    // SAFETY: shutdown(2) on a socket we own.
    unsafe { libc::shutdown(s.as_raw_fd(), how) };
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // Not SPLICE_F_MORE: on the socket side it means MSG_MORE, which holds a small response
    // back for up to 200 ms waiting for more bytes.
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: splice(2) between fds owned by the caller, without offsets.
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
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A pipe's default capacity (16 pages): one read never splices more than the pipe can hold,
/// so writing into the pipe never blocks.
const CHUNK: usize = 1 << 16;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

fn take_pipe() -> io::Result<Pipe> {
    if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
        return Ok(p);
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe {
        Pipe {
            read: OwnedFd::from_raw_fd(fds[0]),
            write: OwnedFd::from_raw_fd(fds[1]),
        }
    })
}

/// Only an empty pipe goes back to the pool (a pump that failed half-way may leave bytes in it).
fn give_pipe(p: Pipe) {
    PIPES.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < 256 {
            pool.push(p);
        }
    });
}

/// Moves bytes from `from` to `to` until EOF, then half-closes `to`. Small exchanges go through
/// a stack buffer with read/write (two syscalls, as with splice, but without the pipe's page
/// bookkeeping); once a read fills the buffer the stream is bulk and the rest is spliced.
async fn pump(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let mut buf = [0u8; SMALL];
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            shutdown(to, libc::SHUT_WR);
            return Ok(());
        }
        let mut sent = 0;
        while sent < n {
            to.writable().await?;
            match to.try_write(&buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        if n == SMALL {
            break;
        }
    }
    let pipe = take_pipe()?;
    let result = pump_with(from, to, &pipe).await;
    if result.is_ok() {
        give_pipe(pipe);
    }
    result
}

/// Reads up to this much with read(2) before switching to splice.
const SMALL: usize = 16 << 10;

async fn pump_with(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<()> {
    let (pr, pw) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || splice(from.as_raw_fd(), pw, CHUNK)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            shutdown(to, libc::SHUT_WR);
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice(pr, to.as_raw_fd(), left)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
