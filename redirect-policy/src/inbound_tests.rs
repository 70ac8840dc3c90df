use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use redirect_common::decide::InboundStep;

use super::*;
use crate::fixtures::{ports, src};
use crate::types::Sourced;

const LO: bool = true;
const C: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9));

#[test]
fn order_and_own_ports() {
    let own = own_ports(15006, 15001, &Annotations::new());
    let mut p = EffectivePolicy {
        inbound_exclude_ports: ports(&[(7001, 7002)], "excl"),
        inbound_exclude_cidrs: vec![Sourced {
            value: "198.19.0.0/16".parse().unwrap(),
            source: src("skip"),
        }],
        ..Default::default()
    };
    let c = compile_inbound(&p, &own);
    let steps = |port, ip| {
        let r = evaluate_inbound(&p, &own, false, port, ip).step;
        assert_eq!(evaluate_inbound_compiled(&c, false, port, ip), r);
        r
    };
    assert_eq!(steps(8080, C), InboundStep::IncludedPort);
    assert_eq!(steps(7001, C), InboundStep::ExcludedPort);
    assert_eq!(steps(15020, C), InboundStep::ExcludedPort);
    assert_eq!(steps(15006, C), InboundStep::ExcludedPort);
    let skipped: IpAddr = "198.19.3.4".parse().unwrap();
    assert_eq!(steps(8080, skipped), InboundStep::ExcludedSource);
    assert_eq!(
        evaluate_inbound_compiled(&c, LO, 8080, C),
        InboundStep::Loopback
    );
    // Empty include list: nothing captured.
    p.inbound_include_ports = Some(vec![]);
    let c = compile_inbound(&p, &own);
    assert_eq!(
        evaluate_inbound_compiled(&c, false, 8080, C),
        InboundStep::NotIncluded
    );
    p.inbound_include_ports = Some(ports(&[(8080, 8080)], "incl"));
    let c = compile_inbound(&p, &own);
    assert_eq!(
        evaluate_inbound_compiled(&c, false, 8080, C),
        InboundStep::IncludedPort
    );
    assert_eq!(
        evaluate_inbound_compiled(&c, false, 8081, C),
        InboundStep::NotIncluded
    );
}

#[test]
fn status_port_annotation_is_excluded() {
    let mut a = Annotations::new();
    a.insert(ISTIO_STATUS_PORT.into(), " 16021 ".into());
    assert!(own_ports(15006, 15001, &a).contains(&16021));
    a.insert(ISTIO_STATUS_PORT.into(), "x".into());
    assert_eq!(own_ports(15006, 15001, &a).len(), 7);
}

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 0u8..=32).prop_map(|(a, l)| IpNet::V4(
            Ipv4Net::new(Ipv4Addr::from(a & 0xc612_ffff), l)
                .unwrap()
                .trunc()
        )),
        (any::<u128>(), 0u8..=128).prop_map(|(a, l)| IpNet::V6(
            Ipv6Net::new(Ipv6Addr::from((0xfd00u128 << 112) | (a >> 100)), l)
                .unwrap()
                .trunc()
        )),
    ]
}

fn range() -> impl Strategy<Value = (u16, u16)> {
    (
        prop_oneof![1u16..=65535, prop::sample::select(vec![80u16, 8080, 15006])],
        prop_oneof![Just(0u16), 0u16..=64, any::<u16>()],
    )
        .prop_map(|(lo, w)| (lo, lo.saturating_add(w)))
}

fn policy() -> impl Strategy<Value = EffectivePolicy> {
    (
        prop::collection::vec(range(), 0..4),
        prop::option::of(prop::collection::vec(range(), 0..4)),
        prop::collection::vec(net(), 0..5),
    )
        .prop_map(|(ex, inc, nets)| EffectivePolicy {
            inbound_exclude_ports: ports(&ex, "excl"),
            inbound_include_ports: inc.map(|i| ports(&i, "incl")),
            inbound_exclude_cidrs: nets
                .into_iter()
                .map(|value| Sourced {
                    value,
                    source: src("skip"),
                })
                .collect(),
            ..Default::default()
        })
}

