//! Pod cgroup discovery on real cgroups: both kubelet drivers and every QoS class, replaced
//! sandboxes and deleted pods, and the startup race as it is: a pod delivered by the API before
//! its cgroup exists, its cgroup created and a process in it connecting at once (nothing but the
//! client's fork and exec in between), 1,000 times; none may escape. Also the reverse order.
mod kube_support;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kube_support::{
    Agent, Driver, NODE, Res, fake_api::wait_for, percentile, pod, pod_cgroup_rel, poll_until,
    put_defaults, uid,
};
use redirect_tests::{
    Fixture, Reached, Spawned, cgroup_id, probe, serve_identity, start_testproxy,
};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn registered(agent: &Agent, cg: &Path) -> bool {
    cgroup_id(cg)
        .ok()
        .is_some_and(|id| agent.maps().policy(id).is_some())
}

fn wait_registered(agent: &Agent, cg: &Path, want: bool) {
    wait_for(T, || (registered(agent, cg) == want).then_some(())).unwrap_or_else(|| {
        panic!(
            "{}: expected {}registered",
            cg.display(),
            if want { "" } else { "not " }
        )
    });
}

#[test]
fn discovers_both_drivers_and_every_qos_class() {
    let fx = Fixture::new("kube_discover").unwrap();
    let mut cases = Vec::new();
    for driver in [Driver::Systemd, Driver::Cgroupfs] {
        for qos in ["guaranteed", "burstable", "besteffort"] {
            cases.push((driver, qos, uid(cases.len() as u32 + 100)));
        }
    }
    // Half of the cgroups exist before the agent starts (found by the initial scan), half are
    // created afterwards (found by inotify), including the kubepods roots themselves for the
    // cgroupfs layout.
    let rel = |d, q, u: &str| pod_cgroup_rel(d, q, u);
    let mut paths = Vec::new();
    for (driver, qos, u) in &cases {
        if matches!(driver, Driver::Systemd) {
            paths.push(fx.cgroup(&rel(*driver, qos, u)).unwrap());
        } else {
            paths.push(fx.cgroup_root().join(rel(*driver, qos, u)));
        }
    }
    // kind's layout: a kubelet --cgroup-root of /kubelet under the systemd driver.
    let kind_uid = uid(199);
    let kind_rel = format!(
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice",
        kind_uid.replace('-', "_")
    );
    let agent = Agent::start(&fx, |api| {
        put_defaults(api);
        for (i, (_, _, u)) in cases.iter().enumerate() {
            api.put(Res::Pods, pod("demo", &format!("p{i}"), u, NODE, json!({})));
        }
        api.put(Res::Pods, pod("demo", "kind", &kind_uid, NODE, json!({})));
    });
    agent.wait_ready();
    for (i, (driver, qos, u)) in cases.iter().enumerate() {
        if matches!(driver, Driver::Cgroupfs) {
            std::fs::create_dir_all(fx.cgroup_root().join(rel(*driver, qos, u))).unwrap();
        }
        wait_registered(&agent, &paths[i], true);
    }
    let kind_cg = fx.cgroup(&kind_rel).unwrap();
    wait_registered(&agent, &kind_cg, true);
    assert_eq!(agent.maps().policies().unwrap().len(), cases.len() + 1);
}

#[test]
fn replaced_sandboxes_and_deleted_pods() {
    let fx = Fixture::new("kube_replace").unwrap();
    let (a, b) = (uid(201), uid(202));
    let cg_a = fx
        .cgroup(&pod_cgroup_rel(Driver::Systemd, "burstable", &a))
        .unwrap();
    let cg_b = fx
        .cgroup(&pod_cgroup_rel(Driver::Cgroupfs, "burstable", &b))
        .unwrap();
    let agent = Agent::start(&fx, |api| {
        put_defaults(api);
        api.put(Res::Pods, pod("demo", "a", &a, NODE, json!({})));
        api.put(Res::Pods, pod("demo", "b", &b, NODE, json!({})));
    });
    agent.wait_ready();
    wait_registered(&agent, &cg_a, true);
    wait_registered(&agent, &cg_b, true);

    // A new sandbox: same directory name, new cgroup (new inode). The registration moves.
    let old = cgroup_id(&cg_a).unwrap();
    std::fs::remove_dir(&cg_a).unwrap();
    std::fs::create_dir(&cg_a).unwrap();
    let new = cgroup_id(&cg_a).unwrap();
    assert_ne!(old, new);
    let maps = agent.maps();
    wait_for(T, || {
        (maps.policy(new).is_some() && maps.policy(old).is_none()).then_some(())
    })
    .expect("the replaced sandbox's cgroup is not the registered one");

    // A deleted pod is removed.
    agent.api.delete(Res::Pods, "demo", "b");
    let id_b = cgroup_id(&cg_b).unwrap();
    wait_for(T, || maps.policy(id_b).is_none().then_some(()))
        .expect("deleted pod still registered");
    // A pod whose cgroup goes away is removed too. While the meshed pod is known and its
    // cgroup is not there, the kubepods roots hold the startup-race guard (an enabled record);
    // deleting the pod takes it away.
    std::fs::remove_dir(&cg_a).unwrap();
    wait_for(T, || maps.policy(new).is_none().then_some(())).expect("gone cgroup still registered");
    let roots: Vec<u64> = ["kubepods.slice", "kubepods"]
        .iter()
        .map(|r| cgroup_id(&fx.cgroup_root().join(r)).unwrap())
        .collect();
    let guard = |want: bool| {
        wait_for(T, || {
            let ids: Vec<u64> = maps.policies().unwrap().into_keys().collect();
            (ids.iter().all(|id| roots.contains(id))
                && (ids.len() == 2) == want
                && (want || ids.is_empty()))
            .then_some(())
        })
    };
    guard(true).expect("pending pod a: the guard should be on both kubepods roots");
    agent.api.delete(Res::Pods, "demo", "a");
    guard(false).expect("no pending pod: no guard");
    assert!(maps.policies().unwrap().is_empty());
}

