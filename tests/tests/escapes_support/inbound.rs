//! The inbound looping client: a thread of the test process in a "client node" netns that
//! connects to one pod address in a loop and counts who accepted each connection. It needs no
//! cgroup (sk_lookup runs in the pod's netns, whoever the client is), and in-process connects
//! loop far faster than one process per connect, so a short window is covered densely.
#![allow(dead_code)] // each test binary uses a different subset

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Who accepted one connection: `proxy` (a sockprobe proxy: its JSON report), the app's
/// identity (`app-8080`), or `failed` (refused, reset or timed out: never an escape).
pub fn classify(reply: &str) -> String {
    let reply = reply.trim();
    if reply.starts_with('{') {
        "proxy".into()
    } else if reply.is_empty() {
        "failed".into()
    } else {
        reply.to_string()
    }
}

/// Counts by [`classify`]'s answer.
pub type Tally = BTreeMap<String, usize>;

pub struct NetnsLooper {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    thread: Option<JoinHandle<()>>,
}

impl NetnsLooper {
    /// Starts looping connects to `addr` from `netns`. Returns at once.
    pub fn start(netns: &File, addr: &str) -> NetnsLooper {
        let addr: SocketAddr = addr.parse().unwrap();
        let netns = netns.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::new()));
        let thread = std::thread::spawn({
            let (stop, tally) = (stop.clone(), tally.clone());
            move || {
                redirect_tests::enter_current_thread(&netns).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let who = classify(&once(addr).unwrap_or_default());
                    *tally.lock().unwrap().entry(who).or_default() += 1;
                }
            }
        });
        NetnsLooper {
            addr,
            stop,
            tally,
            thread: Some(thread),
        }
    }

    pub fn tally(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }

    pub fn count(&self, who: &str) -> usize {
        self.tally().get(who).copied().unwrap_or(0)
    }

    /// Waits until `n` more connections were accepted by `who` (the loop is alive and lands
    /// there).
    pub fn wait_for(&self, who: &str, n: usize) {
        let target = self.count(who) + n;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.count(who) < target {
            assert!(
                Instant::now() < deadline,
                "looped connects to {} stopped reaching {who}: {:?}",
                self.addr,
                self.tally()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the loop and returns the final counts.
    pub fn finish(mut self) -> Tally {
        self.stop_thread();
        self.tally()
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NetnsLooper {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// One connection: sends a line (the sockprobe proxy answers after one), half-closes, reads the
/// reply to EOF.
fn once(addr: SocketAddr) -> std::io::Result<String> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"q\n")?;
    s.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply)
}

/// Asserts that the loop ran (at least `min` connections reached the proxy) and that none
/// reached the app (`app` connections counted by the app's own server, plus the client's view).
pub fn assert_inbound_no_escape(t: &Tally, app_accepted: usize, min: usize, what: &str) {
    println!("{what}: looped connects {t:?}, accepted by the app: {app_accepted}");
    let escaped: usize = t
        .iter()
        .filter(|(k, _)| k.starts_with("app-"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(escaped, 0, "{what}: looped connects reached the app: {t:?}");
    assert_eq!(
        app_accepted, 0,
        "{what}: the app accepted connections: {t:?}"
    );
    let proxied = t.get("proxy").copied().unwrap_or(0);
    assert!(
        proxied >= min,
        "{what}: the loop ran too little ({proxied} < {min} proxied): {t:?}"
    );
}
