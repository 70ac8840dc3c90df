//! No leaks: after many short redirected connections, each one checked to reach the proxy with
//! its exact original destination, the hand-off map is back at its baseline, and every hand-off
//! was taken by its proxy socket (not evicted by the LRU). The per-socket records live in
//! socket-local storage, which the kernel frees with the socket.
mod origdst_support;

use std::process::Command;
use std::time::{Duration, Instant};

use origdst_support::*;
use redirect_tests::{Agent, Fixture};
use serde_json::Value;

/// 100k connections, as the issue asks: about 40 s in a debug build on the 2-core build machine
/// (20k take about 6 s). REDIRECT_LEAK_COUNT overrides it, e.g. for a quick local run.
const DEFAULT_COUNT: u64 = 100_000;

#[test]
fn record_maps_drain_after_many_short_connections() {
    let count: u64 = std::env::var("REDIRECT_LEAK_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_COUNT);
    let fx = Fixture::new("origdst-leak").unwrap();
    let pod = fx.cgroup("pod1").unwrap();
    let app = fx.cgroup("pod1/app").unwrap();
    let agent = Agent::start(&fx, &sidecar_config(&[("pod1", &pod)], 1337)).unwrap();
    let _proxy = start_proxy(
        &fx.cgroup("pod1/proxy").unwrap(),
        fx.netns_file(),
        &["127.0.0.1:15001"],
        true,
    );
    let before = record_fill(&agent);

    let started = Instant::now();
    let out = fx
        .run_in(
            &app,
            Command::new(SOCKPROBE).args([
                "load",
                "--dst",
                "198.18.0.10",
                "--count",
                &count.to_string(),
                "--threads",
                "2",
            ]),
        )
        .unwrap();
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success() && summary["ok"] == count,
        "load: {summary} stderr={}",
        String::from_utf8_lossy(&out.stderr)
    );
    let load_time = started.elapsed();

    // The last hand-offs are taken as the proxy's sockets are established, just before the
    // clients return: wait for the map to drain rather than sample once.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut after = record_fill(&agent);
    while after != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = record_fill(&agent);
    }
    eprintln!(
        "{count} connections in {load_time:?}; records (cookie, tuple) before {before:?}, after {after:?}"
    );
    assert_eq!(
        after, before,
        "records left behind after {count} connections"
    );
    // Every record was made, handed off, taken by its own proxy socket and answered.
    for counter in ["recorded", "established", "accepted"] {
        assert_eq!(orig_counter(&agent, counter), count, "{counter}");
    }
    // The probe proxy asks twice per connection: with a 128-byte and with an 8 KiB buffer (the
    // large-optval path of tests/tests/getsockopt_large.rs).
    assert_eq!(orig_counter(&agent, "answered"), 2 * count, "answered");
    for failed in ["record_failed", "accept_failed", "handoff_failed"] {
        assert_eq!(orig_counter(&agent, failed), 0, "{failed}");
    }
}
