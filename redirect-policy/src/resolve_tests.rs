//! Precedence tests: pod over namespace over mesh, field by field; unions; enabling.

use super::*;
use crate::dialect::keys::{istio, kuma, linkerd};
use crate::mesh::{KEY_EXCLUDE_CIDRS, KEY_EXCLUDE_PORTS, KEY_MODE};
use crate::test_inputs::{run, run_pod};
use crate::types::{PortRange, Step};
use crate::{MeshTraffic, evaluate};

fn cidrs(l: &[Sourced<ipnet::IpNet>]) -> Vec<String> {
    l.iter().map(|s| s.value.to_string()).collect()
}

fn ports(l: &[Sourced<PortRange>]) -> Vec<String> {
    l.iter().map(|s| s.value.to_string()).collect()
}

fn pod_src(key: &str) -> Source {
    Source::new(Origin::Pod("demo/app".into()), key)
}

fn ns_src(key: &str) -> Source {
    Source::new(Origin::Namespace("demo".into()), key)
}

fn mesh_with_excludes() -> MeshTraffic {
    MeshTraffic {
        outbound_ip_range_exclusion_list: vec!["1.1.1.1/32".into()],
        outbound_port_exclusion_list: vec![serde_json::json!(6379)],
        ..Default::default()
    }
}

#[test]
fn defaults_include_everything() {
    let r = run_pod(&[]).unwrap();
    let p = r.policy;
    assert!(p.enabled && p.enabled_source.is_none());
    assert_eq!(cidrs(&p.include_cidrs), vec!["0.0.0.0/0", "::/0"]);
    assert_eq!(p.include_cidrs[0].source.origin, Origin::Default);
    assert!(p.exclude_cidrs.is_empty() && p.exclude_ports.is_empty());
    assert_eq!(p.inbound_include_ports, None);
    assert!(r.warnings.is_empty());
}

#[test]
fn mesh_lists_apply() {
    let mesh = MeshTraffic {
        outbound_ip_range_inclusion_list: vec!["10.0.0.0/8".into()],
        network_interface_exclusion_list: vec!["eth1".into()],
        inbound_port_exclusion_list: vec![serde_json::json!(9090)],
        ..mesh_with_excludes()
    };
    let p = run(&mesh, &[], &[]).unwrap().policy;
    assert_eq!(cidrs(&p.exclude_cidrs), vec!["1.1.1.1/32"]);
    assert_eq!(
        p.exclude_cidrs[0].source,
        Source::new(Origin::Mesh, KEY_EXCLUDE_CIDRS)
    );
    assert_eq!(cidrs(&p.include_cidrs), vec!["10.0.0.0/8"]);
    assert_eq!(ports(&p.exclude_ports), vec!["6379"]);
    assert_eq!(ports(&p.inbound_exclude_ports), vec!["9090"]);
    assert_eq!(p.exclude_interfaces[0].value, "eth1");
}

#[test]
fn istio_pod_over_namespace_over_mesh_per_field() {
    let ns = [
        (istio::EXCLUDE_OUTBOUND_IP_RANGES, "2.2.2.2/32"),
        (istio::EXCLUDE_OUTBOUND_PORTS, "25"),
    ];
    let pod = [(istio::EXCLUDE_OUTBOUND_IP_RANGES, "3.3.3.3/32")];
    let p = run(&mesh_with_excludes(), &ns, &pod).unwrap().policy;
    // CIDRs: pod wins; ports: the namespace wins over the mesh.
    assert_eq!(cidrs(&p.exclude_cidrs), vec!["3.3.3.3/32"]);
    assert_eq!(
        p.exclude_cidrs[0].source,
        pod_src(istio::EXCLUDE_OUTBOUND_IP_RANGES)
    );
    assert_eq!(ports(&p.exclude_ports), vec!["25"]);
    assert_eq!(
        p.exclude_ports[0].source,
        ns_src(istio::EXCLUDE_OUTBOUND_PORTS)
    );
    // An empty pod value overrides to nothing.
    let pod = [(istio::EXCLUDE_OUTBOUND_PORTS, "")];
    let p = run(&mesh_with_excludes(), &ns, &pod).unwrap().policy;
    assert!(p.exclude_ports.is_empty());
    assert_eq!(cidrs(&p.exclude_cidrs), vec!["2.2.2.2/32"]);
}

