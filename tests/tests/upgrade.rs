//! Issue #13, upgrades across map layouts: the agent is replaced the way a DaemonSet rollout
//! replaces it (stop the old one, start the new one) while a workload loops connects that must
//! be redirected, and not one connect escapes, fails or reaches the proxy with a wrong original
//! destination.
//!
//! The "new release" is `redirect-agent-layout-test`: the same agent built with the test-only
//! feature `test-policy-pad`, whose Policy record has two members swapped (`flags` before
//! `policy_id`, in the agent and in its eBPF object). Every size the kernel reports stays the
//! same, so only the pinned map's BTF tells the layouts apart; a build that adopted the other
//! layout's records would read a workload's flags as its policy id. `cargo xtask test` builds it;
//! by hand:
//! `cargo build -p redirect-agent -p redirect-tests --bin redirect-agent-layout-test --features redirect-agent/test-policy-pad`.
mod escapes_support;

use std::{path::Path, process::Command, time::Duration};

use escapes_support::{Counts, Looper, World, both, config, registered, world};
use nix::sys::signal::Signal;
use redirect_tests::{Agent, Spawned, helper_bin};

const NEW_LAYOUT: &str = "redirect-agent-layout-test";

fn assert_clean(c: Counts, what: &str) {
    eprintln!("{what}: {c:?}");
    assert_eq!(
        (c.escaped, c.failed, c.wrong_orig),
        (0, 0, 0),
        "{what}: {c:?}"
    );
    assert!(c.redirected > 0, "{what}: nothing redirected: {c:?}");
}

/// The DaemonSet rollout: SIGTERM to the old agent, wait for it to exit, start the new build.
fn roll(old: Agent, w: &World, cfg: &str, bin: &'static str) -> Agent {
    let mut old = old;
    let status = old
        .signal_and_wait(Signal::SIGTERM, Duration::from_secs(10))
        .unwrap();
    assert!(status.success(), "old agent: {status}\n{}", old.log());
    // Dropping it removes its work dir, which the new one reuses: before the start.
    drop(old);
    Agent::start_bin(&w.fx, cfg, bin, &[]).unwrap()
}

/// Names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `bpftool` JSON for a pinned map or an attached cgroup.
fn bpftool(args: &[&str], path: &Path) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .arg(path)
        .output()
        .expect("bpftool (apt-get install bpftool)");
    assert!(
        out.status.success(),
        "bpftool {args:?} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // An empty cgroup prints nothing at all.
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap()
}

fn policy_value_size(pin_dir: &Path) -> u64 {
    bpftool(&["map", "show", "pinned"], &pin_dir.join("POLICY"))["bytes_value"]
        .as_u64()
        .unwrap()
}

