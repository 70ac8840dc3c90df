//! What a real API server showed (issue #14), replayed against the fake API with real JSON and
//! the real datapath: a MeshConfig the CRD accepts but the agent rejects, Event names and fields
//! at the API's limits (the fake server validates them as kube-apiserver does), Events after a
//! restart, the watch-down gauge, the RBAC the agent needs, and static (mirror) pods.
mod kube_support;

use std::time::Duration;

use kube_support::{
    Agent, Driver, NODE, Res, fake_api::wait_for, meshconfig, options, pod, pod_cgroup_rel,
    put_defaults, uid,
};
use redirect_agent::bpf::PinnedMaps;
use redirect_common::action;
use redirect_tests::{Fixture, cgroup_id};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);
const PORTS_KEY: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";

fn wait_record(maps: &PinnedMaps, cg: u64) -> redirect_common::Policy {
    wait_for(T, || maps.policy(cg)).unwrap_or_else(|| panic!("cgroup {cg} never registered"))
}

/// The excluded ports of the policy on `cg`.
fn excluded_ports(maps: &PinnedMaps, cg: u64) -> Vec<u16> {
    let Some(rec) = maps.policy(cg) else {
        return Vec::new();
    };
    let entries = maps.entries().unwrap();
    let mut out: Vec<u16> = entries
        .get(&rec.policy_id)
        .map(|e| {
            e.ports
                .iter()
                .filter(|(_, a)| **a == action::EXCLUDE)
                .map(|((_, p), _)| *p)
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn events_with(agent: &Agent, reason: &str) -> Vec<Value> {
    agent
        .api
        .posted_events()
        .into_iter()
        .filter(|e| e["reason"] == reason)
        .collect()
}

/// Finding 1: `outboundIPRangeExclusionList: ["10.0.0.0/33"]`. Before the fix a new pod was never
/// registered and an unrelated pod's annotation change was not applied until the MeshConfig was
/// fixed. Now the last valid MeshConfig stays in force, the bad one is reported once, and pods
/// come and change as usual.
#[test]
fn bad_meshconfig_keeps_the_last_valid_one_and_freezes_nothing() {
    let fx = Fixture::new("kube_bad_mc").unwrap();
    let (a, b) = (uid(1401), uid(1402));
    let cg_a = cgroup_id(
        &fx.cgroup(&pod_cgroup_rel(Driver::Systemd, "burstable", &a))
            .unwrap(),
    )
    .unwrap();
    let cg_b_path = fx
        .cgroup_root()
        .join(pod_cgroup_rel(Driver::Systemd, "burstable", &b));
    let agent = Agent::start(&fx, |api| {
        put_defaults(api);
        api.put(
            Res::MeshConfigs,
            meshconfig(json!({"outboundPortExclusionList": [5432]})),
        );
        api.put(Res::Pods, pod("demo", "a", &a, NODE, json!({})));
    });
    agent.wait_ready();
    let maps = agent.maps();
    wait_record(&maps, cg_a);
    assert_eq!(excluded_ports(&maps, cg_a), [5432]);

    let generation = agent.owner().health().generation();
    agent.api.put(
        Res::MeshConfigs,
        meshconfig(json!({"outboundPortExclusionList": [6379],
                          "outboundIPRangeExclusionList": ["10.0.0.0/33"]})),
    );
    let ev = wait_for(T, || {
        events_with(&agent, "RedirectMeshConfigInvalid")
            .into_iter()
            .next()
    })
    .expect("no Event on the MeshConfig");
    assert_eq!(ev["regarding"]["kind"], "MeshConfig");
    assert_eq!(ev["regarding"]["name"], "fsm-mesh-config");
    assert_eq!(
        ev["regarding"]["uid"],
        "5a0d8c3e-55b4-4a8e-9a59-0d0b9a1f3c11"
    );
    let note = ev["note"].as_str().unwrap();
    assert!(
        note.contains("spec.traffic.outboundIPRangeExclusionList")
            && note.contains("10.0.0.0/33")
            && note.contains("last valid MeshConfig"),
        "{note}"
    );
    let metrics = agent.metrics.encode();
    assert!(
        metrics.contains("redirect_meshconfig_rejected 1"),
        "{metrics}"
    );
    // The pod keeps the last valid MeshConfig's exclusions (5432, not the bad object's 6379).
    assert_eq!(excluded_ports(&maps, cg_a), [5432]);

    // A new pod registers, with the MeshConfig in force.
    std::fs::create_dir_all(&cg_b_path).unwrap();
    let cg_b = cgroup_id(&cg_b_path).unwrap();
    agent
        .api
        .put(Res::Pods, pod("demo", "b", &b, NODE, json!({})));
    wait_record(&maps, cg_b);
    assert_eq!(excluded_ports(&maps, cg_b), [5432]);
    // An unrelated pod's own annotation change applies.
    agent.api.put(
        Res::Pods,
        pod("demo", "a", &a, NODE, json!({PORTS_KEY: "8443"})),
    );
    wait_for(T, || (excluded_ports(&maps, cg_a) == [8443]).then_some(()))
        .unwrap_or_else(|| panic!("a's change not applied: {:?}", excluded_ports(&maps, cg_a)));
    // Every pod is registered with a valid policy: ready (docs/kubernetes.md).
    agent.wait_pass(generation);
    assert!(agent.owner().health().ready());
    // Reported once, however many passes run.
    assert_eq!(events_with(&agent, "RedirectMeshConfigInvalid").len(), 1);
    assert!(
        events_with(&agent, "RedirectPolicyInvalid").is_empty(),
        "the pods are not at fault: {:#?}",
        agent.api.posted_events()
    );

    // Fixed: the new MeshConfig is in force everywhere.
    agent.api.put(
        Res::MeshConfigs,
        meshconfig(json!({"outboundPortExclusionList": [6379]})),
    );
    wait_for(T, || (excluded_ports(&maps, cg_b) == [6379]).then_some(()))
        .expect("the fixed MeshConfig did not reach pod b");
    wait_for(T, || {
        agent
            .metrics
            .encode()
            .contains("redirect_meshconfig_rejected 0")
            .then_some(())
    })
    .expect("the rejection stays in /metrics");
}

/// A MeshConfig that was never valid: the built-in defaults, and pods register.
#[test]
fn bad_meshconfig_from_the_start_means_built_in_defaults() {
    let fx = Fixture::new("kube_bad_mc0").unwrap();
    let a = uid(1403);
    let cg_a = cgroup_id(
        &fx.cgroup(&pod_cgroup_rel(Driver::Cgroupfs, "besteffort", &a))
            .unwrap(),
    )
    .unwrap();
    let agent = Agent::start(&fx, |api| {
        put_defaults(api);
        api.put(
            Res::MeshConfigs,
            meshconfig(json!({"outboundPortExclusionList": [5432],
                              "outboundIPRangeExclusionList": ["10.0.0.0/33"]})),
        );
        api.put(Res::Pods, pod("demo", "a", &a, NODE, json!({})));
    });
    agent.wait_ready();
    let maps = agent.maps();
    let rec = wait_record(&maps, cg_a);
    assert_ne!(rec.flags & redirect_common::flags::ENABLED, 0);
    assert!(excluded_ports(&maps, cg_a).is_empty());
    let ev = wait_for(T, || {
        events_with(&agent, "RedirectMeshConfigInvalid")
            .into_iter()
            .next()
    })
    .expect("no Event on the MeshConfig");
    assert!(
        ev["note"].as_str().unwrap().contains("built-in defaults"),
        "{ev}"
    );
}

/// Finding 3: a pod name near the 253-character limit and a node name over 102 characters. Before
/// the fix the API server refused both Events (name over 253, reportingInstance over 128) and the
/// warning repeated on every pass.
#[test]
fn events_for_long_pod_and_node_names_are_accepted() {
    let fx = Fixture::new("kube_long_names").unwrap();
    let a = uid(1404);
    let node = format!("node-{}", "n".repeat(115));
    let pod_name = format!("{}-abcde", "p".repeat(240));
    assert!(pod_name.len() <= 253);
    let cg_a = cgroup_id(
        &fx.cgroup(&pod_cgroup_rel(Driver::Systemd, "besteffort", &a))
            .unwrap(),
    )
    .unwrap();
    let mut opts = options(&fx);
    opts.node_name = node.clone();
    let agent = Agent::start_with(&fx, opts, |api| {
        put_defaults(api);
        api.put(
            Res::Pods,
            pod("demo", &pod_name, &a, &node, json!({PORTS_KEY: "70000"})),
        );
    });
    agent.wait_ready();
    wait_record(&agent.maps(), cg_a);
    let ev = wait_for(T, || agent.api.posted_events().into_iter().next()).unwrap_or_else(|| {
        panic!(
            "no Event accepted; refused: {:#?}",
            agent.api.rejected_events()
        )
    });
    assert!(agent.api.rejected_events().is_empty());
    let name = ev["metadata"]["name"].as_str().unwrap();
    assert!(name.len() <= 253 && name.starts_with("ppp"), "{name}");
    assert_eq!(ev["regarding"]["name"], pod_name.as_str());
    let instance = ev["reportingInstance"].as_str().unwrap();
    assert!(
        instance.len() <= 128 && instance.starts_with("flomesh.io/redirect-agent-node-"),
        "{instance}"
    );
}

/// Finding 4: Events were posted again after every restart. Now the Events that exist count.
#[test]
fn a_restart_does_not_post_the_same_events_again() {
    let fx = Fixture::new("kube_ev_restart").unwrap();
    let (a, b) = (uid(1405), uid(1406));
    let cg_a = cgroup_id(
        &fx.cgroup(&pod_cgroup_rel(Driver::Systemd, "guaranteed", &a))
            .unwrap(),
    )
    .unwrap();
    let cg_b = cgroup_id(
        &fx.cgroup(&pod_cgroup_rel(Driver::Systemd, "guaranteed", &b))
            .unwrap(),
    )
    .unwrap();
    let mut agent = Agent::start(&fx, |api| {
        put_defaults(api);
        api.put(
            Res::Pods,
            pod("demo", "a", &a, NODE, json!({PORTS_KEY: "5432"})),
        );
        api.put(
            Res::MeshConfigs,
            meshconfig(json!({"outboundIPRangeExclusionList": ["10.0.0.0/33"]})),
        );
    });
    agent.wait_ready();
    wait_record(&agent.maps(), cg_a);
    // Good first, then bad: "keeping its last good policy", before and after the restart. (A pod
    // bad from its first sight says "mesh default" first and "last good" after a restart: that is
    // issue #14 item 2, the reconcile's fallback, not the Event publisher.)
    agent.api.put(
        Res::Pods,
        pod("demo", "a", &a, NODE, json!({PORTS_KEY: "x"})),
    );
    wait_for(T, || (agent.api.posted_events().len() == 2).then_some(()))
        .unwrap_or_else(|| panic!("{:#?}", agent.api.posted_events()));
    assert!(
        agent.api.event_lists() >= 2,
        "existing Events are looked up"
    );

    agent.restart();
    agent.wait_ready();
    // A new finding after the restart is posted (so the publisher is running) ...
    let generation = agent.owner().health().generation();
    agent.api.put(
        Res::Pods,
        pod("demo", "b", &b, NODE, json!({PORTS_KEY: "y"})),
    );
    wait_record(&agent.maps(), cg_b);
    agent.wait_pass(generation);
    wait_for(T, || (agent.api.posted_events().len() >= 3).then_some(()))
        .expect("the publisher posts nothing after the restart");
    std::thread::sleep(Duration::from_millis(300));
    // ... and the two from before are not.
    let events = agent.api.posted_events();
    assert_eq!(events.len(), 3, "{events:#?}");
    assert_eq!(events[2]["regarding"]["name"], "b");
    // Nothing patches Events (deploy/base/rbac.yaml grants create and list only).
    assert!(
        agent
            .api
            .seen()
            .iter()
            .all(|s| s.method == http::Method::GET || s.method == http::Method::POST),
        "{:#?}",
        agent.api.seen()
    );
}

/// Finding 5: `/metrics` says how long each watch has been down, and a healthy re-list sets it
/// back to 0.
#[test]
fn watch_down_seconds_while_the_api_is_away() {
    let fx = Fixture::new("kube_watch_down").unwrap();
    let agent = Agent::start(&fx, put_defaults);
    agent.wait_ready();
    let gauge = |text: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with("redirect_kube_watch_down_seconds{resource=\"pods\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    assert_eq!(gauge(&agent.metrics.encode()), Some(0.0));
    wait_for(T, || (agent.api.open_watches(Res::Pods) > 0).then_some(())).expect("no watch");
    // Four failed attempts: 0.5 + 1 + 2 s of backoff before the fifth succeeds.
    agent.api.fail_next(Res::Pods, 503, 4);
    agent.api.expire_watches(Res::Pods);
    wait_for(T, || gauge(&agent.metrics.encode()).filter(|s| *s > 0.0)).expect("not down");
    wait_for(T, || (agent.api.lists(Res::Pods) >= 3).then_some(())).expect("no re-list");
    wait_for(T, || gauge(&agent.metrics.encode()).filter(|s| *s == 0.0))
        .expect("still down after a successful re-list");
}

/// Finding 6: the RBAC the agent needs for Events is create and list.
#[test]
fn rbac_grants_events_create_and_list_only() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/base/rbac.yaml"
    ))
    .unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let at = lines
        .iter()
        .position(|l| *l == r#"resources: ["events"]"#)
        .expect("no events rule");
    assert_eq!(lines[at + 1], r#"verbs: ["create", "list"]"#);
    assert!(!text.contains("\"patch\""), "nothing patches");
}

/// Finding 11: a static pod's mirror has its own API UID; the kubelet runs the static pod (and
/// names its cgroup) under the config hash in `kubernetes.io/config.mirror`.
#[test]
fn static_pods_match_by_config_hash() {
    let fx = Fixture::new("kube_static").unwrap();
    let hash = format!(
        "{:032x}",
        0x5eed_u128 << 64 | u128::from(std::process::id())
    );
    let mirror_uid = uid(1407);
    let cg = cgroup_id(
        &fx.cgroup(&pod_cgroup_rel(Driver::Systemd, "burstable", &hash))
            .unwrap(),
    )
    .unwrap();
    let agent = Agent::start(&fx, |api| {
        put_defaults(api);
        let mut p = pod(
            "demo",
            &format!("static-app-{NODE}"),
            &mirror_uid,
            NODE,
            json!({"kubernetes.io/config.mirror": hash, "kubernetes.io/config.hash": hash,
                   "kubernetes.io/config.source": "file"}),
        );
        p["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Node",
            "name": NODE, "uid": "6b8f0e1c-0000-4000-8000-000000000001", "controller": true}]);
        api.put(Res::Pods, p);
    });
    agent.wait_ready();
    wait_record(&agent.maps(), cg);
}
