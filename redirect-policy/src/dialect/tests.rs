//! Tables across the dialects: port lists in each range syntax, and every dialect's bad values
//! (each is refused alone, and the error names the pod, the key and the bad item: an item of a
//! list, or the whole value).

use super::keys::{istio, kuma, linkerd};
use super::test_util::{assert_rejects, parse};
use crate::layer::Merge;
use crate::types::PortRange;

/// (lo, hi) of each range, in order.
type Ranges = &'static [(u16, u16)];

/// Port lists with ranges (Kuma's `a:b`, Linkerd's `lo-hi`): (key, value, inbound (else
/// outbound) exclusions, the ranges it parses to). Every one of these keys overrides.
const PORT_LISTS: [(&str, &str, bool, Ranges); 4] = [
    (
        kuma::EXCLUDE_OUTBOUND_PORTS,
        "5678, 8900:8999",
        false,
        &[(5678, 5678), (8900, 8999)],
    ),
    (kuma::EXCLUDE_INBOUND_PORTS, "1234", true, &[(1234, 1234)]),
    (
        linkerd::SKIP_OUTBOUND_PORTS,
        "25,587, 4567-4568",
        false,
        &[(25, 25), (587, 587), (4567, 4568)],
    ),
    (linkerd::SKIP_INBOUND_PORTS, "1-65535", true, &[(1, 65535)]),
];

#[test]
fn port_lists_with_ranges() {
    for (key, value, inbound, want) in PORT_LISTS {
        let l = parse(&[(key, value)]).unwrap();
        let (list, other) = if inbound {
            (&l.inbound_exclude_ports, &l.exclude_ports)
        } else {
            (&l.exclude_ports, &l.inbound_exclude_ports)
        };
        let want: Vec<_> = want.iter().map(|&(lo, hi)| PortRange { lo, hi }).collect();
        assert_eq!(list[0].values, want, "{key}={value:?}");
        assert_eq!(list[0].merge, Merge::Override, "{key}");
        assert!(other.is_empty(), "{key}");
    }
}

/// Refused values whose bad item is the whole value.
const WHOLE: [(&str, &str); 24] = [
    (istio::INCLUDE_OUTBOUND_IP_RANGES, "*,10.0.0.0/8"),
    (istio::EXCLUDE_OUTBOUND_IP_RANGES, "*"),
    (istio::INCLUDE_OUTBOUND_PORTS, "0"),
    // Istio has no port ranges.
    (istio::EXCLUDE_INBOUND_PORTS, "80-90"),
    (istio::INCLUDE_OUTBOUND_PORTS, "http"),
    (istio::INTERCEPTION_MODE, "none"),
    (istio::EXCLUDE_INTERFACES, "a b"),
    ("flomesh.io/outbound-ip-range-exclusion-list", "1.1.1.1"),
    ("openservicemesh.io/outbound-port-exclusion-list", "65536"),
    ("openservicemesh.io/outbound-port-exclusion-list", "1-2"),
    ("flomesh.io/inbound-port-exclusion-list", "0"),
    ("openservicemesh.io/outbound-ip-range-inclusion-list", ""),
    (linkerd::SKIP_OUTBOUND_PORTS, "90-80"),
    (linkerd::SKIP_OUTBOUND_PORTS, "0-80"),
    (linkerd::SKIP_INBOUND_PORTS, "80:90"),
    (linkerd::SKIP_INBOUND_PORTS, "1-70000"),
    (linkerd::SKIP_SUBNETS, "10.0.0.1"),
    (linkerd::PROXY_UID, "-1"),
    (linkerd::PROXY_UID, "root"),
    (kuma::EXCLUDE_OUTBOUND_PORTS, "8999:8900"),
    (kuma::EXCLUDE_OUTBOUND_PORTS, "8900-8999"),
    (kuma::EXCLUDE_INBOUND_PORTS, "0"),
    (kuma::EXCLUDE_OUTBOUND_IPS, "300.1.1.1"),
    (kuma::SIDECAR_UID, "x"),
];

/// Refused lists, with the item that is bad.
const ITEMS: [(&str, &str, &str); 4] = [
    (
        istio::EXCLUDE_OUTBOUND_IP_RANGES,
        "10.0.0.0/8,10.0.0.1",
        "10.0.0.1",
    ),
    (istio::EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8,", ""),
    (
        "flomesh.io/outbound-ip-range-exclusion-list",
        "1.1.1.1/32,nope",
        "nope",
    ),
    // FSM/OSM split an empty value into one empty item and fail on it.
    ("flomesh.io/outbound-port-exclusion-list", " ", ""),
];

#[test]
fn bad_values_name_key_and_value() {
    assert_rejects(&WHOLE.map(|(key, value)| (key, value, value)));
    assert_rejects(&ITEMS);
}
