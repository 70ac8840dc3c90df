//! Every dialect's bad values in one table: each is refused alone, and the error names the pod,
//! the key and the bad item (an item of a list, or the whole value).

use super::keys::{istio, kuma, linkerd};
use super::test_util::assert_rejects;

#[test]
fn bad_values_name_key_and_value() {
    assert_rejects(&[
        (
            istio::INCLUDE_OUTBOUND_IP_RANGES,
            "*,10.0.0.0/8",
            "*,10.0.0.0/8",
        ),
        (
            istio::EXCLUDE_OUTBOUND_IP_RANGES,
            "10.0.0.0/8,10.0.0.1",
            "10.0.0.1",
        ),
        (istio::EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8,", ""),
        (istio::EXCLUDE_OUTBOUND_IP_RANGES, "*", "*"),
        (istio::INCLUDE_OUTBOUND_PORTS, "0", "0"),
        // Istio has no port ranges.
        (istio::EXCLUDE_INBOUND_PORTS, "80-90", "80-90"),
        (istio::INCLUDE_OUTBOUND_PORTS, "http", "http"),
        (istio::INTERCEPTION_MODE, "none", "none"),
        (istio::EXCLUDE_INTERFACES, "a b", "a b"),
        (
            "flomesh.io/outbound-ip-range-exclusion-list",
            "1.1.1.1",
            "1.1.1.1",
        ),
        (
            "flomesh.io/outbound-ip-range-exclusion-list",
            "1.1.1.1/32,nope",
            "nope",
        ),
        (
            "openservicemesh.io/outbound-port-exclusion-list",
            "65536",
            "65536",
        ),
        (
            "openservicemesh.io/outbound-port-exclusion-list",
            "1-2",
            "1-2",
        ),
        ("flomesh.io/inbound-port-exclusion-list", "0", "0"),
        // FSM/OSM split an empty value into one empty item and fail on it.
        ("flomesh.io/outbound-port-exclusion-list", " ", ""),
        (
            "openservicemesh.io/outbound-ip-range-inclusion-list",
            "",
            "",
        ),
        (linkerd::SKIP_OUTBOUND_PORTS, "90-80", "90-80"),
        (linkerd::SKIP_OUTBOUND_PORTS, "0-80", "0-80"),
        (linkerd::SKIP_INBOUND_PORTS, "80:90", "80:90"),
        (linkerd::SKIP_INBOUND_PORTS, "1-70000", "1-70000"),
        (linkerd::SKIP_SUBNETS, "10.0.0.1", "10.0.0.1"),
        (linkerd::PROXY_UID, "-1", "-1"),
        (linkerd::PROXY_UID, "root", "root"),
        (kuma::EXCLUDE_OUTBOUND_PORTS, "8999:8900", "8999:8900"),
        (kuma::EXCLUDE_OUTBOUND_PORTS, "8900-8999", "8900-8999"),
        (kuma::EXCLUDE_INBOUND_PORTS, "0", "0"),
        (kuma::EXCLUDE_OUTBOUND_IPS, "300.1.1.1", "300.1.1.1"),
        (kuma::SIDECAR_UID, "x", "x"),
    ]);
}
