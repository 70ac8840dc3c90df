//! Finding 8: the sidecar is exempted by its container's cgroup, found from the pod status's
//! `containerID` and the runtime's cgroup naming (containerd, CRI-O; systemd and cgroupfs), in
//! the real kernel. A `hostUsers: false` pod's proxy runs under a host uid that differs from its
//! runAsUser, so only the cgroup can exempt it; a pod that can be exempted by nothing is
//! reported and not registered. Before the fix the proxy cgroup was never looked up: the proxy's
//! own connects below were redirected back to itself (and the unexemptable pod was registered
//! silently).
mod kube_support;

use std::{path::Path, time::Duration};

use kube_support::{
    Agent, Driver, NODE, Res, fake_api::wait_for, pod, pod_cgroup_rel, put_defaults, uid,
};
use redirect_common::flags;
use redirect_tests::{
    Fixture, Reached, Spawned, cgroup_id, probe, serve_identity, start_testproxy,
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);
/// The host uid a user-namespaced pod's runAsUser 1337 maps to (a kubelet allocates 65536-uid
/// ranges per pod).
const HOST_UID: &str = "1704473";

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

fn with_status(mut p: Value, container_id: Option<&str>) -> Value {
    p["spec"]["hostUsers"] = false.into();
    if let Some(id) = container_id {
        p["status"]["containerStatuses"] = json!([
            {"name": "app", "ready": true, "restartCount": 0, "image": "registry.example/app:1.0",
             "imageID": "", "containerID": format!("containerd://{}", "a".repeat(64)),
             "started": true, "state": {"running": {"startedAt": "2025-01-01T00:00:01Z"}}},
            {"name": "istio-proxy", "ready": true, "restartCount": 0,
             "image": "docker.io/istio/proxyv2:1.22.0", "imageID": "", "containerID": id,
             "started": true, "state": {"running": {"startedAt": "2025-01-01T00:00:01Z"}}}
        ]);
    }
    p
}

fn backend() -> Reached {
    Reached::Server("backend".into())
}

fn redirected() -> Reached {
    Reached::Proxy {
        orig: "198.18.0.10:80".into(),
    }
}

fn as_host_uid(fx: &Fixture, cg: &Path) -> Reached {
    probe(fx, cg, "198.18.0.10:80", &["--uid", HOST_UID]).unwrap()
}

#[test]
fn user_namespace_pods_are_exempted_by_their_proxy_cgroup() {
    let w = world("kube_proxy_cg");
    let fx = &w.fx;
    let id = |n: u8| format!("{n:x}").repeat(64);
    // (driver, runtime, the sidecar's container directory)
    let cases = [
        (
            Driver::Systemd,
            "containerd",
            format!("cri-containerd-{}.scope", id(1)),
        ),
        (Driver::Systemd, "cri-o", format!("crio-{}.scope", id(2))),
        (Driver::Cgroupfs, "containerd", id(3)),
        (Driver::Cgroupfs, "cri-o", format!("crio-{}", id(4))),
    ];
    let mut pods = Vec::new();
    for (i, (driver, runtime, dir)) in cases.iter().enumerate() {
        let u = uid(1500 + i as u32);
        let rel = pod_cgroup_rel(*driver, "burstable", &u);
        let pod_cg = fx.cgroup(&rel).unwrap();
        let proxy_cg = fx.cgroup(&format!("{rel}/{dir}")).unwrap();
        let app_cg = fx.cgroup(&format!("{rel}/app")).unwrap();
        let cid = format!("{runtime}://{}", id(i as u8 + 1));
        pods.push((u, pod_cg, proxy_cg, app_cg, cid));
    }
    let agent = Agent::start(fx, |api| {
        put_defaults(api);
        for (i, (u, _, _, _, cid)) in pods.iter().enumerate() {
            let p = pod("demo", &format!("p{i}"), u, NODE, json!({}));
            api.put(Res::Pods, with_status(p, Some(cid)));
        }
    });
    agent.wait_ready();
    let maps = agent.maps();
    for (u, pod_cg, proxy_cg, app_cg, cid) in &pods {
        let rec = wait_for(T, || maps.policy(cgroup_id(pod_cg).unwrap()))
            .unwrap_or_else(|| panic!("{u} not registered"));
        assert_ne!(
            rec.flags & flags::HAS_PROXY_CGROUP,
            0,
            "{cid}: no cgroup exemption"
        );
        assert_eq!(rec.proxy_cgroup, cgroup_id(proxy_cg).unwrap(), "{cid}");
        // The proxy's upstream connect (host uid 1704473, in its container's cgroup) goes out;
        // the app's, even under the same uid, is redirected.
        assert_eq!(
            as_host_uid(fx, proxy_cg),
            backend(),
            "{cid}: proxy not exempted"
        );
        assert_eq!(
            as_host_uid(fx, app_cg),
            redirected(),
            "{cid}: app not redirected"
        );
    }
}

