//! Kuma `traffic.kuma.io/*` and `kuma.io/sidecar-uid`: port lists with `a:b` ranges, IP lists that
//! take bare addresses as well as CIDRs (Kuma's own example is `192.168.10.1,fd10::/16`).
//! Every key is a [`Merge::Override`](crate::layer::Merge::Override).

use super::read::{CidrField, PortField, Spec};
use crate::values::CidrSyntax;

pub mod keys {
    keys! {
        EXCLUDE_OUTBOUND_PORTS = "traffic.kuma.io/exclude-outbound-ports";
        EXCLUDE_INBOUND_PORTS = "traffic.kuma.io/exclude-inbound-ports";
        EXCLUDE_OUTBOUND_IPS = "traffic.kuma.io/exclude-outbound-ips";
        /// Inbound *source* addresses, like Linkerd's skip-subnets.
        EXCLUDE_INBOUND_IPS = "traffic.kuma.io/exclude-inbound-ips";
        SIDECAR_UID = "kuma.io/sidecar-uid";
    }
}
use keys::*;

const IPS: CidrSyntax = CidrSyntax::CidrOrAddr;
/// Every key, its syntax and the field it sets (read by `Reader::table`).
pub(super) const TABLE: &[(&str, Spec)] = &[
    (
        EXCLUDE_OUTBOUND_PORTS,
        Spec::Ports(Some(':'), PortField::Exclude),
    ),
    (
        EXCLUDE_INBOUND_PORTS,
        Spec::Ports(Some(':'), PortField::InboundExclude),
    ),
    (EXCLUDE_OUTBOUND_IPS, Spec::Cidrs(IPS, CidrField::Exclude)),
    (
        EXCLUDE_INBOUND_IPS,
        Spec::Cidrs(IPS, CidrField::InboundExclude),
    ),
    (SIDECAR_UID, Spec::ProxyUid),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::test_util::{parse, strings};

    #[test]
    fn ips_accept_bare_addresses() {
        let l = parse(&[
            (EXCLUDE_OUTBOUND_IPS, "192.168.10.1,fd10::/16"),
            (EXCLUDE_INBOUND_IPS, "10.0.0.0/8"),
        ])
        .unwrap();
        let v = strings(&l.exclude_cidrs[0].values);
        assert_eq!(v, ["192.168.10.1/32", "fd10::/16"]);
        assert_eq!(l.inbound_exclude_cidrs[0].values.len(), 1);
    }

    #[test]
    fn uid() {
        let l = parse(&[(SIDECAR_UID, "5678")]).unwrap();
        assert_eq!(l.proxy_uid[0].values, vec![5678]);
    }
}
