//! Per-pod decision counters (issue #14 item 10) in the real kernel: two meshed pods with the
//! same policy make known connects (redirected, bypassed by an excluded port); `POD_STATS`
//! holds exact counts per pod (not per policy), `/metrics` shows them with namespace and pod
//! labels, and a deleted pod's entry goes after the grace period while the other stays.
mod kube_support;

use std::time::Duration;

use kube_support::{
    Agent, Driver, NODE, Res, fake_api::wait_for, pod, pod_cgroup_rel, put_defaults, uid,
};
use redirect_common::Decision;
use redirect_tests::{
    Fixture, Reached, Spawned, cgroup_id, probe, serve_identity, start_testproxy,
};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn slot(d: Decision) -> usize {
    d as usize
}

#[test]
fn per_pod_counts_are_exact_and_go_with_the_pod() {
    let fx = Fixture::new("kube_podstats").unwrap();
    fx.add_addr("198.18.0.10/32").unwrap();
    let _backend = serve_identity(&fx, "198.18.0.10:80".parse().unwrap(), "backend").unwrap();
    let _other = serve_identity(&fx, "198.18.0.10:8080".parse().unwrap(), "other").unwrap();
    let proxy_cg = fx.cgroup("proxy").unwrap();
    let _proxy: Spawned = start_testproxy(&fx, &proxy_cg, &["127.0.0.1:15001"]).unwrap();
    let (ua, ub) = (uid(7100), uid(7101));
    let rel_a = pod_cgroup_rel(Driver::Systemd, "burstable", &ua);
    let rel_b = pod_cgroup_rel(Driver::Cgroupfs, "besteffort", &ub);
    let (pod_a, pod_b) = (fx.cgroup(&rel_a).unwrap(), fx.cgroup(&rel_b).unwrap());
    let app_a = fx.cgroup(&format!("{rel_a}/app")).unwrap();
    let app_b = fx.cgroup(&format!("{rel_b}/app")).unwrap();
    let excluded = json!({"traffic.sidecar.istio.io/excludeOutboundPorts": "8080"});
    let agent = Agent::start(&fx, |api| {
        put_defaults(api);
        api.put(Res::Pods, pod("demo", "a", &ua, NODE, excluded.clone()));
        api.put(Res::Pods, pod("demo", "b", &ub, NODE, excluded.clone()));
    });
    agent.wait_ready();
    let maps = agent.maps();
    let (id_a, id_b) = (cgroup_id(&pod_a).unwrap(), cgroup_id(&pod_b).unwrap());
    wait_for(T, || {
        let s = maps.pod_decisions().unwrap();
        (s.contains_key(&id_a) && s.contains_key(&id_b)).then_some(())
    })
    .expect("no POD_STATS entries for the registered pods");

    // Known connects: a 3 redirected + 2 bypassed, b 1 redirected + 4 bypassed.
    let run = |app: &std::path::Path, redirected: usize, bypassed: usize| {
        for _ in 0..redirected {
            let r = probe(&fx, app, "198.18.0.10:80", &[]).unwrap();
            assert!(
                matches!(&r, Reached::Proxy { orig } if orig == "198.18.0.10:80"),
                "{r:?}"
            );
        }
        for _ in 0..bypassed {
            let r = probe(&fx, app, "198.18.0.10:8080", &[]).unwrap();
            assert_eq!(r, Reached::Server("other".into()));
        }
    };
    run(&app_a, 3, 2);
    run(&app_b, 1, 4);
    let stats = maps.pod_decisions().unwrap();
    let (a, b) = (stats[&id_a], stats[&id_b]);
    let mut want_a = [0u64; Decision::ALL.len()];
    want_a[slot(Decision::Redirected)] = 3;
    want_a[slot(Decision::BypassPort)] = 2;
    let mut want_b = [0u64; Decision::ALL.len()];
    want_b[slot(Decision::Redirected)] = 1;
    want_b[slot(Decision::BypassPort)] = 4;
    assert_eq!(a, want_a, "pod a");
    assert_eq!(b, want_b, "pod b");
    // Both pods share one policy id: the counts are per pod, not per policy.
    assert_eq!(
        maps.policy(id_a).unwrap().policy_id,
        maps.policy(id_b).unwrap().policy_id
    );

    let text = agent.metrics.encode();
    for needle in [
        "redirect_pod_decisions_total{namespace=\"demo\",pod=\"a\",decision=\"redirected\"} 3",
        "redirect_pod_decisions_total{namespace=\"demo\",pod=\"a\",decision=\"bypass_port\"} 2",
        "redirect_pod_decisions_total{namespace=\"demo\",pod=\"b\",decision=\"redirected\"} 1",
        "redirect_pod_decisions_total{namespace=\"demo\",pod=\"b\",decision=\"bypass_port\"} 4",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let inspect = redirect_tests::inspect(fx.pin_dir()).unwrap();
    let w = inspect["workload_counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["cgroup_id"] == id_a)
        .expect("pod a in inspect")
        .clone();
    assert_eq!(w["decisions"]["redirected"], 3, "{w}");
    assert_eq!(w["decisions"]["bypass_port"], 2, "{w}");
    // A connect counts once, per pod or in the node array; the node totals add both.
    let node_totals = |why: &str| {
        let c = redirect_tests::inspect(fx.pin_dir()).unwrap()["counters"].clone();
        assert_eq!(c["redirected"], 4, "{why}: {c}");
        assert_eq!(c["bypass_port"], 6, "{why}: {c}");
    };
    node_totals("both pods registered");

    // Pod a goes: its record at once, its counts after the grace period; b's stay as they are.
    agent.api.delete(Res::Pods, "demo", "a");
    wait_for(T, || maps.policy(id_a).is_none().then_some(())).expect("a still registered");
    wait_for(T, || {
        (!maps.pod_decisions().unwrap().contains_key(&id_a)).then_some(())
    })
    .expect("a's POD_STATS entry was not deleted");
    assert_eq!(maps.pod_decisions().unwrap()[&id_b], want_b);
    // a's counts were folded into the retired entry before its own went: nothing lost.
    node_totals("after a's entry was deleted");
}
