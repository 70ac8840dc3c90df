//! [`serve_identity`]: a TCP server inside a fixture's netns that answers with its own name, so a
//! test can tell which server (or proxy) a connection really reached.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::Fixture;

/// A running identity server; stops accepting when dropped.
pub struct IdentityServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl IdentityServer {
    /// The bound address (with the real port if port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Peer addresses of the connections accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// Number of connections accepted so far.
    pub fn connections(&self) -> usize {
        self.peers.lock().unwrap().len()
    }
}

impl Drop for IdentityServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Listens on `addr` inside the fixture's netns (the address must exist there, e.g. via
/// [`Fixture::add_addr`]). Each connection gets `name` + "\n", then the server half-closes
/// and drains what the client sends until EOF, so that unread request bytes never turn the
/// close into an RST that could destroy the reply in flight.
pub fn serve_identity(fixture: &Fixture, addr: SocketAddr, name: &str) -> Result<IdentityServer> {
    let listener = fixture
        .in_netns(|| TcpListener::bind(addr))?
        .with_context(|| format!("bind {addr} in netns {}", fixture.netns_name()))?;
    let addr = listener.local_addr()?;
    // Non-blocking plus poll with a timeout, so the loop notices `stop` without needing a
    // wake-up connection (which could not be made from outside the netns anyway).
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let peers = Arc::new(Mutex::new(Vec::new()));
    let reply = format!("{name}\n").into_bytes();
    let thread = {
        let stop = stop.clone();
        let peers = peers.clone();
        thread::Builder::new()
            .name(format!("identity-{name}"))
            .spawn(move || accept_loop(listener, &stop, &peers, &reply))?
    };
    Ok(IdentityServer {
        addr,
        stop,
        peers,
        thread: Some(thread),
    })
}

fn accept_loop(
    listener: TcpListener,
    stop: &AtomicBool,
    peers: &Mutex<Vec<SocketAddr>>,
    reply: &[u8],
) {
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for a socket we own.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
            continue;
        }
        let Ok((stream, peer)) = listener.accept() else {
            continue;
        };
        peers.lock().unwrap().push(peer);
        let reply = reply.to_vec();
        thread::spawn(move || answer(stream, &reply));
    }
}

fn answer(mut stream: TcpStream, reply: &[u8]) {
    let _ = stream.set_nonblocking(false);
    if stream.write_all(reply).is_err() {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}
