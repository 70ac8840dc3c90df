use std::collections::BTreeSet;

use super::*;
use crate::{MeshTraffic, Resolved, resolve, test_inputs::ann};

fn inputs<'a>(
    mesh: &'a MeshTraffic,
    ns: &'a crate::Annotations,
    pod: &'a crate::Annotations,
) -> WorkloadInputs<'a> {
    WorkloadInputs {
        mesh,
        namespace: "demo",
        namespace_annotations: ns,
        name: "app",
        pod_annotations: pod,
    }
}

fn values<T: Clone + Ord>(l: &[crate::Sourced<T>]) -> BTreeSet<T> {
    l.iter().map(|s| s.value.clone()).collect()
}

/// [`additions`] against [`resolve`]: `Some` only where `resolve` gives the mesh default plus the
/// additions, and the same error where `resolve` fails.
fn check(mesh: &MeshTraffic, ns: &[(&str, &str)], pod: &[(&str, &str)]) -> Option<Additions> {
    let (ns, pod, empty) = (ann(ns), ann(pod), ann(&[]));
    let layer = MeshLayer::parse(mesh);
    let whole = resolve(&inputs(mesh, &ns, &pod));
    let layer = match layer {
        Ok(l) => l,
        Err(e) => {
            assert_eq!(whole.unwrap_err(), e);
            return None;
        }
    };
    let got = additions(&layer, &inputs(mesh, &ns, &pod));
    let whole: Resolved = match (whole, got.clone()) {
        (Err(a), Err(b)) => {
            assert_eq!(a, b);
            return None;
        }
        (Ok(w), Ok(_)) => w,
        (a, b) => panic!("resolve {a:?} but additions {b:?}"),
    };
    let a = got.unwrap()?;
    let base = resolve(&inputs(mesh, &ns, &empty)).expect("the mesh default resolves");
    let (w, b) = (&whole.policy, &base.policy);
    let mut cidrs = values(&b.exclude_cidrs);
    cidrs.extend(a.exclude_cidrs.iter().cloned());
    assert_eq!(values(&w.exclude_cidrs), cidrs);
    let mut ports = values(&b.exclude_ports);
    ports.extend(a.exclude_ports.iter().cloned());
    assert_eq!(values(&w.exclude_ports), ports);
    // Everything else is the mesh default's, with the pod's DNS, warnings and inbound error.
    let strip = |p: &EffectivePolicy| EffectivePolicy {
        exclude_cidrs: vec![],
        exclude_ports: vec![],
        dns: Default::default(),
        ..p.clone()
    };
    assert_eq!(strip(w), strip(b));
    assert_eq!(w.dns, a.dns);
    assert_eq!(whole.warnings, a.warnings);
    assert_eq!(whole.inbound_error, a.inbound_error);
    Some(a)
}

const FSM_IPS: &str = "flomesh.io/outbound-ip-range-exclusion-list";
const OSM_PORTS: &str = "openservicemesh.io/outbound-port-exclusion-list";

fn mesh() -> MeshTraffic {
    MeshTraffic {
        outbound_ip_range_exclusion_list: vec!["10.0.0.0/8".into(), "192.168.1.0/24".into()],
        outbound_port_exclusion_list: vec![serde_json::json!(22)],
        ..MeshTraffic::default()
    }
}

#[test]
fn union_exclusions_are_additions_over_the_mesh_default() {
    let m = mesh();
    let a = check(&m, &[], &[(FSM_IPS, "172.16.0.0/16, 10.0.0.0/8")]).expect("additions");
    assert_eq!(a.exclude_cidrs.len(), 2);
    let a = check(&m, &[], &[(OSM_PORTS, "5432,22")]).expect("additions");
    assert_eq!(a.exclude_ports.len(), 2);
    // Over a namespace that overrides the mesh list, and with a namespace union of its own.
    let ns = [
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.1.0.0/16",
        ),
        (OSM_PORTS, "8080"),
    ];
    check(&m, &ns, &[(FSM_IPS, "10.2.0.0/16")]).expect("additions");
    // A host-bits warning of the pod's comes out where resolve puts it.
    check(&m, &ns, &[(FSM_IPS, "10.2.0.1/16")]).expect("additions");
    // DNS keys alongside: the pod's DNS policy comes with the additions.
    check(
        &m,
        &[],
        &[(FSM_IPS, "10.3.0.0/16"), ("kuma.io/builtin-dns", "enabled")],
    );
}

#[test]
fn anything_but_union_exclusions_is_resolved_whole() {
    let m = mesh();
    for pod in [
        &[(
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.9.0.0/16",
        )][..],
        &[("traffic.sidecar.istio.io/includeOutboundPorts", "80")],
        &[("flomesh.io/outbound-ip-range-inclusion-list", "10.0.0.0/8")],
        &[("config.linkerd.io/proxy-uid", "2102")],
        &[("sidecar.istio.io/interceptionMode", "NONE")],
        &[
            (FSM_IPS, "10.4.0.0/16"),
            ("traffic.sidecar.istio.io/excludeInboundPorts", "9090"),
        ],
    ] {
        assert_eq!(check(&m, &[], pod), None, "{pod:?}");
    }
}

#[test]
fn errors_are_resolves() {
    let m = mesh();
    // A bad pod value, a bad namespace value, a bad inbound value, a bad mesh value.
    assert_eq!(check(&m, &[], &[(FSM_IPS, "10.0.0.0/33")]), None);
    assert_eq!(
        check(&m, &[(FSM_IPS, "nope")], &[(FSM_IPS, "10.5.0.0/16")]),
        None
    );
    let bad_inbound = [
        (FSM_IPS, "10.6.0.0/16"),
        ("flomesh.io/inbound-port-exclusion-list", "x"),
    ];
    check(&m, &[], &bad_inbound);
    let bad_mesh = MeshTraffic {
        outbound_ip_range_exclusion_list: vec!["300.0.0.0/8".into()],
        ..MeshTraffic::default()
    };
    assert_eq!(check(&bad_mesh, &[], &[(FSM_IPS, "10.7.0.0/16")]), None);
    // Conflicting proxy uids on the namespace: the same error either way.
    let ns = [
        ("config.linkerd.io/proxy-uid", "2102"),
        ("kuma.io/sidecar-uid", "5678"),
    ];
    assert_eq!(check(&m, &ns, &[(FSM_IPS, "10.8.0.0/16")]), None);
}
