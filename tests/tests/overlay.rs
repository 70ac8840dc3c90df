//! Overlays over a shared base in the real kernel, with the real agent (issue #13): workloads
//! whose policy is the mesh default plus a little of their own get an overlay under their own
//! id, layered over the mesh default's shared entries (`Policy::base_id`). Each test asserts
//! where the bytes went, and the base change counts escapes.
use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
};

use redirect_tests::{
    Agent, Fixture, IdentityServer, Reached, Spawned, agent_cli,
    connect_loop::{self, wait_proxied},
    probe, serve_identity, start_testproxy,
};

/// Every destination the tests probe, each served by an identity server on the netns's lo.
const MUST_REDIRECT: &str = "198.18.0.10:80";
/// In the mesh exclusion list: every workload bypasses it (pod2 and pod3 through the base).
const MESH_EXCLUDED: &str = "198.18.1.1:80";
/// pod2's own extra exclusion (198.18.5.0/24): an overlay entry.
const POD2_EXCLUDED: &str = "198.18.5.1:80";
/// Outside pod3's included 198.18.0.0/16 but inside the mesh default's `*`: an overlay STOP.
const POD3_NOT_INCLUDED: &str = "198.19.0.7:80";

struct World {
    fx: Fixture,
    /// pod1 (the mesh default, proxy in pod1/proxy), pod2 (an extra exclusion), pod3 (a narrower
    /// inclusion).
    pods: [PathBuf; 3],
    proxy: PathBuf,
    /// 198.18.0.10:80: every connect that reaches it escaped the proxy.
    must_redirect: IdentityServer,
    _servers: Vec<IdentityServer>,
    _proxy: Spawned,
}

fn world(name: &str) -> World {
    let fx = Fixture::new(name).unwrap();
    let mut servers = Vec::new();
    for dest in [
        MESH_EXCLUDED,
        POD2_EXCLUDED,
        POD3_NOT_INCLUDED,
        MUST_REDIRECT,
    ] {
        let addr: std::net::SocketAddr = dest.parse().unwrap();
        fx.add_addr(&format!("{}/32", addr.ip())).unwrap();
        servers.push(serve_identity(&fx, addr, "direct").unwrap());
    }
    let must_redirect = servers.pop().unwrap();
    let pods = ["pod1", "pod2", "pod3"].map(|p| fx.cgroup(p).unwrap());
    let proxy = fx.cgroup("pod1/proxy").unwrap();
    let proxy_proc = start_testproxy(&fx, &proxy, &["127.0.0.1:15001"]).unwrap();
    World {
        fx,
        pods,
        proxy,
        must_redirect,
        _servers: servers,
        _proxy: proxy_proc,
    }
}

/// The mesh list: 100 separate /32s (enough for the agent to layer, none adjacent so none
/// merge) in 198.18.1.0/24 and 198.18.2.0/24, plus `extra` more in 198.18.3.0/24 (a mesh-wide
/// edit: the base changes).
fn mesh_list(extra: u8) -> Vec<String> {
    let base = (0..100u32).map(|i| format!("198.18.{}.{}/32", 1 + i / 64, 1 + 4 * (i % 64)));
    let more = (0..extra).map(|i| format!("198.18.3.{}/32", 1 + 4 * u32::from(i)));
    base.chain(more).collect()
}

fn config(w: &World, extra: u8) -> String {
    format!(
        r#"
mesh:
  outboundIPRangeExclusionList: {list:?}
proxy: {{mode: sidecar, outboundPort: 15001, uid: 1337}}
workloads:
  - name: pod1
    namespace: demo
    cgroup: {pod1}
    proxyCgroup: {proxy}
  - name: pod2
    namespace: demo
    cgroup: {pod2}
    annotations:
      flomesh.io/outbound-ip-range-exclusion-list: "198.18.5.0/24"
  - name: pod3
    namespace: demo
    cgroup: {pod3}
    annotations:
      traffic.sidecar.istio.io/includeOutboundIPRanges: "198.18.0.0/16"
"#,
        list = mesh_list(extra),
        pod1 = w.pods[0].display(),
        proxy = w.proxy.display(),
        pod2 = w.pods[1].display(),
        pod3 = w.pods[2].display(),
    )
}

