//! The Kubernetes source against kube's mock service (tower-test) answering with real API JSON,
//! and the real datapath attached to the test's own cgroup subtree: what is requested (field
//! selector, metadata-only namespaces, the MeshConfig), re-lists after watch errors, Events for
//! bad annotations, the MeshConfig's effect, the admin endpoint, and restart adoption.
mod kube_support;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use kube_support::{
    Agent, Driver, NODE, Res, fake_api::wait_for, meshconfig, namespace, plain_pod, pod,
    pod_cgroup_rel, put_defaults, uid,
};
use redirect_agent::bpf::PinnedMaps;
use redirect_common::{action, flags};
use redirect_tests::{Fixture, cgroup_id};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

/// Waits until the cgroup has a policy record (Some) or has none (None).
fn wait_record(maps: &PinnedMaps, cg: u64, present: bool) -> Option<redirect_common::Policy> {
    let ok = wait_for(T, || (maps.policy(cg).is_some() == present).then_some(()));
    assert!(
        ok.is_some(),
        "cgroup {cg}: expected the record to be {}",
        if present { "present" } else { "absent" }
    );
    maps.policy(cg)
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out[9..12].parse().unwrap();
    (code, out)
}

#[test]
fn watches_node_pods_namespace_metadata_and_the_meshconfig() {
    let fx = Fixture::new("kube_requests").unwrap();
    let (a, b, other, hostnet) = (uid(1), uid(2), uid(3), uid(4));
    let cg_a = fx
        .cgroup(&pod_cgroup_rel(Driver::Systemd, "burstable", &a))
        .unwrap();
    let cg_b = fx
        .cgroup(&pod_cgroup_rel(Driver::Systemd, "besteffort", &b))
        .unwrap();
    let cg_h = fx
        .cgroup(&pod_cgroup_rel(Driver::Systemd, "besteffort", &hostnet))
        .unwrap();
    let agent = Agent::start(&fx, |api| {
        put_defaults(api);
        api.put(
            Res::MeshConfigs,
            meshconfig(json!({"outboundPortExclusionList": [5432], "enableEgress": true})),
        );
        api.put(Res::Pods, pod("demo", "a", &a, NODE, json!({})));
        api.put(Res::Pods, plain_pod("demo", "b", &b, NODE));
        api.put(
            Res::Pods,
            pod("demo", "elsewhere", &other, "node-2", json!({})),
        );
        let mut h = pod("demo", "hostnet", &hostnet, NODE, json!({}));
        h["spec"]["hostNetwork"] = true.into();
        api.put(Res::Pods, h);
    });
    agent.wait_ready();
    let maps = agent.maps();
    let rec = wait_record(&maps, cgroup_id(&cg_a).unwrap(), true).unwrap();
    assert_eq!(
        rec.proxy_uid, 1337,
        "the sidecar's runAsUser is the proxy uid"
    );
    assert_ne!(rec.flags & flags::HAS_PROXY_UID, 0);
    // The MeshConfig's excluded port reached the pod's entries.
    let entries = maps.entries().unwrap();
    let ports = &entries[&rec.policy_id].ports;
    assert_eq!(ports.get(&(16, 5432)), Some(&action::EXCLUDE), "{ports:?}");
    // Not meshed (no sidecar) and hostNetwork pods are never redirected: they hold a disabled
    // record (so that the startup-race guard on the kubepods root never catches them).
    for cg in [&cg_b, &cg_h] {
        let rec = wait_record(&maps, cgroup_id(cg).unwrap(), true).unwrap();
        assert_eq!(rec.flags & flags::ENABLED, 0, "{}: {rec:?}", cg.display());
    }
    assert_eq!(maps.policies().unwrap().len(), 3);

    let seen = agent.api.seen();
    let pods: Vec<_> = seen.iter().filter(|s| s.kind == Some(Res::Pods)).collect();
    assert!(pods.iter().any(|s| !s.watch) && pods.iter().any(|s| s.watch));
    for s in &pods {
        assert!(
            s.uri.starts_with("/api/v1/pods?")
                && s.uri.contains("fieldSelector=spec.nodeName%3Dnode-1"),
            "pod request without the node's field selector: {}",
            s.uri
        );
    }
    let nss: Vec<_> = seen
        .iter()
        .filter(|s| s.kind == Some(Res::Namespaces))
        .collect();
    assert!(!nss.is_empty());
    for s in &nss {
        assert!(
            s.accept.contains("as=PartialObjectMetadata"),
            "namespaces must be metadata-only: {} accept={}",
            s.uri,
            s.accept
        );
    }
    let mcs: Vec<_> = seen
        .iter()
        .filter(|s| s.kind == Some(Res::MeshConfigs))
        .collect();
    assert!(!mcs.is_empty());
    for s in &mcs {
        assert!(
            s.uri
                .starts_with("/apis/config.flomesh.io/v1alpha3/namespaces/fsm-system/meshconfigs?")
                && s.uri
                    .contains("fieldSelector=metadata.name%3Dfsm-mesh-config"),
            "{}",
            s.uri
        );
    }

    // The admin endpoint on the agent's metrics and health.
    let (addr, _task) = agent
        .rt
        .block_on(redirect_agent::admin::serve(
            "127.0.0.1:0".parse().unwrap(),
            agent.metrics.clone(),
            agent.owner().health(),
        ))
        .unwrap();
    assert_eq!(http_get(addr, "/livez").0, 200);
    let (code, body) = http_get(addr, "/readyz");
    assert_eq!(code, 200, "{body}");
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200);
    for needle in [
        "redirect_workloads_registered 3",
        "redirect_pods_meshed 1",
        "redirect_map_entries{map=\"POLICY\"} 3",
        "redirect_map_capacity{map=\"POLICY\"}",
        "redirect_decisions_total{decision=\"redirected\"}",
        "redirect_reconcile_latency_seconds_bucket",
        "redirect_ready 1",
    ] {
        assert!(body.contains(needle), "/metrics lacks {needle}:\n{body}");
    }
}

