//! Kuma `traffic.kuma.io/*` and `kuma.io/sidecar-uid`: port lists with `a:b` ranges, IP lists that
//! take bare addresses as well as CIDRs (Kuma's own example is `192.168.10.1,fd10::/16`).
//! Every key is a [`Merge::Override`](crate::layer::Merge::Override).

use super::read::Reader;
use crate::layer::Layer;
use crate::types::PolicyError;
use crate::values::CidrSyntax;

pub mod keys {
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.kuma.io/exclude-outbound-ports";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.kuma.io/exclude-inbound-ports";
    pub const EXCLUDE_OUTBOUND_IPS: &str = "traffic.kuma.io/exclude-outbound-ips";
    /// Inbound *source* addresses, like Linkerd's skip-subnets.
    pub const EXCLUDE_INBOUND_IPS: &str = "traffic.kuma.io/exclude-inbound-ips";
    pub const SIDECAR_UID: &str = "kuma.io/sidecar-uid";
    pub const ALL: &[&str] = &[
        EXCLUDE_OUTBOUND_PORTS,
        EXCLUDE_INBOUND_PORTS,
        EXCLUDE_OUTBOUND_IPS,
        EXCLUDE_INBOUND_IPS,
        SIDECAR_UID,
    ];
}
use keys::*;

pub(super) fn parse(r: &mut Reader, layer: &mut Layer) -> Result<(), PolicyError> {
    r.ports(EXCLUDE_OUTBOUND_PORTS, Some(':'), &mut layer.exclude_ports)?;
    r.ports(
        EXCLUDE_INBOUND_PORTS,
        Some(':'),
        &mut layer.inbound_exclude_ports,
    )?;
    let syntax = CidrSyntax::CidrOrAddr;
    r.cidrs(EXCLUDE_OUTBOUND_IPS, syntax, &mut layer.exclude_cidrs)?;
    r.cidrs(
        EXCLUDE_INBOUND_IPS,
        syntax,
        &mut layer.inbound_exclude_cidrs,
    )?;
    r.uid(SIDECAR_UID, &mut layer.proxy_uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::test_util::{assert_names, parse};
    use crate::types::PortRange;

    #[test]
    fn ports_with_colon_ranges() {
        let l = parse(&[
            (EXCLUDE_OUTBOUND_PORTS, "5678, 8900:8999"),
            (EXCLUDE_INBOUND_PORTS, "1234"),
        ])
        .unwrap();
        assert_eq!(
            l.exclude_ports[0].values,
            vec![PortRange::single(5678), PortRange { lo: 8900, hi: 8999 }]
        );
        assert_eq!(
            l.inbound_exclude_ports[0].values,
            vec![PortRange::single(1234)]
        );
        assert_names(
            &parse(&[(EXCLUDE_OUTBOUND_PORTS, "8999:8900")]).unwrap_err(),
            EXCLUDE_OUTBOUND_PORTS,
            "8999:8900",
        );
        assert_names(
            &parse(&[(EXCLUDE_OUTBOUND_PORTS, "8900-8999")]).unwrap_err(),
            EXCLUDE_OUTBOUND_PORTS,
            "8900-8999",
        );
        assert_names(
            &parse(&[(EXCLUDE_INBOUND_PORTS, "0")]).unwrap_err(),
            EXCLUDE_INBOUND_PORTS,
            "0",
        );
    }

    #[test]
    fn ips_accept_bare_addresses() {
        let l = parse(&[
            (EXCLUDE_OUTBOUND_IPS, "192.168.10.1,fd10::/16"),
            (EXCLUDE_INBOUND_IPS, "10.0.0.0/8"),
        ])
        .unwrap();
        let v: Vec<String> = l.exclude_cidrs[0]
            .values
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(v, vec!["192.168.10.1/32", "fd10::/16"]);
        assert_eq!(l.inbound_exclude_cidrs[0].values.len(), 1);
        assert_names(
            &parse(&[(EXCLUDE_OUTBOUND_IPS, "300.1.1.1")]).unwrap_err(),
            EXCLUDE_OUTBOUND_IPS,
            "300.1.1.1",
        );
    }

    #[test]
    fn uid() {
        let l = parse(&[(SIDECAR_UID, "5678")]).unwrap();
        assert_eq!(l.proxy_uid[0].values, vec![5678]);
        assert_names(&parse(&[(SIDECAR_UID, "x")]).unwrap_err(), SIDECAR_UID, "x");
    }
}
