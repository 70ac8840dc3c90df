//! `explain --pod`: the pod, its namespace and the MeshConfig read from the API (kube's mock
//! service with real API JSON), and the pod's cgroup found in a real kubepods tree.
mod kube_support;

use kube_support::{Driver, NODE, Res, meshconfig, namespace, plain_pod, pod, pod_cgroup_rel, uid};
use redirect_tests::Fixture;
use serde_json::json;

#[test]
fn explain_pod_reads_the_api_and_finds_the_cgroup() {
    use redirect_agent::{
        policy::{self, Step, WorkloadInputs},
        source::kube::explain::{ExplainError, pod_config},
    };
    let fx = Fixture::new("kube_explain").unwrap();
    let (a, b) = (uid(51), uid(52));
    let cg_a = fx
        .cgroup(&pod_cgroup_rel(Driver::Systemd, "burstable", &a))
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let (client, api) = kube_support::fake_api::FakeApi::start();
    api.put(
        Res::Namespaces,
        namespace(
            "demo",
            json!({"traffic.sidecar.istio.io/excludeOutboundIPRanges": "198.18.0.10/32"}),
        ),
    );
    api.put(
        Res::MeshConfigs,
        meshconfig(json!({"outboundPortExclusionList": [5432]})),
    );
    api.put(
        Res::Pods,
        pod(
            "demo",
            "a",
            &a,
            NODE,
            json!({"traffic.sidecar.istio.io/includeOutboundPorts": "6379"}),
        ),
    );
    api.put(Res::Pods, plain_pod("demo", "b", &b, NODE));
    let opts = kube_support::options(&fx);
    let config = rt
        .block_on(pod_config(client.clone(), "demo", "a", &opts))
        .unwrap();
    let w = config.workload("demo", "a").unwrap();
    assert_eq!(w.cgroup, cg_a);
    assert_eq!(config.proxy.uid, Some(1337));
    let ns = config.namespace_annotations("demo");
    let resolved = policy::resolve(&WorkloadInputs {
        mesh: &config.mesh,
        namespace: "demo",
        namespace_annotations: &ns,
        name: "a",
        pod_annotations: &w.annotations,
    })
    .unwrap();
    let v = policy::evaluate(&resolved.policy, "198.18.0.10:80".parse().unwrap(), false);
    assert_eq!((v.redirect, v.step), (false, Step::ExcludedCidr));
    assert!(v.source.unwrap().to_string().contains("namespace demo"));
    let v = policy::evaluate(&resolved.policy, "198.18.0.11:5432".parse().unwrap(), false);
    assert_eq!(
        (v.redirect, v.step),
        (false, Step::ExcludedPort),
        "the MeshConfig's port"
    );
    let v = policy::evaluate(&resolved.policy, "198.18.0.11:80".parse().unwrap(), false);
    assert!(v.redirect);
    let v = policy::evaluate(&resolved.policy, "198.18.0.11:6379".parse().unwrap(), false);
    assert_eq!(
        (v.redirect, v.step),
        (true, Step::IncludedPort),
        "the pod's own annotation"
    );
    // Requests went where the agent's go.
    assert!(
        api.seen()
            .iter()
            .any(|s| s.uri.starts_with("/api/v1/namespaces/demo/pods/a"))
    );
    // A pod that is not in the mesh is said so.
    let err = rt
        .block_on(pod_config(client, "demo", "b", &opts))
        .unwrap_err();
    assert!(matches!(err, ExplainError::NotMeshed(..)), "{err}");
}
