//! Issue #12, found by reading the datapath, as loops that count: getpeername checks the record
//! against the socket's real peer (item 14), and the proxy-uid bypass matches the socket's
//! owner, as iptables' `--uid-owner` does (item 15).
mod escapes_support;

use std::process::Command;

use escapes_support::{DEST, EXCLUDED, config, world};
use redirect_tests::{Agent, helper_bin};
use serde_json::Value;

fn sockcheck(w: &escapes_support::World, cgroup: &std::path::Path, args: &[&str]) -> Value {
    let out =
        w.fx.run_in(
            cgroup,
            Command::new(helper_bin("redirect-sockcheck").unwrap()).args(args),
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const ROUNDS: u64 = 300;

/// Item 14, interleaved with ordinary redirects: each round holds a redirected connection to
/// DEST open, then a second socket bound to the same local port connects to DEST, which the
/// redirect sends to the same proxy 4-tuple, so the connect fails early after its record was
/// made; that socket then connects to the excluded destination. No socket may report a peer it
/// is not connected to, and every held one is proxied and reports DEST.
#[test]
fn getpeername_of_reconnected_sockets_interleaved_with_redirects() {
    let w = world("esc-peer");
    let _agent = Agent::start(&w.fx, &config(&w)).unwrap();
    let n = ROUNDS.to_string();
    let v = sockcheck(
        &w,
        &w.pod2,
        &["peers", "--count", &n, "--clash", DEST, EXCLUDED],
    );
    eprintln!("{v}");
    assert_eq!(v["wrong_peer"], 0, "{v}");
    assert_eq!(v["proxied"], ROUNDS, "{v}");
    assert_eq!(v["failed_early"], ROUNDS, "{v}");
    assert_eq!(v["reconnected"], ROUNDS, "{v}");
}

/// Item 14 with the issue's own failure: a node proxy with no route, so every redirected
/// connect fails at once (ENETUNREACH); each socket then connects to the excluded destination.
#[test]
fn getpeername_after_failed_redirects_to_an_unroutable_proxy() {
    let w = world("esc-peer-node");
    let cfg = config(&w).replace(
        "proxy: {mode: sidecar, outboundPort: 15001, uid: 1337}",
        "proxy: {mode: node, address: 198.18.99.99, outboundPort: 15001}",
    );
    let _agent = Agent::start(&w.fx, &cfg).unwrap();
    let n = ROUNDS.to_string();
    let v = sockcheck(&w, &w.pod2, &["peers", "--count", &n, DEST, EXCLUDED]);
    eprintln!("{v}");
    assert_eq!(v["wrong_peer"], 0, "{v}");
    assert_eq!(v["failed_early"], ROUNDS, "{v}");
    assert_eq!(v["reconnected"], ROUNDS, "{v}");
}

/// Item 15: connects from sockets created under every mix of real uid and fsuid (root, the
/// proxy uid 1337, another uid), with the real uid switched between creation and connect. Only
/// the sockets created with fsuid 1337 (the owner iptables' `--uid-owner` compares) bypass.
#[test]
fn proxy_uid_bypass_matches_the_socket_owner() {
    let w = world("esc-uid");
    let _agent = Agent::start(&w.fx, &config(&w)).unwrap();
    // A multiple of the 9 cases, so each case runs as often.
    let connects: u64 = 9 * 40;
    let v = sockcheck(
        &w,
        &w.app,
        &[
            "owners",
            "--count",
            &connects.to_string(),
            "--proxy-uid",
            "1337",
            DEST,
        ],
    );
    eprintln!("{v}");
    assert_eq!(v["escaped"], 0, "{v}");
    assert_eq!(v["wrong_bypass"], 0, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    // 5 of the 9 cases must be redirected, 4 bypass: neither count may be vacuous.
    assert_eq!(v["redirected"], connects / 9 * 5, "{v}");
    assert_eq!(v["bypassed"], connects / 9 * 4, "{v}");
}
