//! The connect-time datapath in the real kernel, driven by the real agent binary: every decision
//! step for IPv4, IPv6 and v4-mapped IPv6, ancestry, unregistered workloads, node mode, and
//! `explain` against the kernel. Each test asserts where the bytes went. Live changes, kill -9,
//! cleanup and bad input are in datapath_lifecycle.rs.
mod datapath_support;

use std::ffi::OsStr;

use datapath_support::*;
use redirect_tests::{Agent, agent_cli, probe, start_testproxy};

#[test]
fn every_decision_step_for_v4_v6_and_v4_mapped() {
    let w = world("steps");
    let _agent = Agent::start(&w.fx, &config(&w, "")).unwrap();
    let fx = &w.fx;
    for family in ["v4", "v6", "mapped"] {
        let h = |last| hosts(family, last);
        // What the proxy reads back: a v4-mapped connect reaches the IPv4 proxy socket as IPv4.
        let orig = |last, port| match family {
            "mapped" => format!("198.18.0.{last}:{port}"),
            _ => format!("{}:{port}", h(last)),
        };
        let ctx = |step: &str| format!("{family} {step}");
        // 6. included CIDR (`*` by default) → proxy.
        assert_proxied_to(
            probe(fx, &w.app, &format!("{}:80", h(10)), &[]).unwrap(),
            &orig(10, 80),
            &ctx("6 included cidr"),
        );
        // 1. the caller is the proxy: by cgroup, and by uid from the app's cgroup.
        assert_direct(
            probe(fx, &w.proxy, &format!("{}:80", h(10)), &[]).unwrap(),
            &ctx("1 proxy cgroup"),
        );
        assert_direct(
            probe(fx, &w.app, &format!("{}:80", h(10)), &["--uid", PROXY_UID]).unwrap(),
            &ctx("1 proxy uid"),
        );
        // 2. excluded port.
        assert_direct(
            probe(fx, &w.app, &format!("{}:5432", h(10)), &[]).unwrap(),
            &ctx("2 excluded port"),
        );
        // 3. loopback.
        assert_direct(
            probe(fx, &w.app, &format!("{}:8080", loopback(family)), &[]).unwrap(),
            &ctx("3 loopback"),
        );
        // 4. excluded CIDR, even on an included port (step 4 comes before step 5).
        assert_direct(
            probe(fx, &w.app, &format!("{}:80", h(11)), &[]).unwrap(),
            &ctx("4 excluded cidr"),
        );
        assert_direct(
            probe(fx, &w.pod2, &format!("{}:8443", h(11)), &[]).unwrap(),
            &ctx("4 excluded cidr before included port"),
        );
        // 5. included port on a destination outside the included CIDRs.
        assert_proxied_to(
            probe(fx, &w.pod2, &format!("{}:8443", h(12)), &[]).unwrap(),
            &orig(12, 8443),
            &ctx("5 included port"),
        );
        // 6. included CIDR of the restricted pod.
        assert_proxied_to(
            probe(fx, &w.pod2, &format!("{}:80", h(10)), &[]).unwrap(),
            &orig(10, 80),
            &ctx("6 included cidr (restricted)"),
        );
        // 7. neither → bypass.
        assert_direct(
            probe(fx, &w.pod2, &format!("{}:80", h(12)), &[]).unwrap(),
            &ctx("7 not included"),
        );
    }
    let counters = redirect_tests::inspect(w.fx.pin_dir()).unwrap()["counters"].clone();
    // These maps belong to this test alone, so the counts are exact: per family 3 redirects,
    // 2 proxy bypasses (cgroup, uid), and one or two of each other step.
    for (name, expected) in [
        ("redirected", 9),
        ("bypass_proxy", 6),
        ("bypass_port", 3),
        ("bypass_loopback", 3),
        ("bypass_cidr", 6),
        ("bypass_not_included", 3),
        ("disabled", 0),
        ("error", 0),
    ] {
        assert_eq!(counters[name].as_u64(), Some(expected), "counter {name}");
    }
}

#[test]
fn container_cgroup_created_after_registration_is_covered() {
    let w = world("ancestry");
    let _agent = Agent::start(&w.fx, &config(&w, "")).unwrap();
    // Created after the agent registered pod1; the agent is not told about it.
    let late = w.fx.cgroup("pod1/late-container/nested").unwrap();
    assert_proxy(
        probe(&w.fx, &late, "198.18.0.10:80", &[]).unwrap(),
        "late container",
    );
    assert_direct(
        probe(&w.fx, &late, "198.18.0.11:80", &[]).unwrap(),
        "late container, excluded",
    );
}

