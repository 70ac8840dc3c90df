//! The datapath across the agent's life, in the real kernel with the real agent binary: a live
//! config change under a running workload, kill -9 and adopt, cleanup, and bad input or a policy
//! that does not fit (the last good state stays). Each test asserts where the bytes went.
mod datapath_support;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
};

use datapath_support::*;
use redirect_tests::{Agent, agent_cleanup, probe};

/// A shell that stays alive in the app cgroup and runs the client on request: the workload is
/// never restarted while its policy changes.
struct LongLivedWorkload {
    child: std::process::Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl LongLivedWorkload {
    fn start(w: &World) -> Self {
        let mut child = redirect_tests::spawn_client_shell(
            &w.fx,
            &w.app,
            "while read dest; do \"$CLIENT\" connect \"$dest\" --json --timeout-ms 3000; done",
            Stdio::piped(),
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
    // Refused while the agent runs: it names the agent and removes nothing.
    redirect_tests::assert_cleanup_refused(w.fx.pin_dir(), agent.pid().unwrap()).unwrap();
    assert_proxy(
        probe(&w.fx, &w.app, "198.18.0.10:80", &[]).unwrap(),
        "after a refused cleanup",
    );
    agent.kill9().unwrap();
    assert_proxy(
        probe(&w.fx, &w.app, "198.18.0.10:80", &[]).unwrap(),
        "before cleanup",
    );
    agent_cleanup(w.fx.pin_dir()).unwrap();
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