#[test]
fn fsm_and_osm_union_with_mesh_and_overrides() {
    let pod = [
        ("flomesh.io/outbound-ip-range-exclusion-list", "4.4.4.4/32"),
        (
            "openservicemesh.io/outbound-port-exclusion-list",
            "3306,6379",
        ),
    ];
    let p = run(&mesh_with_excludes(), &[], &pod).unwrap().policy;
    assert_eq!(cidrs(&p.exclude_cidrs), vec!["1.1.1.1/32", "4.4.4.4/32"]);
    // Duplicates keep their first source (the mesh).
    assert_eq!(ports(&p.exclude_ports), vec!["6379", "3306"]);
    assert_eq!(
        p.exclude_ports[0].source,
        Source::new(Origin::Mesh, KEY_EXCLUDE_PORTS)
    );
    // An Istio pod override replaces the mesh list; the FSM union still adds.
    let pod = [
        ("flomesh.io/outbound-ip-range-exclusion-list", "4.4.4.4/32"),
        (istio::EXCLUDE_OUTBOUND_IP_RANGES, "5.5.5.5/32"),
    ];
    let p = run(&mesh_with_excludes(), &[], &pod).unwrap().policy;
    assert_eq!(cidrs(&p.exclude_cidrs), vec!["5.5.5.5/32", "4.4.4.4/32"]);
}

#[test]
fn fsm_inclusion_list_restricts_when_mesh_includes_all() {
    let pod = [("flomesh.io/outbound-ip-range-inclusion-list", "10.0.0.0/8")];
    let p = run_pod(&pod).unwrap().policy;
    assert_eq!(cidrs(&p.include_cidrs), vec!["10.0.0.0/8"]);
    // Istio `*` on the namespace plus an FSM pod list: `*` still covers everything.
    let ns = [(istio::INCLUDE_OUTBOUND_IP_RANGES, "*")];
    let pod = [("flomesh.io/outbound-ip-range-inclusion-list", "10.0.0.0/8")];
    let p = run(&MeshTraffic::default(), &ns, &pod).unwrap().policy;
    assert_eq!(
        cidrs(&p.include_cidrs),
        vec!["0.0.0.0/0", "::/0", "10.0.0.0/8"]
    );
}

#[test]
fn empty_include_ranges_disable_unless_ports_included() {
    let pod = [(istio::INCLUDE_OUTBOUND_IP_RANGES, "")];
    let p = run_pod(&pod).unwrap().policy;
    assert!(!p.enabled);
    assert_eq!(
        p.enabled_source,
        Some(pod_src(istio::INCLUDE_OUTBOUND_IP_RANGES))
    );
    let v = evaluate(&p, "1.2.3.4:80".parse().unwrap(), false);
    assert_eq!((v.redirect, v.step), (false, Step::Disabled));
    assert_eq!(
        v.source.unwrap().to_string(),
        "pod demo/app annotation traffic.sidecar.istio.io/includeOutboundIPRanges"
    );

    let pod = [
        (istio::INCLUDE_OUTBOUND_IP_RANGES, ""),
        (istio::INCLUDE_OUTBOUND_PORTS, "6379"),
    ];
    let p = run_pod(&pod).unwrap().policy;
    assert!(p.enabled);
    let v = evaluate(&p, "1.2.3.4:6379".parse().unwrap(), false);
    assert_eq!((v.redirect, v.step), (true, Step::IncludedPort));
    let v = evaluate(&p, "1.2.3.4:80".parse().unwrap(), false);
    assert_eq!((v.redirect, v.step), (false, Step::NotIncluded));
}

#[test]
fn interception_mode() {
    let ns = [(istio::INTERCEPTION_MODE, "NONE")];
    let p = run(&MeshTraffic::default(), &ns, &[]).unwrap().policy;
    assert!(!p.enabled);
    assert_eq!(p.enabled_source, Some(ns_src(istio::INTERCEPTION_MODE)));
    let pod = [(istio::INTERCEPTION_MODE, "REDIRECT")];
    let p = run(&MeshTraffic::default(), &ns, &pod).unwrap().policy;
    assert!(p.enabled);
    assert_eq!(p.mode.unwrap().value.raw, "REDIRECT");

    let mesh = MeshTraffic {
        interception_mode: Some("PodLevel".into()),
        enable_egress: Some(false),
        ..Default::default()
    };
    let p = run(&mesh, &[], &[]).unwrap().policy;
    assert!(
        p.enabled,
        "FSM modes and enableEgress do not change interception"
    );
    let mesh = MeshTraffic {
        interception_mode: Some("none".into()),
        ..Default::default()
    };
    let p = run(&mesh, &[], &[]).unwrap().policy;
    assert_eq!(p.enabled_source, Some(Source::new(Origin::Mesh, KEY_MODE)));
}

