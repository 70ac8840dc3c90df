//! FSM `flomesh.io/*` and OSM `openservicemesh.io/*` (FSM is the OSM fork; the keys match). Both
//! document that a pod's lists are unioned with the MeshConfig lists, so every key here is a
//! [`Merge::Union`](crate::layer::Merge::Union). Values follow FSM's injector: items trimmed, Go's `net.ParseCIDR`, single
//! ports, and an empty value is an error (FSM splits it into one empty item and fails on it).

use super::read::{CidrField, PortField, Reader, Spec};
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

const CIDRS: CidrSyntax = CidrSyntax::CidrOnly;
const TABLE: &[(&str, Spec)] = &[
    (EXCLUDE_IPS, Spec::Cidrs(CIDRS, CidrField::Exclude)),
    (INCLUDE_IPS, Spec::Cidrs(CIDRS, CidrField::Include)),
    (EXCLUDE_PORTS, Spec::Ports(None, PortField::Exclude)),
    (
        INBOUND_EXCLUDE_PORTS,
        Spec::Ports(None, PortField::InboundExclude),
    ),
];

pub(super) fn parse(r: &mut Reader, layer: &mut Layer) -> Result<(), PolicyError> {
    let mut r = r.fsm();
    for prefix in [FSM_PREFIX, OSM_PREFIX] {
        r.table(prefix, TABLE, layer)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::dialect::test_util::parse;
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
}
