//! End to end in the real kernel: the agent's Kubernetes source on a mocked API server, a real
//! kubepods cgroup and netns as the pod, and redirect-testproxy as its sidecar. Annotation,
//! namespace and MeshConfig changes flip destinations between redirected and bypassed live,
//! with nothing restarted; the watch-event → map-applied latency is measured (printed, never
//! asserted).
mod kube_support;

use std::{path::Path, time::Duration, time::Instant};

use kube_support::{
    Agent, Driver, NODE, Res, fake_api::wait_for, meshconfig, namespace, percentile, pod,
    pod_cgroup_rel, poll_until, put_defaults, uid,
};
use redirect_tests::{Fixture, Reached, cgroup_id, helper_bin, probe, serve_identity};
use serde_json::{Value, json};

const KEY: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";

fn reached(fx: &Fixture, app: &Path, dest: &str) -> Reached {
    probe(fx, app, dest, &[]).unwrap()
}

fn via_proxy(dest: &str) -> Reached {
    Reached::Proxy { orig: dest.into() }
}

fn direct(dest: &str) -> Reached {
    Reached::Server(dest.into())
}

/// Waits until `dest` is reached as `want` (each probe is a new connect by a new process; the
/// pod, the agent and the proxy keep running).
fn expect(fx: &Fixture, app: &Path, dest: &str, want: Reached) {
    let got = wait_for(Duration::from_secs(10), || {
        let r = reached(fx, app, dest);
        (r == want).then_some(r)
    });
    assert!(
        got.is_some(),
        "{dest}: expected {want:?}, got {:?}",
        reached(fx, app, dest)
    );
}

#[test]
fn annotation_update_flips_redirect_live() {
    let fx = Fixture::new("kube_e2e").unwrap();
    let mut servers = Vec::new();
    for a in ["198.18.0.10", "198.18.0.11"] {
        fx.add_addr(&format!("{a}/32")).unwrap();
        let addr = format!("{a}:80");
        servers.push(serve_identity(&fx, addr.parse().unwrap(), &addr).unwrap());
    }
    let u = uid(7);
    let rel = pod_cgroup_rel(Driver::Systemd, "burstable", &u);
    let pod_cg = fx.cgroup(&rel).unwrap();
    let app = fx.cgroup(&format!("{rel}/app")).unwrap();
    let proxy_cg = fx.cgroup(&format!("{rel}/istio-proxy")).unwrap();
    // The sidecar runs as uid 1337 (the pod's istio-proxy runAsUser), which the agent exempts.
    let _proxy = fx
        .spawn_logged(
            &proxy_cg,
            std::process::Command::new(helper_bin("redirect-testproxy").unwrap()).args([
                "--listen",
                "127.0.0.1:15001",
                "--uid",
                "1337",
            ]),
        )
        .unwrap();
    _proxy
        .wait_for_prefix("listening ", Duration::from_secs(10))
        .expect("testproxy did not start");
    let mk = |ann: Value| pod("demo", "app", &u, NODE, ann);
    let agent = Agent::start(&fx, |api| {
        put_defaults(api);
        api.put(Res::MeshConfigs, meshconfig(json!({})));
        api.put(Res::Pods, mk(json!({})));
    });
    agent.wait_ready();
    let maps = agent.maps();
    let id = cgroup_id(&pod_cg).unwrap();
    wait_for(Duration::from_secs(10), || maps.policy(id)).expect("pod not registered");

    let (d10, d11) = ("198.18.0.10:80", "198.18.0.11:80");
    expect(&fx, &app, d10, via_proxy(d10));
    expect(&fx, &app, d11, via_proxy(d11));

    // The pod annotation excludes .11: bypassed from now on, .10 still redirected.
    agent.api.put(Res::Pods, mk(json!({KEY: "198.18.0.11/32"})));
    expect(&fx, &app, d11, direct(d11));
    expect(&fx, &app, d10, via_proxy(d10));
    // And back.
    agent.api.put(Res::Pods, mk(json!({})));
    expect(&fx, &app, d11, via_proxy(d11));

    // The namespace's annotation, then the MeshConfig, apply live too.
    agent.api.put(
        Res::Namespaces,
        namespace("demo", json!({KEY: "198.18.0.10/32"})),
    );
    expect(&fx, &app, d10, direct(d10));
    agent.api.put(Res::Namespaces, namespace("demo", json!({})));
    expect(&fx, &app, d10, via_proxy(d10));
    agent.api.put(
        Res::MeshConfigs,
        meshconfig(json!({"outboundPortExclusionList": [80]})),
    );
    expect(&fx, &app, d10, direct(d10));
    expect(&fx, &app, d11, direct(d11));
    agent.api.put(Res::MeshConfigs, meshconfig(json!({})));
    expect(&fx, &app, d10, via_proxy(d10));

    // Latency from the watch event to the map applied: alternate the annotation and watch the
    // cgroup's record change (every change gets a new policy id).
    let mut samples = Vec::new();
    for i in 0..200 {
        let before = maps.policy(id).unwrap().policy_id;
        let ann = if i % 2 == 0 {
            json!({KEY: format!("198.18.{}.0/24", 100 + i % 50)})
        } else {
            json!({})
        };
        let sent = Instant::now();
        agent.api.put(Res::Pods, mk(ann));
        let done = poll_until(Duration::from_secs(5), || {
            maps.policy(id).is_some_and(|p| p.policy_id != before)
        })
        .expect("annotation change not applied");
        samples.push(done - sent);
    }
    samples.sort();
    println!(
        "watch event → map applied over {} annotation updates: p50 {:?} p99 {:?} max {:?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples.last().unwrap()
    );
    let text = agent.metrics.encode();
    let line = text
        .lines()
        .find(|l| l.starts_with("redirect_reconcile_latency_seconds_count"))
        .unwrap();
    println!("agent histogram: {line}");
    assert!(text.contains("redirect_decisions_total{decision=\"redirected\"}"));
}