#[test]
fn linkerd_namespace_applies_where_the_pod_has_none() {
    let ns = [
        (linkerd::SKIP_OUTBOUND_PORTS, "4567-4568"),
        (linkerd::PROXY_UID, "2102"),
    ];
    let p = run(&MeshTraffic::default(), &ns, &[]).unwrap().policy;
    assert_eq!(ports(&p.exclude_ports), vec!["4567-4568"]);
    assert_eq!(p.proxy_uid.as_ref().unwrap().value, 2102);
    let pod = [(linkerd::PROXY_UID, "2103")];
    let p = run(&MeshTraffic::default(), &ns, &pod).unwrap().policy;
    assert_eq!(p.proxy_uid.unwrap().source, pod_src(linkerd::PROXY_UID));
    assert_eq!(ports(&p.exclude_ports), vec!["4567-4568"]);
}

#[test]
fn dialects_on_one_object_union() {
    let pod = [
        (istio::EXCLUDE_OUTBOUND_PORTS, "25"),
        (linkerd::SKIP_OUTBOUND_PORTS, "100-200"),
        (kuma::EXCLUDE_OUTBOUND_PORTS, "25,300:400"),
    ];
    let p = run(&mesh_with_excludes(), &[], &pod).unwrap().policy;
    assert_eq!(ports(&p.exclude_ports), vec!["25", "100-200", "300-400"]);
    assert_eq!(
        p.exclude_ports[0].source,
        pod_src(istio::EXCLUDE_OUTBOUND_PORTS)
    );
}

#[test]
fn conflicting_proxy_uids_are_an_error() {
    let pod = [(linkerd::PROXY_UID, "2102"), (kuma::SIDECAR_UID, "5678")];
    let e = run_pod(&pod).unwrap_err();
    assert_eq!(e.object, "pod demo/app");
    assert!(e.reason.contains(linkerd::PROXY_UID), "{e}");
    let pod = [(linkerd::PROXY_UID, "2102"), (kuma::SIDECAR_UID, "2102")];
    assert!(run_pod(&pod).is_ok());
}

#[test]
fn errors_name_the_object() {
    let ns = [(istio::EXCLUDE_OUTBOUND_PORTS, "x")];
    let e = run(&MeshTraffic::default(), &ns, &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "namespace demo: annotation traffic.sidecar.istio.io/excludeOutboundPorts: bad value \"x\": not a port number"
    );
    let mesh = MeshTraffic {
        outbound_ip_range_inclusion_list: vec!["nope".into()],
        ..Default::default()
    };
    let e = run(&mesh, &[], &[]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("mesh config: field spec.traffic.outboundIPRangeInclusionList")
    );
}

#[test]
fn warnings_name_object_key_and_value() {
    let pod = [(istio::EXCLUDE_OUTBOUND_IP_RANGES, "10.1.2.3/8")];
    let r = run_pod(&pod).unwrap();
    assert_eq!(cidrs(&r.policy.exclude_cidrs), vec!["10.0.0.0/8"]);
    assert_eq!(r.warnings.len(), 1);
    let w = &r.warnings[0];
    assert!(
        w.contains("pod demo/app")
            && w.contains(istio::EXCLUDE_OUTBOUND_IP_RANGES)
            && w.contains("10.1.2.3/8"),
        "{w}"
    );
}

