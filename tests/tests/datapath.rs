//! The connect-time datapath in the real kernel, driven by the real agent binary: every decision
//! step for IPv4, IPv6 and v4-mapped IPv6, ancestry, live changes, kill -9, cleanup, unregistered
//! workloads and bad input. Each test asserts where the bytes went.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use redirect_tests::{
    Agent, Fixture, IdentityServer, Reached, Spawned, helper_bin, probe, serve_identity,
};

const PROXY_UID: &str = "1337";

/// A fixture with destinations, a loopback server and a tag-mode proxy in pod1/proxy.
struct World {
    fx: Fixture,
    pod1: PathBuf,
    app: PathBuf,
    proxy: PathBuf,
    pod2: PathBuf,
    _servers: Vec<IdentityServer>,
    _proxy: Spawned,
}

fn world(name: &str) -> World {
    let fx = Fixture::new(name).unwrap();
    for a in [
        "198.18.0.10/32",
        "198.18.0.11/32",
        "198.18.0.12/32",
        "fd00:198:18::10/128",
        "fd00:198:18::11/128",
        "fd00:198:18::12/128",
    ] {
        fx.add_addr(a).unwrap();
    }
    let mut servers = Vec::new();
    for host in ["198.18.0.10", "198.18.0.11", "198.18.0.12", "127.0.0.1"] {
        for port in [80, 5432, 8443, 8080] {
            let addr = format!("{host}:{port}");
            servers.push(serve_identity(&fx, addr.parse().unwrap(), &addr).unwrap());
        }
    }
    for host in [
        "fd00:198:18::10",
        "fd00:198:18::11",
        "fd00:198:18::12",
        "::1",
    ] {
        for port in [80, 5432, 8443, 8080] {
            let addr = format!("[{host}]:{port}");
            servers.push(serve_identity(&fx, addr.parse().unwrap(), &addr).unwrap());
        }
    }
    let pod1 = fx.cgroup("pod1").unwrap();
    let app = fx.cgroup("pod1/app").unwrap();
    let proxy = fx.cgroup("pod1/proxy").unwrap();
    let pod2 = fx.cgroup("pod2").unwrap();
    let proxy_proc = fx
        .spawn_logged(
            &proxy,
            Command::new(helper_bin("redirect-testproxy").unwrap()).args([
                "--listen",
                "127.0.0.1:15001",
                "--listen",
                "[::1]:15001",
            ]),
        )
        .unwrap();
    proxy_proc
        .wait_for_prefix("listening ", Duration::from_secs(10))
        .unwrap();
    World {
        fx,
        pod1,
        app,
        proxy,
        pod2,
        _servers: servers,
        _proxy: proxy_proc,
    }
}

/// Mesh: ports 5432 and the .11 hosts excluded. pod1: everything included (the Istio default),
/// proxy exempt by cgroup and uid. pod2: only .10 hosts and port 8443 included.
fn config(w: &World, pod1_annotations: &str) -> String {
    format!(
        r#"
mesh:
  outboundPortExclusionList: [5432]
  outboundIPRangeExclusionList: ["198.18.0.11/32", "fd00:198:18::11/128"]
proxy: {{mode: sidecar, outboundPort: 15001, uid: {PROXY_UID}}}
workloads:
  - name: app
    namespace: demo
    cgroup: {pod1}
    proxyCgroup: {proxy}
    annotations: {{{pod1_annotations}}}
  - name: restricted
    namespace: demo
    cgroup: {pod2}
    annotations:
      traffic.sidecar.istio.io/includeOutboundIPRanges: "198.18.0.10/32,fd00:198:18::10/128"
      traffic.sidecar.istio.io/includeOutboundPorts: "8443"
"#,
        pod1 = w.pod1.display(),
        proxy = w.proxy.display(),
        pod2 = w.pod2.display(),
    )
}

/// The three ways to write one IPv4-ish host for each family under test.
fn hosts(family: &str, last: u8) -> String {
    match family {
        "v4" => format!("198.18.0.{last}"),
        "v6" => format!("[fd00:198:18::{last}]"),
        "mapped" => format!("[::ffff:198.18.0.{last}]"),
        _ => unreachable!(),
    }
}

fn loopback(family: &str) -> &'static str {
    match family {
        "v4" => "127.0.0.1",
        "v6" => "[::1]",
        _ => "[::ffff:127.0.0.1]",
    }
}

