//! FSM `flomesh.io/*` and OSM `openservicemesh.io/*` (FSM is the OSM fork; the keys match). Both
//! document that a pod's lists are unioned with the MeshConfig lists, so every key here is a
//! [`Merge::Union`](crate::layer::Merge::Union). Values follow FSM's injector: items trimmed, Go's `net.ParseCIDR`, single
//! ports, and an empty value is an error (FSM splits it into one empty item and fails on it).

use super::read::Reader;
use crate::layer::Layer;
use crate::types::PolicyError;
use crate::values::CidrSyntax;

pub const FSM_PREFIX: &str = "flomesh.io/";
pub const OSM_PREFIX: &str = "openservicemesh.io/";

const EXCLUDE_IPS: &str = "outbound-ip-range-exclusion-list";
const INCLUDE_IPS: &str = "outbound-ip-range-inclusion-list";
const EXCLUDE_PORTS: &str = "outbound-port-exclusion-list";
pub const INBOUND_EXCLUDE_PORTS: &str = "inbound-port-exclusion-list";
/// The key names after the prefix.
pub const UNION_KEYS: [&str; 4] = [
    EXCLUDE_IPS,
    INCLUDE_IPS,
    EXCLUDE_PORTS,
    INBOUND_EXCLUDE_PORTS,
];

pub(super) fn parse(r: &mut Reader, layer: &mut Layer) -> Result<(), PolicyError> {
    let mut r = r.fsm();
    for prefix in [FSM_PREFIX, OSM_PREFIX] {
        let key = |name: &str| format!("{prefix}{name}");
        let syntax = CidrSyntax::CidrOnly;
        r.cidrs(&key(EXCLUDE_IPS), syntax, &mut layer.exclude_cidrs)?;
        r.cidrs(&key(INCLUDE_IPS), syntax, &mut layer.include_cidrs)?;
        r.ports(&key(EXCLUDE_PORTS), None, &mut layer.exclude_ports)?;
        let inbound = &mut layer.inbound_exclude_ports;
        r.ports(&key(INBOUND_EXCLUDE_PORTS), None, inbound)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::dialect::test_util::{assert_names, parse};
    use crate::layer::Merge;
    use crate::types::PortRange;

    #[test]
    fn fsm_and_osm_keys_union() {
        let l = parse(&[
            (
                "flomesh.io/outbound-ip-range-exclusion-list",
                "1.1.1.1/32, 2.2.2.0/24",
            ),
            (
                "openservicemesh.io/outbound-ip-range-exclusion-list",
                "3.3.3.3/32",
            ),
            ("flomesh.io/outbound-ip-range-inclusion-list", "10.0.0.0/8"),
            (
                "openservicemesh.io/outbound-port-exclusion-list",
                "6379,3306",
            ),
            ("flomesh.io/inbound-port-exclusion-list", "9090"),
        ])
        .unwrap();
        assert_eq!(l.exclude_cidrs.len(), 2);
        assert!(l.exclude_cidrs.iter().all(|s| s.merge == Merge::Union));
        assert_eq!(l.exclude_cidrs[0].values.len(), 2);
        assert_eq!(l.include_cidrs[0].values.len(), 1);
        assert_eq!(
            l.exclude_ports[0].values,
            vec![PortRange::single(6379), PortRange::single(3306)]
        );
        assert_eq!(
            l.inbound_exclude_ports[0].values,
            vec![PortRange::single(9090)]
        );
    }

    #[test]
    fn bad_values() {
        let k = "flomesh.io/outbound-ip-range-exclusion-list";
        assert_names(&parse(&[(k, "1.1.1.1")]).unwrap_err(), k, "1.1.1.1");
        assert_names(&parse(&[(k, "1.1.1.1/32,nope")]).unwrap_err(), k, "nope");
        let k = "openservicemesh.io/outbound-port-exclusion-list";
        assert_names(&parse(&[(k, "65536")]).unwrap_err(), k, "65536");
        assert_names(&parse(&[(k, "1-2")]).unwrap_err(), k, "1-2");
        let k = "flomesh.io/inbound-port-exclusion-list";
        assert_names(&parse(&[(k, "0")]).unwrap_err(), k, "0");
    }

    #[test]
    fn empty_value_is_an_error() {
        let k = "flomesh.io/outbound-port-exclusion-list";
        assert_names(&parse(&[(k, " ")]).unwrap_err(), k, "");
        let k = "openservicemesh.io/outbound-ip-range-inclusion-list";
        assert_names(&parse(&[(k, "")]).unwrap_err(), k, "");
    }
}
