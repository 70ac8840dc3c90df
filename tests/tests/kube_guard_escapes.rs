//! Issue #12, the Kubernetes source's startup-race guard (source/kube/guard.rs) under looping
//! clients instead of one probe at one point:
//! - a meshed pod's process that runs before the API has told the agent about its pod (only the
//!   guard catches it while another pod is pending) keeps connecting while its own record goes
//!   in and the pending pod's pass lifts the guard: none of its connects may go direct;
//! - a pod that is to be left alone (no sidecar: a disabled record) keeps connecting while
//!   meshed pods arrive pending and the guard goes up and down, its own pod event arriving just
//!   before a pending pod's: none of its connects may be caught by the guard.
mod kube_support;

use std::{path::Path, time::Duration};

use kube_support::{
    Agent, Driver, NODE, Res, fake_api::wait_for, plain_pod, pod, pod_cgroup_rel, put_defaults, uid,
};
use redirect_tests::{
    Fixture, Spawned, cgroup_id,
    connect_loop::{looping_client, proxied, wait_proxied},
    serve_identity, start_testproxy,
};
use serde_json::json;

const T: Duration = Duration::from_secs(20);
const DEST: &str = "198.18.0.10:80";
const REPS: usize = 30;

/// A netns with a backend at [`DEST`] (answering "backend") and a tag-mode proxy on
/// 127.0.0.1:15001 outside the kubepods tree, and the kubepods tree the kubelet makes at its
/// start.
struct World {
    fx: Fixture,
    _backend: redirect_tests::IdentityServer,
    _proxy: Spawned,
}

fn world(name: &str) -> World {
    let fx = Fixture::new(name).unwrap();
    fx.add_addr("198.18.0.10/32").unwrap();
    let backend = serve_identity(&fx, DEST.parse().unwrap(), "backend").unwrap();
    let proxy_cg = fx.cgroup("proxy").unwrap();
    let proxy = start_testproxy(&fx, &proxy_cg, &["127.0.0.1:15001"]).unwrap();
    fx.cgroup("kubepods.slice/kubepods-burstable.slice")
        .unwrap();
    World {
        fx,
        _backend: backend,
        _proxy: proxy,
    }
}

/// The client's connects that went straight to the backend.
fn direct(c: &Spawned) -> usize {
    c.lines().iter().filter(|l| l.trim() == "backend").count()
}

fn wait_direct(c: &Spawned, n: usize) {
    let target = direct(c) + n;
    wait_for(T, || (direct(c) >= target).then_some(())).unwrap_or_else(|| {
        panic!(
            "the client stopped reaching the backend: {:?}",
            c.lines().iter().rev().take(5).collect::<Vec<_>>()
        )
    });
}

fn registered(agent: &Agent, cg: &Path) -> bool {
    cgroup_id(cg)
        .ok()
        .is_some_and(|id| agent.maps().policy(id).is_some())
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    wait_for(T, || f().then_some(())).unwrap_or_else(|| panic!("timed out waiting for {what}"));
}

/// Puts meshed pod `name` and waits until a pass reported it pending and the guard is up.
fn put_pending(agent: &Agent, guard: &Path, name: &str, u: &str) {
    agent
        .api
        .put(Res::Pods, pod("demo", name, u, NODE, json!({})));
    let id = format!("demo/{name}");
    let reports = agent.owner().reports();
    wait_until("the pod to show as pending", || {
        reports.borrow().pending.contains(&id)
    });
    wait_until("the guard", || registered(agent, guard));
}

/// Deletes pod `name` and its cgroups once the agent has let go of them.
fn remove_pod(agent: &Agent, name: &str, dirs: &[&Path]) {
    agent.api.delete(Res::Pods, "demo", name);
    wait_until("the pod's record to go", || !registered(agent, dirs[0]));
    for d in dirs.iter().rev() {
        // The looping shell is gone, but a client it forked may still be in the cgroup.
        std::fs::write(d.join("cgroup.kill"), "1").unwrap();
        wait_until("the cgroup to empty", || {
            std::fs::read_to_string(d.join("cgroup.events"))
                .is_ok_and(|e| e.lines().any(|l| l == "populated 0"))
        });
        std::fs::remove_dir(d).unwrap();
    }
}

