//! Issue #12, found by reading the datapath: getpeername checks the record against the socket's
//! real peer (item 14), and the proxy-uid bypass matches the socket's owner, as iptables'
//! `--uid-owner` does (item 15).
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

/// Item 14: a redirected connect that fails before the handshake (node proxy unroutable), then
/// a connect of the same socket to an excluded destination: getpeername shows the real peer.
#[test]
fn getpeername_after_a_failed_redirect_shows_the_real_peer() {
    let w = world("esc-peer");
    let cfg = config(&w).replace(
        "proxy: {mode: sidecar, outboundPort: 15001, uid: 1337}",
        "proxy: {mode: node, address: 198.18.99.99, outboundPort: 15001}",
    );
    let _agent = Agent::start(&w.fx, &cfg).unwrap();
    let v = sockcheck(&w, &w.pod2, &["reconnect", DEST, EXCLUDED]);
    assert_ne!(v["first"], "ok", "{v}");
    assert_eq!(v["second"], "ok", "{v}");
    assert_eq!(v["reply"], EXCLUDED, "{v}");
    assert_eq!(v["peer"], EXCLUDED, "{v}");
}

/// Item 15: the proxy uid is matched against the socket's creator, not the connecting task.
#[test]
fn proxy_uid_bypass_matches_the_socket_owner() {
    let w = world("esc-uid");
    let _agent = Agent::start(&w.fx, &config(&w)).unwrap();
    let run_with = |create: &str, extra: &[&str], connect: &str| {
        let mut args = vec!["owner", "--create-uid", create, "--connect-uid", connect];
        args.extend(extra);
        args.push(DEST);
        let v = sockcheck(&w, &w.app, &args);
        assert_eq!(v["connect"], "ok", "{v}");
        v["reply"].as_str().unwrap().to_string()
    };
    let run = |create: &str, connect: &str| run_with(create, &[], connect);
    // Created by root, connected after switching to the proxy uid: iptables redirects it.
    let r = run("0", "1337");
    assert!(r.starts_with("proxy"), "root-owned socket escaped: {r}");
    // Created as the proxy uid, connected as root: iptables lets it through.
    assert_eq!(run("1337", "0"), DEST);
    // Consistent cases stay as they were.
    assert_eq!(run("1337", "1337"), DEST);
    assert!(run("0", "0").starts_with("proxy"));
    // iptables compares the fsuid of the socket's file (xt_owner), which is what the kernel
    // keeps as the socket's owner: real uid root, fsuid the proxy uid, is the proxy.
    // Before sk_uid was read, the creator's real uid decided both of these the other way.
    assert_eq!(run_with("0", &["--create-fsuid", "1337"], "0"), DEST);
    let r = run_with("1337", &["--create-fsuid", "0"], "1337");
    assert!(
        r.starts_with("proxy"),
        "socket with fsuid root escaped: {r}"
    );
}
