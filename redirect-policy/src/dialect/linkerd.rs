//! Linkerd `config.linkerd.io/*`: port lists with `lo-hi` ranges, CIDR subnets, the proxy uid.
//! Linkerd reads these from the pod and falls back to the namespace, which is exactly the
//! override chain, so every key is a [`Merge::Override`](crate::layer::Merge::Override).

use super::read::Reader;
use crate::layer::Layer;
use crate::types::PolicyError;
use crate::values::CidrSyntax;

pub mod keys {
    pub const SKIP_OUTBOUND_PORTS: &str = "config.linkerd.io/skip-outbound-ports";
    pub const SKIP_INBOUND_PORTS: &str = "config.linkerd.io/skip-inbound-ports";
    /// linkerd-proxy-init turns these into `-s <subnet> -j RETURN` in its inbound (PREROUTING)
    /// chain: they are inbound *source* subnets, not outbound destinations.
    pub const SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
    pub const PROXY_UID: &str = "config.linkerd.io/proxy-uid";
    pub const ALL: &[&str] = &[
        SKIP_OUTBOUND_PORTS,
        SKIP_INBOUND_PORTS,
        SKIP_SUBNETS,
        PROXY_UID,
    ];
}
use keys::*;

pub(super) fn parse(r: &mut Reader, layer: &mut Layer) -> Result<(), PolicyError> {
    r.ports(SKIP_OUTBOUND_PORTS, Some('-'), &mut layer.exclude_ports)?;
    r.ports(
        SKIP_INBOUND_PORTS,
        Some('-'),
        &mut layer.inbound_exclude_ports,
    )?;
    let syntax = CidrSyntax::CidrOnly;
    r.cidrs(SKIP_SUBNETS, syntax, &mut layer.inbound_exclude_cidrs)?;
    r.uid(PROXY_UID, &mut layer.proxy_uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::test_util::{assert_names, parse};
    use crate::layer::Merge;
    use crate::types::PortRange;

    #[test]
    fn ports_with_ranges() {
        let l = parse(&[
            (SKIP_OUTBOUND_PORTS, "25,587, 4567-4568"),
            (SKIP_INBOUND_PORTS, "1-65535"),
        ])
        .unwrap();
        assert_eq!(
            l.exclude_ports[0].values,
            vec![
                PortRange::single(25),
                PortRange::single(587),
                PortRange { lo: 4567, hi: 4568 }
            ]
        );
        assert_eq!(
            l.inbound_exclude_ports[0].values,
            vec![PortRange { lo: 1, hi: 65535 }]
        );
        assert_eq!(l.exclude_ports[0].merge, Merge::Override);
    }

    #[test]
    fn bad_ports() {
        assert_names(
            &parse(&[(SKIP_OUTBOUND_PORTS, "90-80")]).unwrap_err(),
            SKIP_OUTBOUND_PORTS,
            "90-80",
        );
        assert_names(
            &parse(&[(SKIP_OUTBOUND_PORTS, "0-80")]).unwrap_err(),
            SKIP_OUTBOUND_PORTS,
            "0-80",
        );
        assert_names(
            &parse(&[(SKIP_INBOUND_PORTS, "80:90")]).unwrap_err(),
            SKIP_INBOUND_PORTS,
            "80:90",
        );
        assert_names(
            &parse(&[(SKIP_INBOUND_PORTS, "1-70000")]).unwrap_err(),
            SKIP_INBOUND_PORTS,
            "1-70000",
        );
    }

    #[test]
    fn subnets_and_uid() {
        let l = parse(&[(SKIP_SUBNETS, "10.0.0.0/8,fd00::/8"), (PROXY_UID, "2102")]).unwrap();
        assert_eq!(l.inbound_exclude_cidrs[0].values.len(), 2);
        assert!(l.exclude_cidrs.is_empty());
        assert_eq!(l.proxy_uid[0].values, vec![2102]);
        assert_names(
            &parse(&[(SKIP_SUBNETS, "10.0.0.1")]).unwrap_err(),
            SKIP_SUBNETS,
            "10.0.0.1",
        );
        assert_names(&parse(&[(PROXY_UID, "-1")]).unwrap_err(), PROXY_UID, "-1");
        assert_names(
            &parse(&[(PROXY_UID, "root")]).unwrap_err(),
            PROXY_UID,
            "root",
        );
    }
}