/// The Policy record's members in order, from the BTF the kernel keeps with the pinned map.
fn policy_members(pin_dir: &Path) -> Vec<String> {
    let dump = bpftool(&["btf", "dump", "map", "pinned"], &pin_dir.join("POLICY"));
    let value = dump["types"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "Policy"))
        .unwrap_or_else(|| panic!("no Policy type in {dump}"));
    value["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

/// Programs attached to the fixture's cgroup root (where the agent attaches).
fn attached(w: &World) -> usize {
    bpftool(&["cgroup", "show"], w.fx.cgroup_root())
        .as_array()
        .map_or(0, Vec::len)
}

fn link_pins(dir: &Path) -> usize {
    names(dir).iter().filter(|n| n.starts_with("link_")).count()
}

/// Old build → build with another Policy layout → back: each step builds the next generation
/// beside the running one, releases the old one only once the new one is ready, and loses no
/// connect.
#[test]
fn an_upgrade_across_policy_layouts_loses_no_connect() {
    let w = world("upg-layout");
    upgrade_across_layouts(&w, &config(&w), "sidecar mode");
}

/// The same in node mode, where the proxy's address is not loopback: only the connect programs'
/// stand-aside rule (`at_proxy`) keeps the second generation from rewriting the connect again,
/// which would overwrite the original destination with the proxy's own address.
#[test]
fn an_upgrade_across_policy_layouts_in_node_mode_rewrites_once() {
    let w = world("upg-node");
    let (_proxy, cfg) = node_mode(&w);
    upgrade_across_layouts(&w, &cfg, "node mode");
}

/// The node proxy's address, inside the fixture's netns.
const NODE_PROXY: &str = "198.18.0.2";

/// A node proxy (in the world's proxy cgroup, so exempt) and the world's config in node mode.
fn node_mode(w: &World) -> (Spawned, String) {
    w.fx.add_addr(&format!("{NODE_PROXY}/32")).unwrap();
    let proxy =
        w.fx.spawn_logged(
            &w.proxy,
            Command::new(helper_bin("redirect-testproxy").unwrap())
                .args(["--listen", &format!("{NODE_PROXY}:15001")]),
        )
        .unwrap();
    proxy
        .wait_for_prefix("listening ", Duration::from_secs(10))
        .unwrap();
    let cfg = config(w).replace(
        "proxy: {mode: sidecar, outboundPort: 15001, uid: 1337}",
        &format!("proxy: {{mode: node, address: {NODE_PROXY}, outboundPort: 15001, uid: 1337}}"),
    );
    assert!(cfg.contains("mode: node"), "{cfg}");
    (proxy, cfg)
}

fn upgrade_across_layouts(w: &World, cfg: &str, what: &str) {
    let base = w.fx.pin_dir().to_path_buf();
    let agent = Agent::start(&w.fx, cfg).unwrap();
    let programs = attached(w);
    assert!(programs > 0, "nothing attached");
    assert_eq!(link_pins(&base), programs);
    let old_size = policy_value_size(&base);
    let old_members = policy_members(&base);
    assert_eq!(old_members[..2], ["policy_id", "flags"], "{old_members:?}");
    let looper = Looper::start(w, &w.app);

    let agent = roll(agent, w, cfg, NEW_LAYOUT);
    agent.wait_log("upgrade complete").unwrap();
    looper.wait_redirected(20);
    let gen1 = base.join("gen1");
    // The old generation is gone: only the new directory is left, and only its links run.
    assert_eq!(
        names(&base),
        ["gen1"],
        "old pins left in {}",
        base.display()
    );
    // The layout did change, and only in what the BTF says: same size, members swapped.
    assert_eq!(policy_value_size(&gen1), old_size);
    assert_eq!(policy_members(&gen1)[..2], ["flags", "policy_id"]);
    assert_eq!(attached(w), programs, "old links still attached");
    assert_eq!(link_pins(&gen1), programs);
    assert_eq!(registered(&agent), both(w));
    // The old binary refuses to misread the new layout, and says why.
    let err = redirect_tests::inspect(&base).unwrap_err().to_string();
    assert!(
        err.contains("another layout") && err.contains("POLICY"),
        "{err}"
    );
    let v = agent.inspect().unwrap();
    assert_eq!(v["layout_generation"], 1, "{v}");
    assert_eq!(v["older_generations"], serde_json::json!([]), "{v}");
    assert_eq!(v["not_attached"], serde_json::json!([]), "{v}");

    // And back (a rollback is an upgrade too): generation 2 beside generation 1.
    let agent = roll(agent, w, cfg, "redirect-agent");
    agent.wait_log("upgrade complete").unwrap();
    looper.wait_redirected(20);
    assert_eq!(names(&base), ["gen2"]);
    assert_eq!(policy_value_size(&base.join("gen2")), old_size);
    assert_eq!(policy_members(&base.join("gen2")), old_members);
    assert_eq!(attached(w), programs);
    assert_eq!(registered(&agent), both(w));
    assert_clean(
        looper.finish(Duration::ZERO),
        &format!("upgrade across layouts, {what}"),
    );

    // cleanup removes every generation, and the directory with them.
    drop(agent);
    redirect_tests::agent_cleanup(&base).unwrap();
    assert!(!base.exists(), "{} left after cleanup", base.display());
    assert_eq!(attached(w), 0);
}

/// The same layout: the new agent adopts the pinned maps and links in place (no new generation,
/// same policy ids, same links), and no connect escapes meanwhile.
#[test]
fn a_same_layout_upgrade_adopts_in_place() {
    let w = world("upg-same");
    let base = w.fx.pin_dir().to_path_buf();
    let agent = Agent::start(&w.fx, &config(&w)).unwrap();
    let before = agent.inspect().unwrap()["workloads"].clone();
    let pins = names(&base);
    let programs = attached(&w);
    let looper = Looper::start(&w, &w.app);
    let agent = roll(agent, &w, &config(&w), "redirect-agent");
    looper.wait_redirected(20);
    assert!(
        agent
            .log()
            .contains("pinned map layout matches this build; adopting"),
        "{}",
        agent.log()
    );
    assert!(!agent.log().contains("upgrade complete"), "{}", agent.log());
    assert_eq!(names(&base), pins, "the pins changed");
    assert_eq!(attached(&w), programs);
    assert_eq!(
        agent.inspect().unwrap()["workloads"],
        before,
        "records rewritten"
    );
    assert_clean(looper.finish(Duration::ZERO), "same-layout upgrade");
}

/// An upgrade that never gets ready keeps the old generation attached (fail safe), and a kill -9
/// in the middle of it is no problem: the next start adopts the generation whose layout matches
/// and releases the half-built one. The half-built generation here is a capacity change
/// (`--max-rule-entries 1`, too small for the workloads' entries, so the new agent never gets
/// ready, yet registers both workloads with redirect-all records). Node mode, so that the long
/// overlap of two generations that both redirect also proves the stand-aside rule: a second
/// rewrite would record the proxy's own address as the original destination.
#[test]
fn a_killed_upgrade_keeps_the_old_generation_and_the_restart_releases_the_new_one() {
    let w = world("upg-kill");
    let (_proxy, cfg) = node_mode(&w);
    let base = w.fx.pin_dir().to_path_buf();
    let agent = Agent::start(&w.fx, &cfg).unwrap();
    let programs = attached(&w);
    let pins = names(&base);
    let looper = Looper::start(&w, &w.app);

    let mut agent = agent;
    agent
        .signal_and_wait(Signal::SIGTERM, Duration::from_secs(10))
        .unwrap();
    drop(agent);
    let mut stuck = Agent::start_with(&w.fx, &cfg, &["--max-rule-entries", "1"]).unwrap();
    stuck
        .wait_log("older layout generations stay attached until this one is ready")
        .unwrap();
    // Both generations run side by side, and both have a redirecting record for the workload.
    assert_eq!(registered(&stuck), both(&w), "{}", stuck.log());
    looper.wait_redirected(50);
    assert!(base.join("gen1").is_dir());
    assert_eq!(attached(&w), 2 * programs, "{}", stuck.log());
    assert!(!stuck.log().contains("upgrade complete"), "{}", stuck.log());
    stuck.kill9().unwrap();
    drop(stuck);

    let agent = Agent::start(&w.fx, &cfg).unwrap();
    agent.wait_log("upgrade complete").unwrap();
    looper.wait_redirected(20);
    assert_eq!(names(&base), pins, "gen1 left behind");
    assert_eq!(attached(&w), programs);
    assert_eq!(registered(&agent), both(&w));
    assert_clean(looper.finish(Duration::ZERO), "killed upgrade");
}
