//! `redirect-agent explain --inbound` against a running agent's pinned maps: the kernel's
//! lookups (through the same `decide_inbound`) agree with the config, for each step, and a bad
//! inbound value is shown as rejected while the outbound policy still applies.
mod inbound_support;

use std::process::Command;

use inbound_support::*;
use serde_json::Value;

/// `explain --workload test/pod1 ARGS --bpffs-dir` as JSON, checked to have asked the kernel.
fn explain_json(agent: &redirect_tests::Agent, args: &[&str]) -> Value {
    let out = Command::new(redirect_tests::helper_bin("redirect-agent").unwrap())
        .args(["explain", "--workload", "test/pod1", "--output", "json"])
        .args(args)
        .arg("--config")
        .arg(agent.config_path())
        .arg("--bpffs-dir")
        .arg(agent.bpffs())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "explain {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["evaluated"], "kernel", "{v}");
    v
}

fn explain(agent: &redirect_tests::Agent, port: u16, source: &str) -> Value {
    let dest = format!("{POD4}:{port}");
    explain_json(agent, &["--inbound", "--dest", &dest, "--source", source])
}

#[test]
fn explain_inbound_asks_the_kernel_and_names_the_step() {
    let w = world("explain");
    let _apps = w.apps(&[7001, 8080]);
    let excl = ("traffic.sidecar.istio.io/excludeInboundPorts", "7001");
    let skip = ("traffic.kuma.io/exclude-inbound-ips", "198.19.9.0/24");
    let mut agent = w.agent(&[excl, skip]);
    // After the agent: its sockops program records the listener when it starts listening.
    let _proxy = w.proxy(&["[::]:15006"]);
    let cases = [
        (8080, NODE4, "proxy", "included_port"),
        (7001, NODE4, "app", "excluded_port"),
        (15020, NODE4, "app", "excluded_port"),
        (8080, "198.19.9.7", "app", "excluded_source"),
    ];
    for (port, source, decision, step) in cases {
        let v = explain(&agent, port, source);
        // The kernel's record agrees with the config.
        assert_eq!(v["agree"], true, "{v}");
        assert_eq!(v["decision"], decision, "{v}");
        assert_eq!(v["step"], step, "{v}");
    }
    // What explain says is where the connections land.
    assert_eq!(w.who(&format!("{POD4}:8080")), "proxy");
    assert_eq!(w.who(&format!("{POD4}:7001")), "app-7001");

    // A typo in an inbound value: the outbound policy is still applied, inbound keeps its last
    // good policy, and explain shows the rejection.
    let bad = ("traffic.sidecar.istio.io/excludeInboundPorts", "70O1");
    let outbound = ("traffic.sidecar.istio.io/excludeOutboundPorts", "9999");
    agent
        .reconfigure(&w.config(&[bad, skip, outbound]))
        .unwrap();
    let v = explain(&agent, 7001, NODE4);
    // The kernel keeps the last good policy (7001 excluded); the config's view is the mesh
    // default's (every port captured), and explain says why they differ instead of failing.
    assert_eq!(v["decision"], "app", "last good inbound policy kept: {v}");
    assert_eq!(v["agree"], false, "{v}");
    let e = v["inbound_error"].as_str().unwrap_or_default();
    assert!(
        e.contains("70O1") && e.contains("excludeInboundPorts"),
        "{v}"
    );
    assert_eq!(w.who(&format!("{POD4}:7001")), "app-7001");
    assert_eq!(w.who(&format!("{POD4}:8080")), "proxy");
    // The outbound edit reached the kernel's maps.
    let v = explain_json(&agent, &["--dest", "198.18.0.10:9999"]);
    assert_eq!(v["step"], "excluded_port", "{v}");
}
