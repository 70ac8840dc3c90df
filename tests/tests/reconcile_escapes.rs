//! Reconcile rules under load, in the real kernel with the real agent: a client in the workload
//! loops connects to 198.18.0.10:80, which must be redirected, while the change happens, and the
//! test counts the connects that reached that destination directly (escaped). Each asserts 0.
use std::path::{Path, PathBuf};

use redirect_tests::{
    Agent, Fixture, IdentityServer, Spawned,
    connect_loop::{self, wait_proxied},
    serve_identity, start_testproxy,
};

struct World {
    fx: Fixture,
    pods: Vec<PathBuf>,
    /// pods[0]/proxy, where the tag-mode proxy runs.
    proxy: PathBuf,
    /// 198.18.0.10:80: every connect that reaches it escaped the proxy.
    dest: IdentityServer,
    _proxy: Spawned,
}

fn world(name: &str, pods: usize) -> World {
    let fx = Fixture::new(name).unwrap();
    fx.add_addr("198.18.0.10/32").unwrap();
    let dest = serve_identity(&fx, "198.18.0.10:80".parse().unwrap(), "direct").unwrap();
    let pods: Vec<PathBuf> = (1..=pods)
        .map(|i| {
            let p = fx.cgroup(&format!("pod{i}")).unwrap();
            fx.cgroup(&format!("pod{i}/app")).unwrap();
            p
        })
        .collect();
    let proxy = fx.cgroup("pod1/proxy").unwrap();
    let proxy_proc = start_testproxy(&fx, &proxy, &["127.0.0.1:15001"]).unwrap();
    World {
        fx,
        pods,
        proxy,
        dest,
        _proxy: proxy_proc,
    }
}

/// `mesh_excludes`: /32s for the mesh exclusion list; `workloads`: (cgroup, proxy cgroup,
/// annotations as YAML flow-map content).
fn config(mesh_excludes: &[String], workloads: &[(&Path, Option<&Path>, String)]) -> String {
    let mut out = format!(
        "mesh:\n  outboundIPRangeExclusionList: {mesh_excludes:?}\nproxy: {{mode: sidecar, outboundPort: 15001, uid: 1337}}\nworkloads:\n"
    );
    for (i, (cgroup, proxy, annotations)) in workloads.iter().enumerate() {
        out.push_str(&format!(
            "  - name: w{i}\n    namespace: demo\n    cgroup: {}\n",
            cgroup.display()
        ));
        if let Some(p) = proxy {
            out.push_str(&format!("    proxyCgroup: {}\n", p.display()));
        }
        out.push_str(&format!("    annotations: {{{annotations}}}\n"));
    }
    out
}

/// `n` separate /32s (none adjacent, so none merge) in 198.18.`third`.0/24, away from .10.
fn cidrs(third: u8, n: u8) -> Vec<String> {
    (0..n)
        .map(|i| format!("198.18.{third}.{}/32", 4 * i + 1))
        .collect()
}

fn excludes(list: &[String]) -> String {
    format!(
        r#"traffic.sidecar.istio.io/excludeOutboundIPRanges: "{}""#,
        list.join(",")
    )
}

/// Loops connects to 198.18.0.10:80 from `cgroup` until dropped; each reply is one line.
fn looping_client(fx: &Fixture, cgroup: &Path) -> Spawned {
    connect_loop::looping_client(fx, cgroup, "198.18.0.10:80").unwrap()
}

fn assert_no_escapes(w: &World, what: &str) {
    assert_eq!(
        w.dest.connections(),
        0,
        "{what}: connects escaped the proxy to 198.18.0.10:80"
    );
}

/// Issue #12 item 2: a `proxyCgroup` that does not exist (yet) keeps the last good policy.
#[test]
fn a_pending_proxy_cgroup_keeps_the_last_good_policy() {
    let w = world("rc-pending-proxy", 1);
    let good = config(&[], &[(&w.pods[0], Some(&w.proxy), String::new())]);
    let mut agent = Agent::start(&w.fx, &good).unwrap();
    let client = looping_client(&w.fx, &w.pods[0].join("app"));
    wait_proxied(&client, 5);
    let missing = w.pods[0].join("proxy-not-yet");
    agent
        .reconfigure(&config(&[], &[(&w.pods[0], Some(&missing), String::new())]))
        .unwrap();
    wait_proxied(&client, 100);
    assert_no_escapes(&w, "proxy cgroup pending");
}

