//! redirect-sockprobe: a test proxy and client that report exactly what getsockopt and
//! getpeername return, for the original-destination kernel tests.
//!
//! - `proxy --listen ADDR... [--quiet]`: for each accepted connection, reads one request line,
//!   then asks the kernel SO_ORIGINAL_DST (SOL_IP), IP6T_SO_ORIGINAL_DST (SOL_IPV6), both with
//!   short buffers too, TCP_INFO (full and short) and SO_ERROR, and answers one JSON line with the
//!   raw results (return code, errno, optlen, decoded address, whether the buffer beyond optlen
//!   was left alone). The same line goes to stdout unless `--quiet`. Prints `listening <addr>`
//!   once per listener when all are bound.
//! - `client ADDR [--bind ADDR] [--wait-stdin]`: connects (optionally from a fixed source, so two
//!   network namespaces can hold identical tuples), prints `{"event":"connected",...}` with
//!   getpeername/getsockname, waits for a line on stdin if asked, reports the same getsockopt
//!   calls on its own socket, sends a request line and prints `{"event":"done",...}` with the
//!   proxy's JSON answer.
//! - `load --dst IP --count N [--threads T]`: N short connections to IP:<varying port>, each
//!   checking that the proxy read back exactly that destination; prints one JSON summary.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

const SO_ORIGINAL_DST: libc::c_int = 80;
const FILL: u8 = 0xAA;

/// Whether `tail` still holds only [`FILL`]. One memcmp per 4 KiB: a byte loop over the 8–16 KiB
/// buffers, unoptimized in the debug build, was most of the probe proxy's time per connection
/// (origdst_leak's 100k connections).
fn untouched(tail: &[u8]) -> bool {
    static FILLED: [u8; 4096] = [FILL; 4096];
    tail.chunks(FILLED.len()).all(|c| c == &FILLED[..c.len()])
}
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "redirect-sockprobe",
    about = "Report getsockopt/getpeername results"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Proxy {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Do not log each connection (load runs).
        #[arg(long)]
        quiet: bool,
    },
    Client {
        addr: SocketAddr,
        #[arg(long)]
        bind: Option<SocketAddr>,
        #[arg(long)]
        wait_stdin: bool,
    },
    Load {
        #[arg(long)]
        dst: std::net::IpAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 2)]
        threads: u64,
    },
}

/// getsockopt into a buffer of `buflen` bytes pre-filled with 0xAA.
fn raw_getsockopt(fd: RawFd, level: i32, name: i32, buflen: usize) -> (i32, i32, usize, Vec<u8>) {
    let mut buf = vec![FILL; buflen];
    let mut len = buflen as libc::socklen_t;
    // SAFETY: the buffer has `len` writable bytes.
    let rc = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut len) };
    let errno = if rc == 0 {
        0
    } else {
        io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    };
    (rc, errno, len as usize, buf)
}

fn decode_sockaddr(buf: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([buf[0], buf[1]]) as i32;
    let port = u16::from_be_bytes([buf[2], buf[3]]);
    if family == libc::AF_INET && buf.len() >= 16 {
        let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
        Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
    } else if family == libc::AF_INET6 && buf.len() >= 28 {
        let ip: [u8; 16] = buf[8..24].try_into().ok()?;
        let scope = u32::from_ne_bytes(buf[24..28].try_into().ok()?);
        let flow = u32::from_ne_bytes(buf[4..8].try_into().ok()?);
        Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            flow,
            scope,
        )))
    } else {
        None
    }
}

fn origdst(fd: RawFd, level: i32, buflen: usize) -> Value {
    let (rc, errno, optlen, buf) = raw_getsockopt(fd, level, SO_ORIGINAL_DST, buflen);
    let addr = (rc == 0).then(|| decode_sockaddr(&buf)).flatten();
    json!({
        "rc": rc,
        "errno": errno,
        "optlen": optlen,
        "addr": addr.map(|a| a.to_string()),
        "tail_untouched": untouched(&buf[optlen.min(buflen)..]),
    })
}