#[test]
fn lifting_the_guard_never_lets_a_pending_pods_looping_client_escape() {
    let w = world("kube_guard_lift");
    let fx = &w.fx;
    let guard = fx.cgroup("kubepods.slice").unwrap();
    let agent = Agent::start(fx, put_defaults);
    agent.wait_ready();
    let (mut escaped, mut redirected) = (0, 0);
    for i in 0..REPS {
        let (name, u) = (format!("lift-{i}"), uid(7000 + i as u32));
        put_pending(&agent, &guard, &name, &u);
        // Another meshed pod whose cgroup and process are there before the API has told the
        // agent about it (API lag): while `name` is pending only the guard catches it. Its
        // client loops through the guard, its own registration, and the pass that registers
        // the pending pod and lifts the guard.
        let (early, eu) = (format!("early-{i}"), uid(7500 + i as u32));
        let erel = pod_cgroup_rel(Driver::Systemd, "burstable", &eu);
        let early_cg = fx.cgroup(&erel).unwrap();
        let early_app = fx.cgroup(&format!("{erel}/app")).unwrap();
        let client = looping_client(fx, &early_app, DEST).unwrap();
        wait_proxied(&client, 3);
        agent
            .api
            .put(Res::Pods, pod("demo", &early, &eu, NODE, json!({})));
        wait_until("the early pod's record", || registered(&agent, &early_cg));
        wait_proxied(&client, 3);
        // The pending pod's cgroup comes: its record goes in and the guard is lifted.
        let rel = pod_cgroup_rel(Driver::Systemd, "burstable", &u);
        let pod_cg = fx.cgroup(&rel).unwrap();
        wait_until("the pending pod's record and the guard lifted", || {
            registered(&agent, &pod_cg) && !registered(&agent, &guard)
        });
        wait_proxied(&client, 3);
        redirected += proxied(&client);
        escaped += direct(&client);
        drop(client);
        remove_pod(&agent, &name, &[&pod_cg]);
        remove_pod(&agent, &early, &[&early_cg, &early_app]);
    }
    println!("guard lifted {REPS} times: {redirected} connects redirected, {escaped} direct");
    assert_eq!(
        escaped, 0,
        "{escaped} connects escaped while the guard was lifted"
    );
    assert!(
        redirected >= 3 * REPS,
        "the loops ran too little: {redirected}"
    );
}

#[test]
fn a_left_alone_pods_looping_client_is_never_caught_by_the_guard() {
    let w = world("kube_guard_alone");
    let fx = &w.fx;
    let guard = fx.cgroup("kubepods.slice").unwrap();
    let agent = Agent::start(fx, put_defaults);
    agent.wait_ready();
    let (mut caught, mut went_direct) = (0, 0);
    for i in 0..REPS {
        // A pod without a sidecar, its process already running (the agent has not seen the
        // pod yet, and no guard is up: its connects go direct).
        let (alone, au) = (format!("alone-{i}"), uid(8000 + i as u32));
        let arel = pod_cgroup_rel(Driver::Systemd, "burstable", &au);
        let alone_cg = fx.cgroup(&arel).unwrap();
        let alone_app = fx.cgroup(&format!("{arel}/app")).unwrap();
        let client = looping_client(fx, &alone_app, DEST).unwrap();
        wait_direct(&client, 2);
        // Its pod event, and right behind it a meshed pod's that will be pending: one pass
        // or two, the disabled record must be in before the guard.
        agent
            .api
            .put(Res::Pods, plain_pod("demo", &alone, &au, NODE));
        let (name, u) = (format!("pending-{i}"), uid(9000 + i as u32));
        put_pending(&agent, &guard, &name, &u);
        assert!(registered(&agent, &alone_cg), "no disabled record");
        wait_direct(&client, 2);
        // The pending pod's cgroup comes, the guard goes.
        let rel = pod_cgroup_rel(Driver::Systemd, "burstable", &u);
        let pod_cg = fx.cgroup(&rel).unwrap();
        wait_until("the guard lifted", || {
            registered(&agent, &pod_cg) && !registered(&agent, &guard)
        });
        wait_direct(&client, 2);
        caught += proxied(&client);
        went_direct += direct(&client);
        drop(client);
        remove_pod(&agent, &name, &[&pod_cg]);
        remove_pod(&agent, &alone, &[&alone_cg, &alone_app]);
    }
    println!("guard up and down {REPS} times: {went_direct} connects direct, {caught} caught");
    assert_eq!(
        caught, 0,
        "{caught} connects of a left-alone pod were caught by the guard"
    );
    assert!(
        went_direct >= 6 * REPS,
        "the loops ran too little: {went_direct}"
    );
}