/// Issue #12 item 12 and make before break: repeated edits under load. The old entries stay
/// until the grace period after the swap, so no connect sees a half-deleted rule set.
#[test]
fn edits_under_load_never_let_a_connect_escape() {
    let w = world("rc-edits", 1);
    let mut agent = Agent::start(
        &w.fx,
        &config(&[], &[(&w.pods[0], Some(&w.proxy), String::new())]),
    )
    .unwrap();
    let client = looping_client(&w.fx, &w.pods[0].join("app"));
    wait_proxied(&client, 5);
    for i in 0..20u8 {
        let list = cidrs(1 + i, 8);
        agent
            .reconfigure(&config(
                &[],
                &[(&w.pods[0], Some(&w.proxy), excludes(&list))],
            ))
            .unwrap();
        wait_proxied(&client, 3);
    }
    assert_no_escapes(&w, "policy edits");
}

/// Issue #13's dirty set under load: pod1's spec never changes while its neighbour pod2 is edited
/// again and again, so every pass reuses pod1's last result (reconcile/slots.rs) and recomputes
/// pod2's. Both loop connects that must be redirected: a reused result that lost its record or
/// its entries, or an edit that left pod2 without one, would let them escape.
#[test]
fn a_neighbours_edits_leave_a_reused_workload_intercepted() {
    let w = world("rc-neighbour", 2);
    let cfg = |annotations: String| {
        config(
            &[],
            &[
                (&w.pods[0], Some(&w.proxy), String::new()),
                (&w.pods[1], None, annotations),
            ],
        )
    };
    let mut agent = Agent::start(&w.fx, &cfg(String::new())).unwrap();
    let steady = looping_client(&w.fx, &w.pods[0].join("app"));
    let edited = looping_client(&w.fx, &w.pods[1].join("app"));
    wait_proxied(&steady, 5);
    wait_proxied(&edited, 5);
    for i in 0..20u8 {
        agent.reconfigure(&cfg(excludes(&cidrs(1 + i, 8)))).unwrap();
        wait_proxied(&steady, 3);
        wait_proxied(&edited, 3);
    }
    assert_no_escapes(&w, "a neighbour's edits");
}

/// Issue #12 item 13: a new workload whose entries do not fit gets the mesh default.
#[test]
fn a_new_workload_that_does_not_fit_runs_the_mesh_default() {
    let w = world("rc-new-nofit", 1);
    // 8 entries per trie; the workload asks for 13.
    let agent = Agent::start_with(
        &w.fx,
        &config(
            &[],
            &[(&w.pods[0], Some(&w.proxy), excludes(&cidrs(2, 12)))],
        ),
        &["--max-rule-entries", "8"],
    )
    .unwrap();
    let line = agent.wait_log("applying policy failed").unwrap();
    assert!(line.contains("using the mesh default policy"), "{line}");
    assert!(line.contains("--max-rule-entries"), "{line}");
    let client = looping_client(&w.fx, &w.pods[0].join("app"));
    wait_proxied(&client, 50);
    assert_no_escapes(&w, "new workload that does not fit");
}

/// Issue #12 item 13: when the mesh default does not fit either, a record that redirects
/// everything.
#[test]
fn a_new_workload_redirects_everything_when_not_even_the_mesh_default_fits() {
    let w = world("rc-new-redirect-all", 1);
    let agent = Agent::start_with(
        &w.fx,
        &config(
            &cidrs(3, 12),
            &[(&w.pods[0], Some(&w.proxy), excludes(&cidrs(2, 12)))],
        ),
        &["--max-rule-entries", "8"],
    )
    .unwrap();
    let line = agent.wait_log("applying policy failed").unwrap();
    assert!(line.contains("redirecting every destination"), "{line}");
    let client = looping_client(&w.fx, &w.pods[0].join("app"));
    wait_proxied(&client, 50);
    assert_no_escapes(&w, "nothing fits");
}

/// Issue #13: identical policies share one id and one set of entries, so five workloads fit
/// where one copy each would not (8 entries per trie, 4 per copy).
#[test]
fn identical_policies_share_entries_and_all_are_redirected() {
    let w = world("rc-shared", 5);
    let list = excludes(&cidrs(4, 3));
    let workloads: Vec<(&Path, Option<&Path>, String)> = w
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let proxy = (i == 0).then_some(w.proxy.as_path());
            (p.as_path(), proxy, list.clone())
        })
        .collect();
    let agent = Agent::start_with(
        &w.fx,
        &config(&[], &workloads),
        &["--max-rule-entries", "8"],
    )
    .unwrap();
    let inspect = agent.inspect().unwrap();
    let ids: Vec<u64> = inspect["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["policy_id"].as_u64())
        .collect();
    assert_eq!(ids.len(), 5, "{inspect}");
    assert!(ids.iter().all(|i| *i == ids[0]), "{inspect}");
    let clients: Vec<Spawned> = w
        .pods
        .iter()
        .map(|p| looping_client(&w.fx, &p.join("app")))
        .collect();
    for c in &clients {
        wait_proxied(c, 20);
    }
    assert_no_escapes(&w, "shared policies");
}