fn assert_proxy(r: Reached, what: &str) {
    assert!(r.is_proxy(), "{what}: expected the proxy, got {r:?}");
}

/// The proxy got it and read `orig` back with SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST.
fn assert_proxied_to(r: Reached, orig: &str, what: &str) {
    assert_eq!(
        r,
        Reached::Proxy {
            orig: orig.to_string()
        },
        "{what}"
    );
}

fn assert_direct(r: Reached, what: &str) {
    assert!(
        matches!(r, Reached::Server(_)),
        "{what}: expected the destination itself, got {r:?}"
    );
}

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

/// A shell that stays alive in the app cgroup and runs the client on request: the workload is
/// never restarted while its policy changes.
struct LongLivedWorkload {
    child: std::process::Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl LongLivedWorkload {
    fn start(w: &World) -> Self {
        let client = helper_bin("redirect-testclient").unwrap();
        let script = format!(
            "while read dest; do {} connect \"$dest\" --json --timeout-ms 3000; done",
            client.display()
        );
        let mut child =
            w.fx.spawn_in(
                &w.app,
                Command::new("sh")
                    .args(["-c", &script])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped()),
            )
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self { child, stdout }
    }

    fn connect(&mut self, dest: &str) -> String {
        writeln!(self.child.stdin.as_mut().unwrap(), "{dest}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["reply"].as_str().unwrap_or("").to_string()
    }
}

impl Drop for LongLivedWorkload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn live_config_change_applies_without_restarting_the_workload() {
    let w = world("live");
    let mut agent = Agent::start(&w.fx, &config(&w, "")).unwrap();
    let mut shell = LongLivedWorkload::start(&w);
    let pid = shell.child.id();
    assert!(shell.connect("198.18.0.12:80").starts_with("proxy"));
    agent
        .reconfigure(&config(
            &w,
            r#"traffic.sidecar.istio.io/excludeOutboundIPRanges: "198.18.0.12/32""#,
        ))
        .unwrap();
    assert_eq!(shell.connect("198.18.0.12:80").trim(), "198.18.0.12:80");
    // The pod annotation overrides the mesh list field by field: .11 is no longer excluded.
    assert!(shell.connect("198.18.0.11:80").starts_with("proxy"));
    assert_eq!(shell.child.id(), pid);
    assert!(shell.child.try_wait().unwrap().is_none(), "workload exited");
}

#[test]
fn kill_9_keeps_interception_and_restart_adopts_without_flush() {
    let w = world("kill9");
    let mut agent = Agent::start(&w.fx, &config(&w, "")).unwrap();
    let before = agent.inspect().unwrap();
    agent.kill9().unwrap();
    // The agent is gone; the pinned links and maps keep deciding.
    assert_proxy(
        probe(&w.fx, &w.app, "198.18.0.10:80", &[]).unwrap(),
        "while down",
    );
    assert_direct(
        probe(&w.fx, &w.app, "198.18.0.11:80", &[]).unwrap(),
        "while down, excluded",
    );
    agent.restart().unwrap();
    let after = agent.inspect().unwrap();
    // Same records and policy ids: the restarted agent adopted the state, it did not rewrite it.
    assert_eq!(before["workloads"], after["workloads"]);
    assert!(
        agent.log().contains("adopted pinned link"),
        "{}",
        agent.log()
    );
    assert_proxy(
        probe(&w.fx, &w.app, "198.18.0.10:80", &[]).unwrap(),
        "after restart",
    );
}

#[test]
fn cleanup_detaches_and_unpins_everything() {
    let w = world("cleanup");
    let mut agent = Agent::start(&w.fx, &config(&w, "")).unwrap();
    agent.kill9().unwrap();
    assert_proxy(
        probe(&w.fx, &w.app, "198.18.0.10:80", &[]).unwrap(),
        "before cleanup",
    );
    let out = Command::new(helper_bin("redirect-agent").unwrap())
        .args(["cleanup", "--bpffs-dir"])
        .arg(w.fx.pin_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!w.fx.pin_dir().exists(), "pin dir still there");
    let attached = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(w.fx.cgroup_root())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&attached.stdout);
    assert!(
        !listing.contains("connect"),
        "programs still attached:\n{listing}"
    );
    assert_direct(
        probe(&w.fx, &w.app, "198.18.0.10:80", &[]).unwrap(),
        "after cleanup",
    );
    // inspect now explains that nothing is pinned, and fails.
    let err = redirect_tests::inspect(w.fx.pin_dir()).unwrap_err();
    assert!(err.to_string().contains("nothing is pinned"), "{err}");
}

