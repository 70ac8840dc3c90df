//! redirect-sockcheck: loops of socket life cycles that one connect() per process cannot show,
//! for the issue #12 escape tests. Each prints one JSON line of counts.
//!
//! - `peers --count N [--clash] DEST ELSEWHERE` (item 14): N rounds. With `--clash`, each round
//!   first makes an ordinary redirected connection to DEST (held open, `SO_REUSEADDR`, bound to
//!   127.0.0.1), then a second socket bound to the same local address and port connects to DEST:
//!   the redirect sends it to the same proxy 4-tuple, so connect() fails early (EADDRNOTAVAIL)
//!   after the connect program recorded it. Without `--clash` the first connect is expected to
//!   fail on its own (a node proxy with no route). The failed socket then connects to ELSEWHERE
//!   (not redirected). Every socket's getpeername must name what the application connected to:
//!   DEST for the redirected one, ELSEWHERE (its real peer) for the reconnected one.
//! - `owners --count N --proxy-uid P DEST` (item 15): N connects to DEST, cycling through
//!   [`OWNER_CASES`]: the socket is created with one real uid and fsuid, then the process switches
//!   to another real uid and connects. iptables' `--uid-owner` matches the socket's owner (the
//!   fsuid at creation), so exactly the sockets created with fsuid P may bypass the proxy.
//!   Counts escapes (went direct although owned by another uid) and wrong bypasses.

use std::{
    io::Read as _,
    net::{SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd},
    time::Duration,
};

use clap::{Parser, Subcommand};
use nix::{
    errno::Errno,
    sys::{
        socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, getpeername, getsockname,
            setsockopt, socket, sockopt,
        },
        stat::fstat,
    },
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
    Peers {
        #[arg(long)]
        count: usize,
        #[arg(long)]
        clash: bool,
        dest: SocketAddrV4,
        elsewhere: SocketAddrV4,
    },
    Owners {
        #[arg(long)]
        count: usize,
        #[arg(long)]
        proxy_uid: u32,
        dest: SocketAddrV4,
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

/// Reads the reply (the identity servers and the tag-mode proxy answer and close).
fn reply(fd: OwnedFd) -> String {
    let mut s = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.trim().to_string()
}

fn peer(fd: &OwnedFd) -> Option<SocketAddrV4> {
    getpeername::<SockaddrIn>(fd.as_raw_fd())
        .ok()
        .map(|a| SocketAddrV4::new(a.ip(), a.port()))
}

/// Keeps the first few anomalies for the test's failure message.
#[derive(Default)]
struct Notes(Vec<String>);

impl Notes {
    fn add(&mut self, s: String) {
        if self.0.len() < 8 {
            self.0.push(s);
        }
    }
}

fn peers(count: usize, clash: bool, dest: SocketAddrV4, elsewhere: SocketAddrV4) {
    let want_proxy = format!("proxy orig={dest} ");
    let (mut proxied, mut failed_early, mut reconnected, mut wrong_peer) = (0, 0, 0, 0);
    let mut notes = Notes::default();
    for i in 0..count {
        // The ordinary redirected connection, whose proxy 4-tuple the next socket collides with.
        let held = clash.then(|| {
            let fd = tcp_socket();
            setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
            bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).expect("bind");
            let r = connect(fd.as_raw_fd(), &SockaddrIn::from(dest));
            (fd, r)
        });
        let fd = tcp_socket();
        if let Some((h, _)) = &held {
            setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
            let local: SockaddrIn = getsockname(h.as_raw_fd()).expect("getsockname");
            bind(fd.as_raw_fd(), &local).expect("bind to the held socket's address");
        }
        match connect(fd.as_raw_fd(), &SockaddrIn::from(dest)) {
            Err(_) => failed_early += 1,
            Ok(()) => notes.add(format!("round {i}: the first connect to {dest} succeeded")),
        }
        match connect(fd.as_raw_fd(), &SockaddrIn::from(elsewhere)) {
            Ok(()) => {
                let p = peer(&fd);
                if p != Some(elsewhere) {
                    wrong_peer += 1;
                    notes.add(format!("round {i}: reconnected socket's peer {p:?}"));
                }
                let r = reply(fd);
                if r == elsewhere.to_string() {
                    reconnected += 1;
                } else {
                    notes.add(format!("round {i}: {elsewhere} answered {r:?}"));
                }
            }
            Err(e) => notes.add(format!("round {i}: connect {elsewhere}: {e}")),
        }
        if let Some((h, r)) = held {
            if let Err(e) = r {
                notes.add(format!("round {i}: redirected connect {dest}: {e}"));
                continue;
            }
            let p = peer(&h);
            if p != Some(dest) {
                wrong_peer += 1;
                notes.add(format!("round {i}: redirected socket's peer {p:?}"));
            }
            let r = reply(h);
            if r.starts_with(&want_proxy) {
                proxied += 1;
            } else {
                notes.add(format!("round {i}: redirected connect answered {r:?}"));
            }
        }
    }
    println!(
        "{}",
        json!({
            "rounds": count,
            "proxied": proxied,
            "failed_early": failed_early,
            "reconnected": reconnected,
            "wrong_peer": wrong_peer,
            "notes": notes.0,
        })
    );
}