#[test]
fn unregistered_workload_is_untouched() {
    let w = world("unregistered");
    let _agent = Agent::start(&w.fx, &config(&w, "")).unwrap();
    let before = redirect_tests::inspect(w.fx.pin_dir()).unwrap()["counters"]["not_in_mesh"]
        .as_u64()
        .unwrap();
    let other = w.fx.cgroup("not-a-pod/app").unwrap();
    for dest in [
        "198.18.0.10:80",
        "[fd00:198:18::10]:80",
        "[::ffff:198.18.0.10]:80",
    ] {
        assert_direct(probe(&w.fx, &other, dest, &[]).unwrap(), dest);
    }
    let after = redirect_tests::inspect(w.fx.pin_dir()).unwrap()["counters"]["not_in_mesh"]
        .as_u64()
        .unwrap();
    assert!(after >= before + 3, "not_in_mesh {before} -> {after}");
}

#[test]
fn node_mode_redirects_to_the_configured_address() {
    let w = world("nodemode");
    w.fx.add_addr("198.18.1.1/32").unwrap();
    let node_proxy = w.fx.cgroup("node-proxy").unwrap();
    let _p = start_testproxy(&w.fx, &node_proxy, &["198.18.1.1:15006"]).unwrap();
    let cfg = format!(
        "proxy: {{mode: node, outboundPort: 15006, address: 198.18.1.1}}\nworkloads:\n  - {{name: app, namespace: demo, cgroup: {}}}\n",
        w.pod1.display()
    );
    let _agent = Agent::start(&w.fx, &cfg).unwrap();
    assert_proxy(
        probe(&w.fx, &w.app, "198.18.0.10:80", &[]).unwrap(),
        "node mode v4",
    );
    assert_proxy(
        probe(&w.fx, &w.app, "[::ffff:198.18.0.10]:80", &[]).unwrap(),
        "node mode mapped",
    );
}

fn explain(agent: &Agent, workload: &str, dest: &str, kernel: bool) -> serde_json::Value {
    let mut args: Vec<&OsStr> = [
        "explain",
        "--output",
        "json",
        "--workload",
        workload,
        "--dest",
        dest,
        "--config",
    ]
    .map(OsStr::new)
    .to_vec();
    args.push(agent.config_path().as_os_str());
    if kernel {
        args.extend([OsStr::new("--bpffs-dir"), agent.bpffs().as_os_str()]);
    }
    let out = agent_cli(args).unwrap_or_else(|e| panic!("explain {workload} {dest}: {e:#}"));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn explain_agrees_with_the_kernel_and_with_where_the_bytes_went() {
    let w = world("explain");
    let agent = Agent::start(&w.fx, &config(&w, "")).unwrap();
    let cases = [
        ("demo/app", &w.app, "198.18.0.10:80", "included_cidr"),
        ("demo/app", &w.app, "198.18.0.10:5432", "excluded_port"),
        ("demo/app", &w.app, "198.18.0.11:80", "excluded_cidr"),
        ("demo/app", &w.app, "127.0.0.1:8080", "loopback"),
        ("demo/app", &w.app, "[fd00:198:18::11]:80", "excluded_cidr"),
        (
            "demo/app",
            &w.app,
            "[::ffff:198.18.0.11]:80",
            "excluded_cidr",
        ),
        (
            "demo/restricted",
            &w.pod2,
            "198.18.0.12:8443",
            "included_port",
        ),
        (
            "demo/restricted",
            &w.pod2,
            "198.18.0.11:8443",
            "excluded_cidr",
        ),
        ("demo/restricted", &w.pod2, "198.18.0.12:80", "not_included"),
        (
            "demo/restricted",
            &w.pod2,
            "[fd00:198:18::10]:80",
            "included_cidr",
        ),
    ];
    for (workload, cgroup, dest, step) in cases {
        let policy = explain(&agent, workload, dest, false);
        let kernel = explain(&agent, workload, dest, true);
        assert_eq!(policy["step"], step, "{workload} {dest}: {policy}");
        assert_eq!(kernel["step"], step, "{workload} {dest}: {kernel}");
        assert_eq!(kernel["evaluated"], "kernel");
        assert_eq!(kernel["agree"], true);
        let redirected = probe(&w.fx, cgroup, dest, &[]).unwrap().is_proxy();
        assert_eq!(
            redirected,
            kernel["decision"] == "redirect",
            "{workload} {dest}: explain says {} but the bytes say otherwise",
            kernel["decision"]
        );
    }
    let excluded = explain(&agent, "demo/app", "198.18.0.11:80", false);
    assert_eq!(
        excluded["source"]["key"], "spec.traffic.outboundIPRangeExclusionList",
        "{excluded}"
    );
}