#[test]
fn malformed_config_or_bad_annotation_changes_nothing_applied() {
    let w = world("malformed");
    let mut agent = Agent::start(&w.fx, &config(&w, "")).unwrap();
    let applied = agent.inspect().unwrap()["workloads"].clone();

    agent.write_config("workloads: [ {name: broken").unwrap();
    agent.wait_log("keeping the applied state").unwrap();
    assert_proxy(
        probe(&w.fx, &w.app, "198.18.0.10:80", &[]).unwrap(),
        "after bad YAML",
    );

    agent
        .reconfigure(&config(
            &w,
            r#"traffic.sidecar.istio.io/excludeOutboundPorts: "80,70000""#,
        ))
        .unwrap();
    let line = agent.wait_log("policy rejected").unwrap();
    for needle in ["demo/app", "excludeOutboundPorts", "70000"] {
        assert!(line.contains(needle), "error should name {needle}: {line}");
    }
    // The last good policy stays: port 80 is still redirected, nothing was rewritten.
    assert_proxy(
        probe(&w.fx, &w.app, "198.18.0.10:80", &[]).unwrap(),
        "after bad annotation",
    );
    assert_eq!(agent.inspect().unwrap()["workloads"], applied);
}

#[test]
fn node_mode_redirects_to_the_configured_address() {
    let w = world("nodemode");
    w.fx.add_addr("198.18.1.1/32").unwrap();
    let node_proxy = w.fx.cgroup("node-proxy").unwrap();
    let p =
        w.fx.spawn_logged(
            &node_proxy,
            Command::new(helper_bin("redirect-testproxy").unwrap())
                .args(["--listen", "198.18.1.1:15006"]),
        )
        .unwrap();
    p.wait_for_prefix("listening ", Duration::from_secs(10))
        .unwrap();
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
    let mut cmd = Command::new(helper_bin("redirect-agent").unwrap());
    cmd.args([
        "explain",
        "--output",
        "json",
        "--workload",
        workload,
        "--dest",
        dest,
    ])
    .arg("--config")
    .arg(agent.config_path());
    if kernel {
        cmd.arg("--bpffs-dir").arg(agent.bpffs());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "explain {workload} {dest}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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

#[test]
fn a_policy_that_does_not_fit_keeps_the_last_good_one_and_names_the_workload() {
    let w = world("mapfull");
    // Room for 8 entries per trie: pod1 and pod2 start with 3 v4 entries each.
    let mut agent =
        Agent::start_with(&w.fx, &config(&w, ""), &["--max-rule-entries", "8"]).unwrap();
    let applied = agent.inspect().unwrap()["workloads"].clone();
    let v4_entries = || {
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(w.fx.pin_dir().join("CIDR_V4"))
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    let before = v4_entries();
    // 12 separate /32 exclusions (none adjacent, so none merge) cannot fit.
    let many: Vec<String> = (0..12)
        .map(|i| format!("198.18.{}.{}/32", 2 + i, 4 * i + 1))
        .collect();
    agent
        .reconfigure(&config(
            &w,
            &format!(
                r#"traffic.sidecar.istio.io/excludeOutboundIPRanges: "{}""#,
                many.join(",")
            ),
        ))
        .unwrap();
    let line = agent.wait_log("applying policy failed").unwrap();
    assert!(
        line.contains("demo/app"),
        "error should name the workload: {line}"
    );
    // Whole or nothing: the old entries and record are untouched, and no half-written entry
    // of the new policy is left behind.
    assert_eq!(agent.inspect().unwrap()["workloads"], applied);
    assert_eq!(
        v4_entries(),
        before,
        "entries of the rejected policy were left behind"
    );
    assert_direct(
        probe(&w.fx, &w.app, "198.18.0.11:80", &[]).unwrap(),
        "old exclusion still applies",
    );
    assert_proxy(
        probe(&w.fx, &w.app, "198.18.0.10:80", &[]).unwrap(),
        "old inclusion still applies",
    );
}