/// (real uid at creation, fsuid at creation, real uid at connect); `P` stands for the proxy
/// uid, `O` for another uid. Only the owner (the fsuid) decides.
const OWNER_CASES: [(char, char, char); 9] = [
    ('0', '0', '0'),
    ('0', '0', 'P'),
    ('P', '0', 'P'),
    ('O', 'O', 'P'),
    ('P', 'O', 'P'),
    ('P', 'P', 'P'),
    ('P', 'P', '0'),
    ('0', 'P', '0'),
    ('O', 'P', 'O'),
];
const OTHER_UID: u32 = 2000;

/// Real uid `ruid`, effective uid `euid`, saved uid 0 (so the process can switch back).
fn set_uids(ruid: u32, euid: u32) {
    setresuid(Uid::from_raw(ruid), Uid::from_raw(euid), Uid::from_raw(0)).expect("setresuid");
}

/// A socket created with real uid `ruid` and fsuid `fsuid`; the process is root again after.
fn socket_owned_by(ruid: u32, fsuid: u32) -> OwnedFd {
    // Effective uid 0 while creating, so setfsuid may set any fsuid; the socket's owner is the
    // fsuid alone (the inode's uid, which the kernel copies into sk->sk_uid).
    set_uids(ruid, 0);
    setfsuid(Uid::from_raw(fsuid));
    let fd = tcp_socket();
    set_uids(0, 0);
    let st = fstat(fd.as_raw_fd()).expect("fstat");
    assert_eq!(st.st_uid, fsuid, "the socket's owner is not the fsuid set");
    fd
}

fn owners(count: usize, proxy_uid: u32, dest: SocketAddrV4) {
    let uid = |c: char| match c {
        'P' => proxy_uid,
        'O' => OTHER_UID,
        _ => 0,
    };
    let mut per_case = [[0usize; 3]; OWNER_CASES.len()];
    let (mut redirected, mut bypassed, mut escaped, mut wrong_bypass, mut failed) = (0, 0, 0, 0, 0);
    let mut notes = Notes::default();
    for i in 0..count {
        let k = i % OWNER_CASES.len();
        let (cr, cf, conn) = OWNER_CASES[k];
        let fd = socket_owned_by(uid(cr), uid(cf));
        set_uids(uid(conn), uid(conn));
        let r = connect(fd.as_raw_fd(), &SockaddrIn::from(dest));
        set_uids(0, 0);
        let answer = match r {
            Ok(()) => reply(fd),
            Err(e) => format!("connect: {}", Errno::desc(e)),
        };
        let must_bypass = uid(cf) == proxy_uid;
        let case = format!("created ruid={cr} fsuid={cf}, connected ruid={conn}");
        if answer.starts_with("proxy") {
            per_case[k][0] += 1;
            redirected += 1;
            if must_bypass {
                wrong_bypass += 1;
                notes.add(format!("{case}: redirected, but the proxy owns it"));
            }
        } else if answer == dest.to_string() {
            per_case[k][1] += 1;
            bypassed += 1;
            if !must_bypass {
                escaped += 1;
                notes.add(format!("{case}: escaped to {answer}"));
            }
        } else {
            per_case[k][2] += 1;
            failed += 1;
            notes.add(format!("{case}: {answer:?}"));
        }
    }
    let cases: Vec<_> = OWNER_CASES
        .iter()
        .zip(per_case)
        .map(|((cr, cf, conn), [r, b, f])| {
            json!({"case": format!("{cr}{cf}{conn}"), "redirected": r, "direct": b, "failed": f})
        })
        .collect();
    println!(
        "{}",
        json!({
            "connects": count,
            "redirected": redirected,
            "bypassed": bypassed,
            "escaped": escaped,
            "wrong_bypass": wrong_bypass,
            "failed": failed,
            "cases": cases,
            "notes": notes.0,
        })
    );
}

fn main() {
    match Cli::parse().cmd {
        Cmd::Peers {
            count,
            clash,
            dest,
            elsewhere,
        } => peers(count, clash, dest, elsewhere),
        Cmd::Owners {
            count,
            proxy_uid,
            dest,
        } => owners(count, proxy_uid, dest),
    }
}
