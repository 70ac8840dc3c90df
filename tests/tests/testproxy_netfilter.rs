//! redirect-testproxy checked against the reference it imitates: iptables REDIRECT + conntrack,
//! inside the fixture's netns. This pins down what the eBPF datapath must reproduce
//! (SO_ORIGINAL_DST answers, getpeername showing the original destination, uid exemption).
//! `cargo xtask test` installs iptables; a machine without a usable nat table fails these tests
//! rather than skipping them.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{connect, start_proxy};
use redirect_tests::{Fixture, serve_identity};

const PROXY_UID: &str = "1337";

/// Installs istio-style REDIRECT rules for port 80 of the test addresses, exempting the proxy
/// uid. Panics if netfilter NAT is not usable here: a skipped privileged test proves nothing.
fn redirect_rules(fx: &Fixture, cg: &Path) {
    let rules = [
        ("iptables", "198.18.0.10"),
        ("ip6tables", "fd00:198:18::10"),
    ];
    for (tool, dst) in rules {
        let args = [
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            dst,
            "--dport",
            "80",
            "-m",
            "owner",
            "!",
            "--uid-owner",
            PROXY_UID,
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ];
        match fx.run_in(cg, Command::new(tool).args(args)) {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => panic!("{tool} unavailable (cargo xtask test installs it): {e:#}"),
        }
    }
}

fn setup(name: &str) -> (Fixture, std::path::PathBuf) {
    let fx = Fixture::new(name).unwrap();
    fx.add_addr("198.18.0.10/32").unwrap();
    fx.add_addr("fd00:198:18::10/128").unwrap();
    let tools = fx.cgroup("tools").unwrap();
    redirect_rules(&fx, &tools);
    let app = fx.cgroup("pod1/app").unwrap();
    (fx, app)
}

#[test]
fn tag_mode_reports_original_destination_v4_v6_and_mapped() {
    let (fx, app) = setup("nf-tag");
    let proxy = start_proxy(&fx, &fx.cgroup("pod1/proxy").unwrap(), &["--v6"]);

    // The source stays the local test address (it is on `lo`); REDIRECT only rewrites the
    // destination, so the proxy's peer is the client's own local address.
    let (v, code) = connect(&fx, &app, "198.18.0.10:80", &["--send", "x"]);
    assert_eq!(code, 0, "{v}");
    let local = v["local"].as_str().unwrap();
    assert_eq!(
        v["reply"],
        format!("proxy orig=198.18.0.10:80 peer={local}\n")
    );
    // conntrack's NAT is invisible to the application: getpeername shows the original peer.
    assert_eq!(v["peer"], "198.18.0.10:80");

    let (v, code) = connect(&fx, &app, "[fd00:198:18::10]:80", &[]);
    assert_eq!(code, 0, "{v}");
    let local = v["local"].as_str().unwrap();
    assert_eq!(
        v["reply"],
        format!("proxy orig=[fd00:198:18::10]:80 peer={local}\n")
    );
    assert_eq!(v["peer"], "[fd00:198:18::10]:80");

    // v4-mapped: the packets are IPv4, so the IPv4 rule and an IPv4 proxy socket apply.
    let (v, code) = connect(&fx, &app, "[::ffff:198.18.0.10]:80", &[]);
    assert_eq!(code, 0, "{v}");
    let local = v["local"].as_str().unwrap();
    let port = local.rsplit_once(':').unwrap().1;
    assert_eq!(
        v["reply"],
        format!("proxy orig=198.18.0.10:80 peer=198.18.0.10:{port}\n")
    );
    assert_eq!(v["peer"], "[::ffff:198.18.0.10]:80");

    proxy
        .wait_for_line(
            |l| l.starts_with("orig=[fd00:198:18::10]:80 peer=[fd00:198:18::10]:"),
            Duration::from_secs(5),
        )
        .unwrap();
}

#[test]
fn forward_mode_reaches_the_original_destination() {
    let (fx, app) = setup("nf-forward");
    let _s4 = serve_identity(&fx, "198.18.0.10:80".parse().unwrap(), "backend").unwrap();
    let _s6 = serve_identity(&fx, "[fd00:198:18::10]:80".parse().unwrap(), "backend6").unwrap();
    let proxy = start_proxy(
        &fx,
        &fx.cgroup("pod1/proxy").unwrap(),
        &["--v6", "--mode", "forward", "--uid", PROXY_UID],
    );

    let (v, code) = connect(
        &fx,
        &app,
        "198.18.0.10:80",
        &["--send", "GET / HTTP/1.0\r\n\r\n"],
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["reply"], "backend\n");
    let (v, code) = connect(&fx, &app, "[fd00:198:18::10]:80", &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["reply"], "backend6\n");
    proxy
        .wait_for_line(
            |l| l.starts_with("orig=198.18.0.10:80 peer=198.18.0.10:"),
            Duration::from_secs(5),
        )
        .unwrap();

    // The exempted uid bypasses the proxy, as the real datapath must allow.
    let (v, code) = connect(&fx, &app, "198.18.0.10:80", &["--uid", PROXY_UID]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["reply"], "backend\n");
    let through_proxy = proxy
        .lines()
        .iter()
        .filter(|l| l.starts_with("orig="))
        .count();
    assert_eq!(through_proxy, 2, "{:?}", proxy.lines());
}