/// (policy id, base id) of each pod, from `inspect`.
fn records(w: &World, agent: &Agent) -> Vec<(u64, u64)> {
    let inspect = agent.inspect().unwrap();
    w.pods
        .iter()
        .map(|pod| {
            // A cgroup's id is its directory's inode number.
            let id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(pod).unwrap());
            let r = inspect["workloads"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["cgroup_id"].as_u64() == Some(id))
                .unwrap_or_else(|| panic!("{} not registered: {inspect}", pod.display()));
            (
                r["policy_id"].as_u64().unwrap(),
                r["base_id"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn explain(agent: &Agent, workload: &str, dest: &str) -> serde_json::Value {
    let mut args: Vec<&OsStr> = ["explain", "--output", "json", "--workload", workload]
        .map(OsStr::new)
        .to_vec();
    args.extend([
        OsStr::new("--dest"),
        OsStr::new(dest),
        OsStr::new("--config"),
    ]);
    args.push(agent.config_path().as_os_str());
    args.extend([OsStr::new("--bpffs-dir"), agent.bpffs().as_os_str()]);
    let out = agent_cli(args).unwrap_or_else(|e| panic!("explain {workload} {dest}: {e:#}"));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn overlays_and_their_base_decide_every_destination_as_the_policy_says() {
    let w = world("overlay-decide");
    let agent = Agent::start(&w.fx, &config(&w, 0)).unwrap();
    let ids = records(&w, &agent);
    let base = ids[0].0;
    assert_eq!(ids[0].1, 0, "the mesh default is not layered: {ids:?}");
    assert_eq!(ids[1].1, base, "pod2 overlays the mesh default: {ids:?}");
    assert_eq!(ids[2].1, base, "pod3 overlays the mesh default: {ids:?}");
    assert!(ids[1].0 != base && ids[2].0 != base, "{ids:?}");
    // (pod, workload, destination, redirected?, step)
    let cases = [
        (0, "demo/pod1", MUST_REDIRECT, true, "included_cidr"),
        (0, "demo/pod1", MESH_EXCLUDED, false, "excluded_cidr"),
        (0, "demo/pod1", POD2_EXCLUDED, true, "included_cidr"),
        (0, "demo/pod1", POD3_NOT_INCLUDED, true, "included_cidr"),
        // pod2: the base answers where its overlay is silent.
        (1, "demo/pod2", MUST_REDIRECT, true, "included_cidr"),
        (1, "demo/pod2", MESH_EXCLUDED, false, "excluded_cidr"),
        (1, "demo/pod2", POD2_EXCLUDED, false, "excluded_cidr"),
        (1, "demo/pod2", POD3_NOT_INCLUDED, true, "included_cidr"),
        // pod3: a STOP entry keeps the base's `*` from including 198.19.0.7.
        (2, "demo/pod3", MUST_REDIRECT, true, "included_cidr"),
        (2, "demo/pod3", MESH_EXCLUDED, false, "excluded_cidr"),
        (2, "demo/pod3", POD2_EXCLUDED, true, "included_cidr"),
        (2, "demo/pod3", POD3_NOT_INCLUDED, false, "not_included"),
    ];
    for (pod, workload, dest, redirected, step) in cases {
        let reached = probe(&w.fx, &w.pods[pod], dest, &[]).unwrap();
        match (&reached, redirected) {
            (Reached::Proxy { orig }, true) => assert_eq!(orig, dest, "{workload} {dest}"),
            (Reached::Server(_), false) => {}
            _ => panic!("{workload} {dest}: expected redirected={redirected}, got {reached:?}"),
        }
        let kernel = explain(&agent, workload, dest);
        assert_eq!(kernel["evaluated"], "kernel", "{kernel}");
        assert_eq!(kernel["step"], step, "{workload} {dest}: {kernel}");
        assert_eq!(kernel["agree"], true, "{workload} {dest}: {kernel}");
    }
}

/// Loops connects to 198.18.0.10:80 from `cgroup` until dropped; each reply is one line.
fn looping_client(fx: &Fixture, cgroup: &Path) -> Spawned {
    connect_loop::looping_client(fx, cgroup, MUST_REDIRECT).unwrap()
}

/// A mesh-wide edit moves the base: the new base is written before any record names it, and
/// the old one stays until the grace after the last record stopped naming it. Clients in both
/// overlay workloads loop connects that must be redirected throughout: none may escape.
#[test]
fn a_base_change_under_load_lets_no_connect_escape() {
    let w = world("overlay-base-move");
    let mut agent = Agent::start(&w.fx, &config(&w, 0)).unwrap();
    let clients = [
        looping_client(&w.fx, &w.pods[1]),
        looping_client(&w.fx, &w.pods[2]),
    ];
    for c in &clients {
        wait_proxied(c, 5);
    }
    let mut bases = vec![records(&w, &agent)[1].1];
    for extra in 1..=10u8 {
        agent.reconfigure(&config(&w, extra)).unwrap();
        for c in &clients {
            wait_proxied(c, 3);
        }
        let ids = records(&w, &agent);
        assert_eq!(
            ids[1].1, ids[0].0,
            "pod2 overlays the new mesh default: {ids:?}"
        );
        assert_eq!(
            ids[2].1, ids[0].0,
            "pod3 overlays the new mesh default: {ids:?}"
        );
        bases.push(ids[0].0);
    }
    bases.dedup();
    assert_eq!(bases.len(), 11, "every edit moved the base: {bases:?}");
    assert_eq!(
        w.must_redirect.connections(),
        0,
        "connects escaped the proxy to {MUST_REDIRECT} while the base moved"
    );
    // The edit really changed the decision: the newest mesh CIDR is excluded through the base.
    let newest = format!(
        "{}:80",
        mesh_list(10).last().unwrap().trim_end_matches("/32")
    );
    let kernel = explain(&agent, "demo/pod2", &newest);
    assert_eq!(kernel["step"], "excluded_cidr", "{kernel}");
}