#[test]
fn a_sidecar_that_starts_later_gets_its_cgroup_exemption() {
    let w = world("kube_proxy_cg_late");
    let fx = &w.fx;
    let u = uid(1510);
    let rel = pod_cgroup_rel(Driver::Systemd, "besteffort", &u);
    let pod_cg = fx.cgroup(&rel).unwrap();
    let app_cg = fx.cgroup(&format!("{rel}/app")).unwrap();
    let agent = Agent::start(fx, |api| {
        put_defaults(api);
        api.put(
            Res::Pods,
            with_status(pod("demo", "late", &u, NODE, json!({})), None),
        );
    });
    agent.wait_ready();
    let maps = agent.maps();
    let id = cgroup_id(&pod_cg).unwrap();
    // Registered at once (the app cannot escape while the sidecar starts), not yet exempt.
    let rec = wait_for(T, || maps.policy(id)).expect("not registered");
    assert_eq!(rec.flags & flags::HAS_PROXY_CGROUP, 0);
    assert_eq!(as_host_uid(fx, &app_cg), redirected());
    // The runtime creates the sidecar; the status names it.
    let cid = "c".repeat(64);
    let proxy_cg = fx
        .cgroup(&format!("{rel}/cri-containerd-{cid}.scope"))
        .unwrap();
    agent.api.put(
        Res::Pods,
        with_status(
            pod("demo", "late", &u, NODE, json!({})),
            Some(&format!("containerd://{cid}")),
        ),
    );
    let want = cgroup_id(&proxy_cg).unwrap();
    wait_for(T, || {
        maps.policy(id)
            .filter(|r| r.flags & flags::HAS_PROXY_CGROUP != 0 && r.proxy_cgroup == want)
    })
    .expect("the sidecar's cgroup never became the exemption");
    assert_eq!(as_host_uid(fx, &proxy_cg), backend());
}

#[test]
fn a_pod_that_cannot_be_exempted_is_reported_and_not_registered() {
    let w = world("kube_not_exempt");
    let fx = &w.fx;
    let (a, b, c) = (uid(1520), uid(1521), uid(1522));
    let cgs: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|u| {
            fx.cgroup(&pod_cgroup_rel(Driver::Systemd, "burstable", u))
                .unwrap()
        })
        .collect();
    let agent = Agent::start(fx, |api| {
        put_defaults(api);
        // Injection label only, no container named like a sidecar, no uid anywhere.
        let mut p = pod("demo", "injected", &a, NODE, json!({}));
        p["spec"]["containers"] = json!([{"name": "app", "image": "registry.example/app:1.0"},
                                          {"name": "envoy", "image": "envoy:1.30"}]);
        p["metadata"]["labels"]["sidecar.istio.io/inject"] = "true".into();
        api.put(Res::Pods, p);
        // A user-namespaced pod on a runtime whose cgroup naming is unknown.
        let p = pod("demo", "kata", &b, NODE, json!({}));
        api.put(
            Res::Pods,
            with_status(p, Some(&format!("kata://{}", "d".repeat(64)))),
        );
        // And a good one, so that a pass is known to have run.
        api.put(Res::Pods, pod("demo", "good", &c, NODE, json!({})));
    });
    agent.wait_ready();
    let maps = agent.maps();
    wait_for(T, || maps.policy(cgroup_id(&cgs[2]).unwrap())).expect("good pod not registered");
    let events = wait_for(T, || {
        let e: Vec<Value> = agent
            .api
            .posted_events()
            .into_iter()
            .filter(|e| e["reason"] == "RedirectProxyNotExempt")
            .collect();
        (e.len() == 2).then_some(e)
    })
    .unwrap_or_else(|| panic!("{:#?}", agent.api.posted_events()));
    let notes: Vec<&str> = events.iter().map(|e| e["note"].as_str().unwrap()).collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("demo/injected") && n.contains("sidecar.istio.io/inject")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("demo/kata") && n.contains("\"kata\"") && n.contains("hostUsers")),
        "{notes:?}"
    );
    // Not registered as meshed: each holds a disabled record (never redirected, never caught
    // by the startup-race guard).
    for cg in &cgs[..2] {
        let rec = maps
            .policy(cgroup_id(cg).unwrap())
            .expect("disabled record");
        assert_eq!(rec.flags & redirect_common::flags::ENABLED, 0, "{rec:?}");
    }
    assert!(
        agent
            .metrics
            .encode()
            .contains("redirect_pods_not_exempt 2"),
        "{}",
        agent.metrics.encode()
    );
}