#[test]
fn inbound_lists() {
    let p = run_pod(&[(istio::INCLUDE_INBOUND_PORTS, "*")])
        .unwrap()
        .policy;
    assert_eq!(p.inbound_include_ports, None);
    let p = run_pod(&[(istio::INCLUDE_INBOUND_PORTS, "")])
        .unwrap()
        .policy;
    assert_eq!(p.inbound_include_ports, Some(vec![]));
    let ns = [(istio::INCLUDE_INBOUND_PORTS, "8080")];
    let p = run(&MeshTraffic::default(), &ns, &[]).unwrap().policy;
    assert_eq!(
        ports(p.inbound_include_ports.as_deref().unwrap()),
        vec!["8080"]
    );
    let pod = [
        (kuma::EXCLUDE_INBOUND_IPS, "10.0.0.0/8"),
        (linkerd::SKIP_SUBNETS, "192.168.0.0/16"),
    ];
    let p = run_pod(&pod).unwrap().policy;
    assert_eq!(
        cidrs(&p.inbound_exclude_cidrs),
        vec!["192.168.0.0/16", "10.0.0.0/8"]
    );
    assert!(p.exclude_cidrs.is_empty());
}

#[test]
fn a_huge_bad_value_is_cut_in_the_message_which_says_how_long_it_was() {
    let e = run_pod(&[(
        istio::EXCLUDE_OUTBOUND_PORTS,
        &format!("{}x", "9".repeat(20_000_000)),
    )])
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.len() < 1_000, "{} bytes", msg.len());
    assert!(msg.contains("pod demo/app"), "{msg}");
    assert!(msg.contains(istio::EXCLUDE_OUTBOUND_PORTS), "{msg}");
    assert!(msg.contains("the value is 20000001 bytes"), "{msg}");
}

/// A typo in an inbound key fails only the inbound part: the outbound policy stands, and the
/// inbound fields fall back to the layers below the bad object (the mesh default).
#[test]
fn a_bad_inbound_value_leaves_the_outbound_policy_alone() {
    let ns = [(istio::EXCLUDE_INBOUND_PORTS, "9000")];
    let pod = [
        (istio::EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8"),
        (istio::EXCLUDE_INBOUND_PORTS, "70O1"),
        (kuma::EXCLUDE_INBOUND_IPS, "10.9.0.0/16"),
    ];
    let r = run(&MeshTraffic::default(), &ns, &pod).unwrap();
    assert_eq!(cidrs(&r.policy.exclude_cidrs), vec!["10.0.0.0/8"]);
    let e = r.inbound_error.expect("the bad inbound value is reported");
    assert_eq!(e.key, istio::EXCLUDE_INBOUND_PORTS);
    assert_eq!(e.value, "70O1");
    assert!(e.to_string().contains("pod demo/app"), "{e}");
    // The namespace's inbound list, none of the pod's (its good Kuma key is dropped with it).
    assert_eq!(ports(&r.policy.inbound_exclude_ports), vec!["9000"]);
    assert!(r.policy.inbound_exclude_cidrs.is_empty());

    // A bad namespace inbound value drops the pod's inbound keys too: the mesh's lists remain.
    let ns = [(linkerd::SKIP_INBOUND_PORTS, "x")];
    let pod = [(istio::EXCLUDE_INBOUND_PORTS, "7001")];
    let r = run(&MeshTraffic::default(), &ns, &pod).unwrap();
    assert_eq!(r.inbound_error.unwrap().object, "namespace demo");
    assert!(r.policy.inbound_exclude_ports.is_empty());
    assert!(r.policy.enabled);

    // A bad outbound value still fails the whole workload.
    let pod = [(istio::EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33")];
    assert!(run_pod(&pod).is_err());
    // Good inbound values: no error.
    let pod = [(istio::EXCLUDE_INBOUND_PORTS, "7001")];
    assert!(run_pod(&pod).unwrap().inbound_error.is_none());
}

#[test]
fn inbound_keys_are_known_as_such() {
    use crate::dialect::keys::is_inbound_key;
    // Both prefixes of the FSM/OSM key; the others are named one by one in is_inbound_key.
    for prefix in ["flomesh.io/", "openservicemesh.io/"] {
        assert!(is_inbound_key(&format!(
            "{prefix}inbound-port-exclusion-list"
        )));
        assert!(!is_inbound_key(&format!(
            "{prefix}outbound-port-exclusion-list"
        )));
    }
    assert!(is_inbound_key(linkerd::SKIP_SUBNETS), "inbound sources");
    assert!(!is_inbound_key(istio::EXCLUDE_OUTBOUND_PORTS));
    assert!(!is_inbound_key(linkerd::SKIP_OUTBOUND_PORTS));
}
