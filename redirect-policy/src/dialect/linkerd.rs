//! Linkerd `config.linkerd.io/*`: port lists with `lo-hi` ranges, CIDR subnets, the proxy uid.
//! Linkerd reads these from the pod and falls back to the namespace, which is exactly the
//! override chain, so every key is a [`Merge::Override`](crate::layer::Merge::Override).

use super::read::{CidrField, PortField, Spec};
use crate::values::CidrSyntax;

pub mod keys {
    keys! {
        SKIP_OUTBOUND_PORTS = "config.linkerd.io/skip-outbound-ports";
        SKIP_INBOUND_PORTS = "config.linkerd.io/skip-inbound-ports";
        /// linkerd-proxy-init turns these into `-s <subnet> -j RETURN` in its inbound (PREROUTING)
        /// chain: they are inbound *source* subnets, not outbound destinations.
        SKIP_SUBNETS = "config.linkerd.io/skip-subnets";
        PROXY_UID = "config.linkerd.io/proxy-uid";
    }
}
use keys::*;

/// Every key, its syntax and the field it sets (read by `Reader::table`).
pub(super) const TABLE: &[(&str, Spec)] = &[
    (
        SKIP_OUTBOUND_PORTS,
        Spec::Ports(Some('-'), PortField::Exclude),
    ),
    (
        SKIP_INBOUND_PORTS,
        Spec::Ports(Some('-'), PortField::InboundExclude),
    ),
    (
        SKIP_SUBNETS,
        Spec::Cidrs(CidrSyntax::CidrOnly, CidrField::InboundExclude),
    ),
    (PROXY_UID, Spec::ProxyUid),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::test_util::parse;

    #[test]
    fn subnets_and_uid() {
        let l = parse(&[(SKIP_SUBNETS, "10.0.0.0/8,fd00::/8"), (PROXY_UID, "2102")]).unwrap();
        assert_eq!(l.inbound_exclude_cidrs[0].values.len(), 2);
        assert!(l.exclude_cidrs.is_empty());
        assert_eq!(l.proxy_uid[0].values, vec![2102]);
    }
}