/// A getsockopt with a buffer larger than a page (a cgroup getsockopt program sees only the
/// first page): return code, errno, optlen, a digest of the bytes returned, untouched tail.
fn large(fd: RawFd, level: i32, name: i32, buflen: usize) -> Value {
    let (rc, errno, optlen, buf) = raw_getsockopt(fd, level, name, buflen);
    let end = optlen.min(buflen);
    // Eight bytes per step (the tail zero-padded): the debug build runs this loop unoptimized.
    let digest = buf[..end].chunks(8).fold(0u64, |h, c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h.wrapping_mul(0x100_0000_01b3)
            .wrapping_add(u64::from_le_bytes(w))
    });
    json!({"rc": rc, "errno": errno, "optlen": optlen, "digest": digest,
           "tail_untouched": untouched(&buf[end..])})
}

/// The large-buffer calls of the kernel doc's "Large optval" case, on `fd` and on a fresh unix
/// socketpair (where SO_PEERGROUPS succeeds).
fn large_report(fd: RawFd) -> Value {
    const UNKNOWN_SOL_SOCKET: i32 = 0x7fff;
    let mut pair = [0; 2];
    // SAFETY: `pair` has room for the two fds.
    let unix =
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) } == 0
        {
            let v = large(pair[0], libc::SOL_SOCKET, libc::SO_PEERGROUPS, 16 << 10);
            // SAFETY: both fds were just created here.
            unsafe {
                libc::close(pair[0]);
                libc::close(pair[1]);
            }
            v
        } else {
            json!({"socketpair_errno": io::Error::last_os_error().raw_os_error()})
        };
    json!({
        "peergroups_16k": large(fd, libc::SOL_SOCKET, libc::SO_PEERGROUPS, 16 << 10),
        "peergroups_unix_16k": unix,
        "unknown_sol_socket_16k": large(fd, libc::SOL_SOCKET, UNKNOWN_SOL_SOCKET, 16 << 10),
        "origdst4_8k": large(fd, libc::SOL_IP, SO_ORIGINAL_DST, 8 << 10),
        "origdst6_8k": large(fd, libc::SOL_IPV6, SO_ORIGINAL_DST, 8 << 10),
        "tcp_info_8k": large(fd, libc::IPPROTO_TCP, libc::TCP_INFO, 8 << 10),
    })
}

/// Every getsockopt the tests look at, on one socket.
fn report(fd: RawFd) -> Value {
    let tcp_info = |buflen| {
        let (rc, errno, optlen, buf) =
            raw_getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, buflen);
        json!({"rc": rc, "errno": errno, "optlen": optlen, "state": buf[0],
               "tail_untouched": untouched(&buf[optlen.min(buflen)..])})
    };
    let (rc, errno, optlen, buf) = raw_getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, 16);
    json!({
        "origdst4": origdst(fd, libc::SOL_IP, 128),
        "origdst6": origdst(fd, libc::SOL_IPV6, 128),
        "origdst4_short": origdst(fd, libc::SOL_IP, 8),
        "origdst6_short": origdst(fd, libc::SOL_IPV6, 20),
        "tcp_info": tcp_info(512),
        "tcp_info_short": tcp_info(8),
        "large": large_report(fd),
        "so_error": {
            "rc": rc, "errno": errno, "optlen": optlen,
            "value": i32::from_ne_bytes(buf[0..4].try_into().unwrap()),
            "tail_untouched": untouched(&buf[optlen.min(16)..]),
        },
    })
}

fn log_line(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn handle(stream: TcpStream, quiet: bool) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut reader = BufReader::new(&stream);
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let mut answer = report(stream.as_raw_fd());
    answer["peer"] = json!(stream.peer_addr().ok().map(|a| a.to_string()));
    answer["local"] = json!(stream.local_addr().ok().map(|a| a.to_string()));
    answer["request"] = json!(request.trim());
    let line = answer.to_string();
    if !quiet {
        log_line(&line);
    }
    let mut w = &stream;
    if w.write_all(format!("{line}\n").as_bytes()).is_err() {
        return;
    }
    // Half-close, then drain until the client closes: the proxy's socket is the one that
    // sees the client's close, and closing with unread bytes would turn into an RST.
    let _ = stream.shutdown(Shutdown::Write);
    let mut buf = [0u8; 1024];
    while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
}

fn proxy(listen: Vec<SocketAddr>, quiet: bool) -> Result<()> {
    let listeners = listen
        .iter()
        .map(|a| TcpListener::bind(a).with_context(|| format!("bind {a}")))
        .collect::<Result<Vec<_>>>()?;
    for l in &listeners {
        log_line(&format!("listening {}", l.local_addr()?));
    }
    thread::scope(|s| {
        for l in &listeners {
            s.spawn(move || {
                for conn in l.incoming() {
                    match conn {
                        Ok(c) => {
                            thread::spawn(move || handle(c, quiet));
                        }
                        Err(e) => eprintln!("redirect-sockprobe: accept: {e}"),
                    }
                }
            });
        }
    });
    Ok(())
}

fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is valid when zeroed and large enough for both families.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// socket + optional bind + blocking connect. The family follows the address, so a v4-mapped
/// address goes through an AF_INET6 socket.
fn connect(addr: &SocketAddr, bind: Option<&SocketAddr>) -> io::Result<TcpStream> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned by the TcpStream below or closed on error.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    if let Some(b) = bind {
        let (ss, len) = to_sockaddr(b);
        // SAFETY: ss holds a valid sockaddr of `len` bytes.
        if unsafe { libc::bind(fd, (&raw const ss).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (ss, len) = to_sockaddr(addr);
    // SAFETY: as above.
    if unsafe { libc::connect(fd, (&raw const ss).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

fn exchange(stream: &TcpStream) -> io::Result<String> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut w = stream;
    w.write_all(b"q\n")?;
    let mut reply = String::new();
    let mut r = stream;
    r.read_to_string(&mut reply)?;
    Ok(reply)
}

fn client(addr: SocketAddr, bind: Option<SocketAddr>, wait_stdin: bool) -> Result<()> {
    let stream = connect(&addr, bind.as_ref()).with_context(|| format!("connect {addr}"))?;
    let peer = stream.peer_addr().ok().map(|a| a.to_string());
    let local = stream.local_addr().ok().map(|a| a.to_string());
    log_line(&json!({"event": "connected", "peer": peer, "local": local}).to_string());
    if wait_stdin {
        let mut line = String::new();
        io::stdin().read_line(&mut line)?;
    }
    let own = report(stream.as_raw_fd());
    let reply = exchange(&stream)?;
    let proxy: Value = serde_json::from_str(reply.trim()).unwrap_or(json!(reply));
    log_line(
        &json!({"event": "done", "peer": peer, "local": local, "client": own, "proxy": proxy})
            .to_string(),
    );
    Ok(())
}

/// One load thread: connections k = first, first + step, ... < count.
fn load_thread(
    dst: std::net::IpAddr,
    first: u64,
    step: u64,
    count: u64,
) -> (u64, u64, Vec<String>) {
    let (mut ok, mut bad) = (0, 0);
    let mut errors = Vec::new();
    let mut k = first;
    while k < count {
        let port = 1024 + (k % 60000) as u16;
        let addr = SocketAddr::new(dst, port);
        let result = connect(&addr, None).and_then(|s| exchange(&s));
        match result {
            Ok(reply) => {
                let v: Value = serde_json::from_str(reply.trim()).unwrap_or(Value::Null);
                let key = if dst.is_ipv4() {
                    "origdst4"
                } else {
                    "origdst6"
                };
                if v[key]["addr"] == json!(addr.to_string()) {
                    ok += 1;
                } else {
                    bad += 1;
                    if errors.len() < 5 {
                        errors.push(format!("{addr}: proxy answered {reply:?}"));
                    }
                }
            }
            Err(e) => {
                bad += 1;
                if errors.len() < 5 {
                    errors.push(format!("{addr}: {e}"));
                }
            }
        }
        k += step;
    }
    (ok, bad, errors)
}

fn load(dst: std::net::IpAddr, count: u64, threads: u64) -> Result<()> {
    let threads = threads.max(1);
    let results: Vec<_> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| s.spawn(move || load_thread(dst, t, threads, count)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: u64 = results.iter().map(|r| r.0).sum();
    let bad: u64 = results.iter().map(|r| r.1).sum();
    let errors: Vec<String> = results.into_iter().flat_map(|r| r.2).collect();
    log_line(&json!({"ok": ok, "bad": bad, "errors": errors}).to_string());
    if bad > 0 {
        bail!("{bad} of {count} connections failed");
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Proxy { listen, quiet } => proxy(listen, quiet),
        Cmd::Client {
            addr,
            bind,
            wait_stdin,
        } => client(addr, bind, wait_stdin),
        Cmd::Load {
            dst,
            count,
            threads,
        } => load(dst, count, threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redirect-sockprobe: {e:#}");
            ExitCode::FAILURE
        }
    }
}
