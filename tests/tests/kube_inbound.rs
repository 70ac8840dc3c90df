//! Inbound interception from the Kubernetes source, in the real kernel: the agent's kube source on
//! the fake API (real Pod JSON), a kubepods cgroup (cgroupfs driver, containerd naming) whose
//! sandbox process lives in the pod's own netns, joined to a "client node" netns by a veth pair
//! (tests/tests/inbound_support). The pod's netns is found from that process the moment it
//! starts (inotify on cgroup.events), an annotation flips a port live, killing the sandbox
//! process re-resolves the netns from the next one, and deleting the pod releases its link.
mod inbound_support;
mod kube_support;

use std::time::Duration;

use inbound_support::{
    POD4, POD6, World,
    kube::{link_pin, running, sleeper},
    start_proxy, world,
};
use kube_support::{
    Agent, Driver, NODE, Res, fake_api::wait_for, inbound_options, pod, pod_cgroup_rel, poll_until,
    put_defaults, uid,
};
use serde_json::{Value, json};

const SANDBOX: &str = "5a4d0b1c2e3f40516273849506a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f";
const PROXY: &str = "7f6e5d4c3b2a190817263544536271809f8e7d6c5b4a39281706f5e4d3c2b1a0";
const EXCLUDE: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

fn expect_who(w: &World, addr: &str, want: &str) {
    let got = wait_for(Duration::from_secs(10), || {
        let r = w.who(addr);
        (r.starts_with(want)).then_some(r)
    });
    assert!(
        got.is_some(),
        "{addr}: expected {want}, got {}",
        w.who(addr)
    );
}

#[test]
fn a_pods_netns_is_found_from_its_sandbox_and_its_inbound_follows_the_pod() {
    let w = world("kube");
    let _apps = w.apps(&[8080, 8081, 7001, 7002, 7005]);
    let u = uid(41);
    let rel = pod_cgroup_rel(Driver::Cgroupfs, "besteffort", &u);
    let _pod_cg = w.fx.cgroup(&rel).unwrap();
    let sandbox_cg = w.fx.cgroup(&format!("{rel}/{SANDBOX}")).unwrap();
    let proxy_cg = w.fx.cgroup(&format!("{rel}/{PROXY}")).unwrap();
    // A hostNetwork pod whose process sits in another netns (the node's): never linked.
    let hn = uid(42);
    let hn_rel = pod_cgroup_rel(Driver::Cgroupfs, "besteffort", &hn);
    let hn_cg = w.fx.cgroup(&hn_rel).unwrap();
    let mut hn_pod = pod("demo", "hostnet", &hn, NODE, json!({}));
    hn_pod["spec"]["hostNetwork"] = true.into();
    let mut hn_proc = sleeper(&hn_cg, w.node.netns_file());

    let mk = |ann: Value| running(pod("demo", "web", &u, NODE, ann), PROXY);
    let agent = Agent::start_with(&w.fx, inbound_options(&w.fx), |api| {
        put_defaults(api);
        api.put(Res::Pods, mk(json!({})));
        api.put(Res::Pods, hn_pod.clone());
    });
    agent.wait_ready();
    let pins = w.fx.pin_dir().to_path_buf();
    let link = link_pin(&pins, &w.fx.netns_path());

    // No process in the pod yet: no netns, no link, the app answers.
    assert!(!link.exists(), "linked before the sandbox started");
    assert_eq!(w.who(&format!("{POD4}:8080")), "app-8080");

    // The sandbox starts: its netns is linked with no API event (inotify on cgroup.events).
    let started = std::time::Instant::now();
    let mut pause = sleeper(&sandbox_cg, w.fx.netns_file());
    let linked = poll_until(Duration::from_secs(10), || link.exists())
        .expect("the pod's netns was not linked after its sandbox started");
    // Printed, never asserted (timing belongs to the bench).
    println!(
        "sandbox process started -> sk_lookup link pinned: {:?}",
        linked - started
    );
    // The proxy is not listening yet: refused, never the app (fail closed).
    expect_who(&w, &format!("{POD4}:8080"), "failed");
    let _proxy = start_proxy(&proxy_cg, w.fx.netns_file(), &["[::]:15006"], false);
    expect_who(&w, &format!("{POD4}:8080"), "proxy");
    assert_eq!(w.who(&format!("[{POD6}]:8081")), "proxy");

    // ASM's "exclude inbound ports" (seed 003: 7001,7002,7005), added to the running pod: those
    // ports reach the app directly, others still the proxy; removed again: back to the proxy.
    // Live, with no restart.
    assert_eq!(w.who(&format!("{POD4}:7001")), "proxy");
    agent
        .api
        .put(Res::Pods, mk(json!({EXCLUDE: "7001,7002,7005"})));
    expect_who(&w, &format!("{POD4}:7001"), "app-7001");
    assert_eq!(w.who(&format!("{POD4}:7002")), "app-7002");
    assert_eq!(w.who(&format!("[{POD6}]:7005")), "app-7005");
    assert_eq!(w.who(&format!("{POD4}:8080")), "proxy");
    agent.api.put(Res::Pods, mk(json!({})));
    expect_who(&w, &format!("{POD4}:7001"), "proxy");

    // The sandbox process goes away while the proxy still runs: the netns is read again from
    // the proxy (pidfd), and the link stays.
    pause.kill().unwrap();
    pause.wait().unwrap();
    assert!(link.exists());
    assert_eq!(w.who(&format!("{POD4}:8080")), "proxy");

    // The hostNetwork pod never got a link for its netns.
    assert!(!link_pin(&pins, &w.node.netns_path()).exists());
    let v = redirect_tests::inspect(&pins).unwrap();
    let steered = v["inbound"]["counters"]["steered"].as_u64().unwrap_or(0);
    assert!(steered >= 3, "steered {steered}: {v}");

    // Deleting the pod releases its link: the app answers again.
    agent.api.delete(Res::Pods, "demo", "web");
    wait_for(Duration::from_secs(10), || (!link.exists()).then_some(()))
        .expect("the deleted pod's sk_lookup link is still pinned");
    expect_who(&w, &format!("{POD4}:8080"), "app-8080");
    let _ = hn_proc.kill();
    let _ = hn_proc.wait();
}