fn probes(p: &EffectivePolicy) -> (Vec<u16>, Vec<IpAddr>) {
    let mut ports = vec![1, 80, 65535, 15000, 15006, 15020];
    let inc = p.inbound_include_ports.iter().flatten();
    for r in p.inbound_exclude_ports.iter().chain(inc) {
        let (lo, hi) = (r.value.lo, r.value.hi);
        ports.extend([lo, hi, lo.saturating_sub(1), hi.saturating_add(1)]);
    }
    let mut ips = vec![C, IpAddr::V6(Ipv6Addr::LOCALHOST)];
    for n in &p.inbound_exclude_cidrs {
        match n.value {
            IpNet::V4(n) => {
                let (a, b) = (u32::from(n.network()), u32::from(n.broadcast()));
                for x in [a, b, a.wrapping_sub(1), b.wrapping_add(1)] {
                    ips.push(IpAddr::V4(x.into()));
                }
            }
            IpNet::V6(n) => {
                let (a, b) = (u128::from(n.network()), u128::from(n.broadcast()));
                for x in [a, b, a.wrapping_sub(1), b.wrapping_add(1)] {
                    ips.push(IpAddr::V6(x.into()));
                }
            }
        }
    }
    (ports, ips)
}

proptest! {
    /// What the kernel runs (decide_inbound over the compiled tables, longest prefix) answers
    /// exactly like the first-match reference over the lists.
    #[test]
    fn compiled_matches_reference(p in policy(), lo in any::<bool>(), extra in any::<u16>()) {
        let own = own_ports(15006, 15001, &Annotations::new());
        let c = compile_inbound(&p, &own);
        let (mut ports, ips) = probes(&p);
        ports.push(extra);
        for &port in &ports {
            for &ip in &ips {
                let want = evaluate_inbound(&p, &own, lo, port, ip).step;
                prop_assert_eq!(evaluate_inbound_compiled(&c, lo, port, ip), want,
                    "port {} source {}", port, ip);
            }
        }
    }
}

#[test]
fn own_ports_follow_the_mesh_of_the_inbound_port() {
    let none = Annotations::new();
    // Istio (and Kuma): 15006.
    let istio = own_ports(15006, 15001, &none);
    assert_eq!(istio, vec![15000, 15001, 15006, 15008, 15020, 15021, 15090]);
    let pod: Annotations = [(ISTIO_STATUS_PORT.to_string(), "15999".to_string())].into();
    assert!(own_ports(15006, 15001, &pod).contains(&15999));
    // OSM/FSM: 15003, and none of Istio's.
    let osm = own_ports(15003, 15001, &none);
    assert_eq!(osm, vec![15001, 15003, 15010, 15901, 15902, 15903]);
    // Linkerd: 4143 with its control and admin ports, and the pod's overrides of them.
    assert_eq!(own_ports(4143, 4140, &none), vec![4140, 4143, 4190, 4191]);
    let pod: Annotations = [
        (LINKERD_PORT_KEYS[0].to_string(), "5191".to_string()),
        (LINKERD_PORT_KEYS[1].to_string(), "bad".to_string()),
    ]
    .into();
    assert_eq!(
        own_ports(4143, 4140, &pod),
        vec![4140, 4143, 4190, 4191, 5191]
    );
    // A Linkerd pod's Istio status port annotation means nothing to Linkerd.
    let pod: Annotations = [(ISTIO_STATUS_PORT.to_string(), "15999".to_string())].into();
    assert!(!own_ports(4143, 4140, &pod).contains(&15999));
    // Every annotation that names an own port is one a watcher must not ignore.
    for k in OWN_PORT_KEYS {
        assert!(crate::dialect::keys::is_policy_key(k), "{k}");
    }
}