#[test]
fn watch_end_resumes_and_watch_errors_relist() {
    let fx = Fixture::new("kube_relist").unwrap();
    let (a, b, c, d) = (uid(11), uid(12), uid(13), uid(14));
    let cgs: Vec<_> = [&a, &b, &c, &d]
        .iter()
        .map(|u| {
            fx.cgroup(&pod_cgroup_rel(Driver::Cgroupfs, "burstable", u))
                .unwrap()
        })
        .collect();
    let ids: Vec<u64> = cgs.iter().map(|p| cgroup_id(p).unwrap()).collect();
    let agent = Agent::start(&fx, |api| {
        put_defaults(api);
        api.put(Res::Pods, pod("demo", "a", &a, NODE, json!({})));
        api.put(Res::Pods, pod("demo", "b", &b, NODE, json!({})));
    });
    agent.wait_ready();
    let maps = agent.maps();
    wait_record(&maps, ids[0], true);
    wait_record(&maps, ids[1], true);
    assert_eq!(agent.api.lists(Res::Pods), 1);

    // An orderly end of the watch (the server's timeout): the watcher resumes from its
    // resourceVersion, and nothing is lost.
    let watches = agent
        .api
        .seen()
        .iter()
        .filter(|s| s.kind == Some(Res::Pods) && s.watch)
        .count();
    agent.api.end_watches(Res::Pods);
    wait_for(T, || {
        let n = agent
            .api
            .seen()
            .iter()
            .filter(|s| s.kind == Some(Res::Pods) && s.watch)
            .count();
        (n > watches).then_some(())
    })
    .expect("no new watch after the watch ended");
    let last_watch = agent
        .api
        .seen()
        .into_iter()
        .rfind(|s| s.kind == Some(Res::Pods) && s.watch)
        .unwrap();
    assert!(
        last_watch.uri.contains("resourceVersion="),
        "{}",
        last_watch.uri
    );
    agent
        .api
        .put(Res::Pods, pod("demo", "c", &c, NODE, json!({})));
    wait_record(&maps, ids[2], true);

    // A watch error (410 Gone: the version is too old) re-lists.
    wait_for(T, || (agent.api.open_watches(Res::Pods) > 0).then_some(())).expect("no watch");
    agent.api.expire_watches(Res::Pods);
    wait_for(T, || (agent.api.lists(Res::Pods) >= 2).then_some(())).expect("no re-list after 410");

    // The API server goes away: lists fail for a while. Meanwhile pod b is deleted and the event
    // is lost (the log is compacted), and pod d appears. The applied state stays while the API
    // is away; on its return the re-list removes b and adds d.
    // (After the re-list the watcher opens its watch; cut that one, not a request in flight.)
    wait_for(T, || (agent.api.open_watches(Res::Pods) > 0).then_some(())).expect("no watch");
    let lists_before = agent.api.lists(Res::Pods);
    agent.api.fail_next(Res::Pods, 503, 2);
    agent.api.delete_unseen(Res::Pods, "demo", "b");
    agent.api.expire_watches(Res::Pods);
    // The two failed lists: b is still registered then.
    wait_for(T, || {
        (agent.api.lists(Res::Pods) >= lists_before + 2).then_some(())
    })
    .expect("no list attempts");
    assert!(
        maps.policy(ids[1]).is_some(),
        "state must be kept while the API is away"
    );
    agent
        .api
        .put(Res::Pods, pod("demo", "d", &d, NODE, json!({})));
    wait_record(&maps, ids[1], false);
    wait_record(&maps, ids[3], true);
    assert!(maps.policy(ids[0]).is_some() && maps.policy(ids[2]).is_some());
    assert!(agent.api.lists(Res::Pods) >= lists_before + 3);
    assert!(
        agent
            .metrics
            .encode()
            .contains("redirect_kube_watch_errors_total{resource=\"pods\"}")
    );
}

