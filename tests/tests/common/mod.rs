//! Shared helpers for this crate's integration tests.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use redirect_tests::{Fixture, Spawned};
use serde_json::Value;

pub const CLIENT: &str = env!("CARGO_BIN_EXE_redirect-testclient");
pub const PROXY: &str = env!("CARGO_BIN_EXE_redirect-testproxy");

/// Runs `redirect-testclient connect ADDR --json EXTRA...` in `cgroup` + the netns and returns
/// its JSON report together with the exit code.
pub fn connect(fx: &Fixture, cgroup: &Path, addr: &str, extra: &[&str]) -> (Value, i32) {
    let out = fx
        .run_in(
            cgroup,
            Command::new(CLIENT)
                .args(["connect", addr, "--json", "--timeout-ms", "3000"])
                .args(extra),
        )
        .expect("run testclient");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "testclient printed no JSON ({e}): stdout={stdout:?} stderr={:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.code().unwrap_or(-1))
}

/// Starts redirect-testproxy with `args` in `cgroup` and waits until it listens.
pub fn start_proxy(fx: &Fixture, cgroup: &Path, args: &[&str]) -> Spawned {
    let p = fx
        .spawn_logged(cgroup, Command::new(PROXY).args(args))
        .expect("spawn testproxy");
    p.wait_for_prefix("listening ", Duration::from_secs(10))
        .expect("testproxy did not start");
    p
}