/// A netns with a backend at 198.18.0.10:80 and a tag-mode proxy on 127.0.0.1:15001 (outside
/// the kubepods tree, so it is not in the mesh).
struct World {
    fx: Fixture,
    _backend: redirect_tests::IdentityServer,
    _proxy: Spawned,
}

fn world(name: &str) -> World {
    let fx = Fixture::new(name).unwrap();
    fx.add_addr("198.18.0.10/32").unwrap();
    let backend = serve_identity(&fx, "198.18.0.10:80".parse().unwrap(), "backend").unwrap();
    let proxy_cg = fx.cgroup("proxy").unwrap();
    let proxy = start_testproxy(&fx, &proxy_cg, &["127.0.0.1:15001"]).unwrap();
    World {
        fx,
        _backend: backend,
        _proxy: proxy,
    }
}

fn redirected(r: &Reached) -> bool {
    matches!(r, Reached::Proxy { orig } if orig == "198.18.0.10:80")
}

const REPS: usize = 1000;

#[test]
fn no_startup_race_pod_event_first() {
    let w = world("kube_race_pod_first");
    let fx = &w.fx;
    // As on a node: the kubelet made the kubepods tree at its start, long before any pod.
    fx.cgroup("kubepods.slice/kubepods-burstable.slice")
        .unwrap();
    let agent = Agent::start(fx, put_defaults);
    agent.wait_ready();
    let mut escaped = Vec::new();
    let mut ran = 0;
    for i in 0..REPS {
        let u = uid(1000 + i as u32);
        let name = format!("race-{i}");
        let rel = pod_cgroup_rel(Driver::Systemd, "burstable", &u);
        // 1. The API delivers the pod, and the agent has taken it in: a pass reported it as
        // pending (any pass would not do: one queued before the put may not know it).
        agent
            .api
            .put(Res::Pods, pod("demo", &name, &u, NODE, json!({})));
        let id = format!("demo/{name}");
        let reports = agent.owner().reports();
        wait_for(T, || reports.borrow().pending.contains(&id).then_some(()))
            .expect("the pod never showed as pending");
        // 2. The kubelet creates the pod's cgroup, and the container's under it.
        let pod_cg = fx.cgroup(&rel).unwrap();
        let app = fx.cgroup(&format!("{rel}/app")).unwrap();
        // 3. A process in it connects at once.
        let r = probe(fx, &app, "198.18.0.10:80", &[]).unwrap();
        ran += 1;
        if !redirected(&r) {
            escaped.push((i, r));
        }
        // Tear down: the pod is deleted, then its cgroups.
        agent.api.delete(Res::Pods, "demo", &name);
        wait_registered(&agent, &pod_cg, false);
        std::fs::remove_dir(&app).unwrap();
        std::fs::remove_dir(&pod_cg).unwrap();
    }
    println!(
        "race (pod event first): {} of {ran} connects escaped redirection",
        escaped.len()
    );
    assert_eq!(ran, REPS, "every connect ran");
    assert!(
        escaped.is_empty(),
        "{} of {ran} escaped: {escaped:?}",
        escaped.len()
    );
}

#[test]
fn cgroup_first_then_pod_event() {
    let w = world("kube_race_cgroup_first");
    let fx = &w.fx;
    let agent = Agent::start(fx, put_defaults);
    agent.wait_ready();
    let maps = agent.maps();
    let mut latencies = Vec::new();
    let reps = 50;
    for i in 0..reps {
        let u = uid(5000 + i as u32);
        let name = format!("late-{i}");
        let rel = pod_cgroup_rel(Driver::Cgroupfs, "besteffort", &u);
        let pod_cg: PathBuf = fx.cgroup(&rel).unwrap();
        let app = fx.cgroup(&format!("{rel}/app")).unwrap();
        // The cgroup exists and is not in the mesh yet: its connects go straight out.
        if i == 0 {
            let r = probe(fx, &app, "198.18.0.10:80", &[]).unwrap();
            assert_eq!(r, Reached::Server("backend".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
        let id = cgroup_id(&pod_cg).unwrap();
        let sent = Instant::now();
        agent
            .api
            .put(Res::Pods, pod("demo", &name, &u, NODE, json!({})));
        let done = poll_until(T, || maps.policy(id).is_some()).expect("not registered");
        latencies.push(done - sent);
        // Connects after registration are redirected.
        let r = probe(fx, &app, "198.18.0.10:80", &[]).unwrap();
        assert!(redirected(&r), "rep {i}: {r:?}");
        agent.api.delete(Res::Pods, "demo", &name);
        wait_for(T, || maps.policy(id).is_none().then_some(())).unwrap();
        std::fs::remove_dir(&app).unwrap();
        std::fs::remove_dir(&pod_cg).unwrap();
    }
    latencies.sort();
    println!(
        "cgroup first: pod event → registered p50 {:?} p99 {:?} over {reps}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
}