#[test]
fn bad_annotation_posts_an_event_and_keeps_the_last_good_policy() {
    let fx = Fixture::new("kube_events").unwrap();
    let (a, b) = (uid(21), uid(22));
    let cg_a = fx
        .cgroup(&pod_cgroup_rel(Driver::Systemd, "guaranteed", &a))
        .unwrap();
    let cg_b = fx
        .cgroup(&pod_cgroup_rel(Driver::Systemd, "guaranteed", &b))
        .unwrap();
    let key = "traffic.sidecar.istio.io/excludeOutboundPorts";
    let agent = Agent::start(&fx, |api| {
        put_defaults(api);
        api.put(Res::Pods, pod("demo", "a", &a, NODE, json!({key: "5432"})));
    });
    agent.wait_ready();
    let maps = agent.maps();
    let good = wait_record(&maps, cgroup_id(&cg_a).unwrap(), true).unwrap();
    assert!(agent.api.posted_events().is_empty());

    let generation = agent.owner().health().generation();
    agent
        .api
        .put(Res::Pods, pod("demo", "a", &a, NODE, json!({key: "70000"})));
    agent.wait_pass(generation);
    let events = wait_for(T, || {
        let e = agent.api.posted_events();
        (!e.is_empty()).then_some(e)
    })
    .expect("no Event posted");
    let ev = &events[0];
    assert_eq!(ev["reason"], "RedirectPolicyInvalid");
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["regarding"]["kind"], "Pod");
    assert_eq!(ev["regarding"]["name"], "a");
    assert_eq!(ev["regarding"]["uid"], a.as_str());
    let note = ev["note"].as_str().unwrap();
    assert!(note.contains(key) && note.contains("70000"), "{note}");
    assert!(note.contains("last good policy"), "{note}");
    let post = agent
        .api
        .seen()
        .into_iter()
        .find(|s| s.method == http::Method::POST)
        .unwrap();
    assert!(
        post.uri
            .starts_with("/apis/events.k8s.io/v1/namespaces/demo/events"),
        "{}",
        post.uri
    );
    // The last good policy stays, unchanged.
    assert_eq!(maps.policy(cgroup_id(&cg_a).unwrap()), Some(good));
    let metrics = agent.metrics.encode();
    assert!(
        metrics.contains(&format!("key=\"{key}\""))
            && metrics.contains("redirect_workload_policy_error{"),
        "{metrics}"
    );

    // A new pod that is bad from the start runs with the mesh default, and gets its own Event;
    // the first pod's Event is not repeated.
    agent
        .api
        .put(Res::Pods, pod("demo", "b", &b, NODE, json!({key: "x"})));
    wait_record(&maps, cgroup_id(&cg_b).unwrap(), true);
    let events = wait_for(T, || {
        let e = agent.api.posted_events();
        (e.len() >= 2).then_some(e)
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let events_now = agent.api.posted_events();
    assert_eq!(events_now.len(), 2, "{events_now:#?}");
    let note_b = events[1]["note"].as_str().unwrap();
    assert!(
        note_b.contains("mesh default") && note_b.contains("\"x\""),
        "{note_b}"
    );

    // Fixed: the error leaves /metrics.
    let generation = agent.owner().health().generation();
    agent
        .api
        .put(Res::Pods, pod("demo", "a", &a, NODE, json!({key: "5433"})));
    agent
        .api
        .put(Res::Pods, pod("demo", "b", &b, NODE, json!({})));
    agent.wait_pass(generation);
    wait_for(T, || {
        (!agent
            .metrics
            .encode()
            .contains("redirect_workload_policy_error{"))
        .then_some(())
    })
    .expect("the error stays in /metrics after the fix");
}

#[test]
fn missing_meshconfig_crd_means_mesh_defaults() {
    let fx = Fixture::new("kube_nocrd").unwrap();
    let a = uid(31);
    let cg = fx
        .cgroup(&pod_cgroup_rel(Driver::Cgroupfs, "besteffort", &a))
        .unwrap();
    let agent = Agent::start(&fx, |api| {
        api.set_meshconfig_crd(false);
        api.put(Res::Namespaces, namespace("demo", json!({})));
        api.put(Res::Pods, pod("demo", "a", &a, NODE, json!({})));
    });
    agent.wait_ready();
    let maps = agent.maps();
    let rec = wait_record(&maps, cgroup_id(&cg).unwrap(), true).unwrap();
    assert_ne!(rec.flags & flags::ENABLED, 0);
}

#[test]
fn restart_adopts_pinned_state_and_removes_only_what_is_gone() {
    let fx = Fixture::new("kube_restart").unwrap();
    let (a, b, c) = (uid(41), uid(42), uid(43));
    let cg: Vec<u64> = [&a, &b, &c]
        .iter()
        .map(|u| {
            cgroup_id(
                &fx.cgroup(&pod_cgroup_rel(Driver::Systemd, "burstable", u))
                    .unwrap(),
            )
            .unwrap()
        })
        .collect();
    let mut agent = Agent::start(&fx, |api| {
        put_defaults(api);
        api.put(
            Res::Pods,
            pod(
                "demo",
                "a",
                &a,
                NODE,
                json!({"traffic.sidecar.istio.io/excludeOutboundIPRanges": "198.18.5.0/24"}),
            ),
        );
        api.put(Res::Pods, pod("demo", "b", &b, NODE, json!({})));
    });
    agent.wait_ready();
    let maps = agent.maps();
    let rec_a = wait_record(&maps, cg[0], true).unwrap();
    wait_record(&maps, cg[1], true);

    // Sample a's record all through the restart: it must never be missing.
    let stop = Arc::new(AtomicBool::new(false));
    let (missing, samples) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let sampler = std::thread::spawn({
        let (stop, missing, samples) = (stop.clone(), missing.clone(), samples.clone());
        let dir = fx.pin_dir().to_path_buf();
        let id = cg[0];
        move || {
            let maps = PinnedMaps::open(&dir).unwrap();
            while !stop.load(Ordering::Relaxed) {
                if maps.policy(id).is_none() {
                    missing.fetch_add(1, Ordering::Relaxed);
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    });
    agent.stop();
    // While the agent is down: b is deleted, c is created.
    agent.api.delete(Res::Pods, "demo", "b");
    agent
        .api
        .put(Res::Pods, pod("demo", "c", &c, NODE, json!({})));
    assert!(
        maps.policy(cg[1]).is_some(),
        "pinned state stays while the agent is down"
    );
    agent.restart();
    agent.wait_ready();
    wait_record(&maps, cg[1], false);
    wait_record(&maps, cg[2], true);
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(
        missing.load(Ordering::Relaxed),
        0,
        "a's record went missing during the restart"
    );
    assert!(samples.load(Ordering::Relaxed) > 100);
    // Adopted and claimed, not rewritten: same policy id and entries.
    assert_eq!(maps.policy(cg[0]), Some(rec_a));
}
