//! Issue #12, inbound from the Kubernetes source (the world of kube_inbound.rs): a pod's sandbox
//! restart. The old sandbox's processes exit one by one (pause, then the proxy, then the app),
//! and a new pause process starts in a new netns. A looping client on the client node targets
//! each netns; the app's own listeners count what reached them.
//!
//! Measured, not assumed: connections that reach the app in the new netns before its link is
//! pinned are printed (nothing can steer them: no sk_lookup program is in that netns yet, so this
//! is the window an init container closes and an agent cannot). Asserted: 0 reach the app in the
//! old netns while its app process lives, and 0 in the new netns from the moment its link is
//! pinned (the record is written first).
mod escapes_support;
mod inbound_support;
mod kube_support;

use std::{process::Child, time::Duration};

use escapes_support::inbound::{NetnsLooper, assert_inbound_no_escape};
use inbound_support::{
    POD4,
    kube::{link_pin, running, sleeper},
    start_proxy, world,
};
use kube_support::{
    Agent, Driver, NODE, Res, fake_api::wait_for, inbound_options, pod, pod_cgroup_rel, poll_until,
    put_defaults, uid,
};
use redirect_tests::{Fixture, serve_identity, veth_pair};
use serde_json::json;

const SANDBOX: &str = "1a4d0b1c2e3f40516273849506a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f";
const SANDBOX2: &str = "2b4d0b1c2e3f40516273849506a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f";
const APP: &str = "3c6e5d4c3b2a190817263544536271809f8e7d6c5b4a39281706f5e4d3c2b1a0";
const PROXY: &str = "4d6e5d4c3b2a190817263544536271809f8e7d6c5b4a39281706f5e4d3c2b1a0";
/// The new sandbox's pod address, on a second veth pair to the client node.
const NEW_POD4: &str = "198.19.3.2";

fn kill(mut c: Child) {
    c.kill().unwrap();
    c.wait().unwrap();
}

#[test]
fn a_sandbox_restart_never_lets_a_steered_connection_reach_the_app() {
    let w = world("esc-sandbox");
    let u = uid(51);
    let rel = pod_cgroup_rel(Driver::Cgroupfs, "besteffort", &u);
    let _pod_cg = w.fx.cgroup(&rel).unwrap();
    let sandbox_cg = w.fx.cgroup(&format!("{rel}/{SANDBOX}")).unwrap();
    let sandbox2_cg = w.fx.cgroup(&format!("{rel}/{SANDBOX2}")).unwrap();
    let app_cg = w.fx.cgroup(&format!("{rel}/{APP}")).unwrap();
    let proxy_cg = w.fx.cgroup(&format!("{rel}/{PROXY}")).unwrap();

    // The old sandbox: pause, the app container (a process holding the netns; its listener is
    // the identity server below), the proxy.
    let pause = sleeper(&sandbox_cg, w.fx.netns_file());
    let app_proc = sleeper(&app_cg, w.fx.netns_file());
    let old_app = w.apps(&[8080]);
    let proxy = start_proxy(&proxy_cg, w.fx.netns_file(), &["[::]:15006"], true);
    let agent = Agent::start_with(&w.fx, inbound_options(&w.fx), |api| {
        put_defaults(api);
        api.put(
            Res::Pods,
            running(pod("demo", "web", &u, NODE, json!({})), PROXY),
        );
    });
    agent.wait_ready();
    let pins = w.fx.pin_dir().to_path_buf();
    let old_link = link_pin(&pins, &w.fx.netns_path());
    wait_for(Duration::from_secs(10), || old_link.exists().then_some(()))
        .expect("the old sandbox's netns was not linked");

    let old = NetnsLooper::start(w.node.netns_file(), &format!("{POD4}:8080"));
    old.wait_for("proxy", 50);

    // The old sandbox goes down: pause first (the netns is read again from the next process),
    // then the proxy (refused from then on: fail closed), then the app, whose listener closes as
    // it exits.
    kill(pause);
    old.wait_for("proxy", 50);
    assert!(old_link.exists(), "the link went with the pause process");
    drop(proxy);
    old.wait_for("failed", 50);
    assert!(old_link.exists(), "the link went with the proxy process");
    let old_app_accepted = old_app[0].connections();
    drop(old_app);
    kill(app_proc);
    wait_for(Duration::from_secs(10), || {
        (!old_link.exists()).then_some(())
    })
    .expect("the old netns's link was not released once its last process exited");
    let t_old = old.finish();
    assert_inbound_no_escape(
        &t_old,
        old_app_accepted,
        100,
        "old netns while its app lived",
    );

    // The new sandbox's netns, wired to the client node and with the app already listening (the
    // worst case: its listener is up before the agent has seen the new pause process).
    let new = Fixture::new("in-esc-sandbox-new").unwrap();
    veth_pair(&new, "vpod2", &w.node, "vnode2").unwrap();
    new.ip(&["addr", "add", &format!("{NEW_POD4}/24"), "dev", "vpod2"])
        .unwrap();
    w.node
        .ip(&["addr", "add", "198.19.3.1/24", "dev", "vnode2"])
        .unwrap();
    let new_app = serve_identity(&new, "[::]:8080".parse().unwrap(), "app-8080").unwrap();
    let looper = NetnsLooper::start(w.node.netns_file(), &format!("{NEW_POD4}:8080"));
    looper.wait_for("app-8080", 20);
    let new_link = link_pin(&pins, &new.netns_path());
    let generation = agent.owner().health().generation();
    let at_start = new_app.connections();
    let pause2 = sleeper(&sandbox2_cg, new.netns_file());
    poll_until(Duration::from_secs(10), || new_link.exists())
        .expect("the new sandbox's netns was not linked");
    let at_link = new_app.connections();
    // "Up" is the pass that linked it and wrote the record, applied.
    agent.wait_pass(generation);
    let at_up = new_app.connections();
    // No listener yet in the new netns: refused, never the app.
    looper.wait_for("failed", 50);
    let _proxy2 = start_proxy(&proxy_cg, new.netns_file(), &["[::]:15006"], true);
    looper.wait_for("proxy", 200);
    let after = new_app.connections() - at_up;
    let t = looper.finish();
    kill(pause2);
    // Measured, not asserted, before the pin: nothing is in the new netns to steer them yet.
    // Asserted from the pin on: the pass writes the netns's record before it attaches the link
    // (reconcile/inbound.rs), so a linked netns never takes the normal lookup for lack of one.
    println!(
        "new netns: {} connections reached the app between the new pause process's start and its link's pin, {} between the pin and the applied pass, {after} after; looped: {t:?}",
        at_link - at_start,
        at_up - at_link
    );
    assert_eq!(
        at_up - at_link,
        0,
        "reached the app after the link was pinned: {t:?}"
    );
    assert_eq!(after, 0, "reached the app after the link was up: {t:?}");
    assert!(t.get("proxy").copied().unwrap_or(0) >= 200, "{t:?}");
}
