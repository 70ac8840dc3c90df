//! redirect-sockcheck: socket life cycles that one connect() per process cannot show, for the
//! issue #12 tests. Prints one JSON line.
//!
//! - `reconnect FIRST SECOND`: one IPv4 TCP socket connects to FIRST (expected to fail early,
//!   e.g. a redirect to an unroutable proxy), then to SECOND; prints both results, the reply
//!   and what getpeername(2) shows.
//! - `owner --create-uid U --connect-uid V ADDR`: creates the socket with real uid U, connects
//!   it with real uid V (the saved uid stays 0 so the process can switch back), prints the
//!   reply. iptables' `--uid-owner` matches the socket's creator (U), not V. With
//!   `--create-fsuid F` the socket is created with fsuid F (setfsuid(2)) and real uid U:
//!   iptables compares the fsuid.

use std::{
    io::Read as _,
    net::{SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd},
    time::Duration,
};

use clap::{Parser, Subcommand};
use nix::{
    sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, connect, getpeername, socket},
    unistd::{Uid, setfsuid, setresuid},
};
use serde_json::json;

#[derive(Parser)]
#[command(name = "redirect-sockcheck")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Reconnect {
        first: SocketAddrV4,
        second: SocketAddrV4,
    },
    Owner {
        #[arg(long)]
        create_uid: u32,
        #[arg(long)]
        create_fsuid: Option<u32>,
        #[arg(long)]
        connect_uid: u32,
        addr: SocketAddrV4,
    },
}

fn tcp_socket() -> OwnedFd {
    socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket")
}

fn as_uid(uid: u32) {
    let (u, root) = (Uid::from_raw(uid), Uid::from_raw(0));
    setresuid(u, u, root).expect("setresuid");
}

/// Reads the reply (the identity servers and the tag-mode proxy answer and close).
fn reply(fd: OwnedFd) -> String {
    let mut s = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.trim().to_string()
}

fn main() {
    match Cli::parse().cmd {
        Cmd::Reconnect { first, second } => {
            let fd = tcp_socket();
            let r1 = connect(fd.as_raw_fd(), &SockaddrIn::from(first));
            let r2 = connect(fd.as_raw_fd(), &SockaddrIn::from(second));
            let peer = getpeername::<SockaddrIn>(fd.as_raw_fd())
                .map(|a| SocketAddr::V4(SocketAddrV4::new(a.ip(), a.port())).to_string());
            let reply = if r2.is_ok() { reply(fd) } else { String::new() };
            println!(
                "{}",
                json!({
                    "first": r1.map(|_| "ok".to_string()).unwrap_or_else(|e| e.desc().to_string()),
                    "second": r2.map(|_| "ok".to_string()).unwrap_or_else(|e| e.desc().to_string()),
                    "peer": peer.ok(),
                    "reply": reply,
                })
            );
        }
        Cmd::Owner {
            create_uid,
            create_fsuid,
            connect_uid,
            addr,
        } => {
            as_uid(create_uid);
            if let Some(f) = create_fsuid {
                setfsuid(Uid::from_raw(f));
            }
            let fd = tcp_socket();
            as_uid(0);
            as_uid(connect_uid);
            let r = connect(fd.as_raw_fd(), &SockaddrIn::from(addr));
            let reply = if r.is_ok() { reply(fd) } else { String::new() };
            println!(
                "{}",
                json!({
                    "connect": r.map(|_| "ok".to_string()).unwrap_or_else(|e| e.desc().to_string()),
                    "reply": reply,
                })
            );
        }
    }
}
