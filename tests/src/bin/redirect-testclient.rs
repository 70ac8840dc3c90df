//! redirect-testclient: one TCP connection, reporting what the application would see.
//!
//! `redirect-testclient connect ADDR:PORT [--send TEXT] [--timeout-ms N] [--uid N] [--json]`
//!
//! Connects (IPv4, IPv6, or v4-mapped such as `[::ffff:198.18.0.10]:80`, which goes through an
//! AF_INET6 socket), optionally sends TEXT and half-closes, reads the reply until EOF and prints
//! it. `--json` prints `{"ok","reply","peer","local","error"}`; `peer` comes from getpeername(2),
//! so tests can check what the application is shown after a redirect.
//!
//! Exit status: 0 success, 1 connect failed, 2 I/O error after connecting, 3 setup error
//! (e.g. setuid). With `--json` the JSON line is printed in every case.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "redirect-testclient",
    about = "Connect once and report reply and peer"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect to ADDR:PORT, optionally send, print the reply.
    Connect {
        /// Destination, e.g. `198.18.0.10:80`, `[fd00:198:18::10]:80`, `[::ffff:198.18.0.10]:80`.
        addr: SocketAddr,
        /// Bytes to send after connecting (then the write side is shut down).
        #[arg(long)]
        send: Option<String>,
        /// Timeout for connect and for each read/write.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// setuid(N) before connecting (to act as the proxy's uid).
        #[arg(long)]
        uid: Option<u32>,
        /// Print one JSON object instead of the raw reply.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Default)]
struct Report {
    reply: Vec<u8>,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    error: Option<String>,
    code: u8,
}

fn fail(mut r: Report, code: u8, what: &str, e: impl std::fmt::Display) -> Report {
    r.error = Some(format!("{what}: {e}"));
    r.code = code;
    r
}

fn run(addr: SocketAddr, send: Option<&str>, timeout: Duration, uid: Option<u32>) -> Report {
    let r = Report::default();
    if let Some(uid) = uid
        && let Err(e) = nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))
    {
        return fail(r, 3, "setuid", e);
    }
    // std picks the socket family from the address, so a v4-mapped V6 address is connected
    // through AF_INET6, which is exactly the case the cgroup/connect6 hook must handle.
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return fail(r, 1, "connect", e),
    };
    let mut r = Report {
        peer: stream.peer_addr().ok(),
        local: stream.local_addr().ok(),
        ..r
    };
    if let Err(e) = stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
    {
        return fail(r, 2, "set timeout", e);
    }
    if let Some(text) = send {
        if let Err(e) = stream.write_all(text.as_bytes()) {
            return fail(r, 2, "send", e);
        }
        // Half-close so request/response servers see the end of the request.
        if let Err(e) = stream.shutdown(Shutdown::Write) {
            return fail(r, 2, "shutdown", e);
        }
    }
    if let Err(e) = stream.read_to_end(&mut r.reply) {
        return fail(r, 2, "read", e);
    }
    r
}

fn main() -> ExitCode {
    let Cli {
        cmd:
            Cmd::Connect {
                addr,
                send,
                timeout_ms,
                uid,
                json,
            },
    } = Cli::parse();
    let r = run(
        addr,
        send.as_deref(),
        Duration::from_millis(timeout_ms.max(1)),
        uid,
    );
    let reply = String::from_utf8_lossy(&r.reply);
    if json {
        let v = json!({
            "ok": r.error.is_none(),
            "reply": reply,
            "peer": r.peer.map(|a| a.to_string()),
            "local": r.local.map(|a| a.to_string()),
            "error": r.error,
        });
        println!("{v}");
    } else {
        print!("{reply}");
        if let Some(e) = &r.error {
            eprintln!("redirect-testclient: {e}");
        }
    }
    let _ = io::stdout().flush();
    ExitCode::from(r.code)
}
