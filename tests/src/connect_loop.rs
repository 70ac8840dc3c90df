//! A shell looping `redirect-testclient connect` in a workload's cgroup: the client side of the
//! escape tests that count where each connect of a running workload landed.
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{Fixture, Spawned, helper_bin};

/// Loops connects to `dest` from `cgroup` until dropped; each reply is one line of the
/// returned process's output ("proxy …" when the proxy answered).
pub fn looping_client(fx: &Fixture, cgroup: &Path, dest: &str) -> Result<Spawned> {
    let client = helper_bin("redirect-testclient")?;
    let script = format!(
        "while :; do {} connect {dest} --timeout-ms 2000; echo; done",
        client.display()
    );
    fx.spawn_logged(cgroup, Command::new("sh").arg("-c").arg(script))
}

/// How many of the client's connects the proxy answered so far.
pub fn proxied(c: &Spawned) -> usize {
    c.lines().iter().filter(|l| l.starts_with("proxy")).count()
}

/// Waits until `n` more of the client's connects went to the proxy (panics after 30 s, showing
/// the client's last lines).
pub fn wait_proxied(c: &Spawned, n: usize) {
    let target = proxied(c) + n;
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxied(c) < target {
        assert!(
            Instant::now() < deadline,
            "the client stopped reaching the proxy: {:?}",
            c.lines().iter().rev().take(5).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
