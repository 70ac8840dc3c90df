//! Istio `traffic.sidecar.istio.io/*` and `sidecar.istio.io/interceptionMode`. Values follow Istio's
//! injector validation: CIDRs with a prefix length, single ports (no ranges), `*` only where Istio
//! allows it and only as the whole value. All keys override the less specific layers.

use super::read::Reader;
use crate::layer::{Layer, Merge, Setting};
use crate::types::{Mode, PolicyError};
use crate::values::{self, CidrSyntax, Ctx};

pub mod keys {
    keys! {
        INCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges";
        EXCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
        INCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts";
        EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts";
        INCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/includeInboundPorts";
        EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts";
        EXCLUDE_INTERFACES = "traffic.sidecar.istio.io/excludeInterfaces";
        INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode";
    }
}
use keys::*;

/// True when the trimmed value is exactly `*`; an error when `*` is mixed into a list, which
/// Istio's validation rejects too.
fn wildcard(ctx: &Ctx, raw: &str) -> Result<bool, PolicyError> {
    let items = values::csv(raw);
    if items == ["*"] {
        return Ok(true);
    }
    if items.contains(&"*") {
        return Err(ctx.error(raw.trim(), "`*` must be the whole value"));
    }
    Ok(false)
}

pub(super) fn parse(r: &mut Reader, layer: &mut Layer) -> Result<(), PolicyError> {
    if let Some((ctx, raw)) = r.get(INCLUDE_OUTBOUND_IP_RANGES)? {
        // `*` = everything; an empty value = nothing (outbound capture off unless ports are included).
        let v = if wildcard(&ctx, raw)? {
            values::all_cidrs()
        } else {
            r.cidr_list(&ctx, raw, CidrSyntax::CidrOnly)?
        };
        r.push(&ctx, &mut layer.include_cidrs, v);
    }
    let syntax = CidrSyntax::CidrOnly;
    r.cidrs(EXCLUDE_OUTBOUND_IP_RANGES, syntax, &mut layer.exclude_cidrs)?;
    r.ports(INCLUDE_OUTBOUND_PORTS, None, &mut layer.include_ports)?;
    r.ports(EXCLUDE_OUTBOUND_PORTS, None, &mut layer.exclude_ports)?;
    r.ports(
        EXCLUDE_INBOUND_PORTS,
        None,
        &mut layer.inbound_exclude_ports,
    )?;
    if let Some((ctx, raw)) = r.get(INCLUDE_INBOUND_PORTS)? {
        let mut s = Setting::new(Merge::Override, ctx.source(), Vec::new());
        if wildcard(&ctx, raw)? {
            s.wildcard = true;
        } else {
            s.values = values::port_list(&ctx, raw, None)?;
        }
        layer.inbound_include_ports.push(s);
    }
    if let Some((ctx, raw)) = r.get(EXCLUDE_INTERFACES)? {
        let v = values::interface_list(&ctx, raw)?;
        r.push(&ctx, &mut layer.exclude_interfaces, v);
    }
    if let Some((ctx, raw)) = r.get(INTERCEPTION_MODE)? {
        let raw = raw.trim();
        // Istio matches the enum names exactly (upper case).
        let disables = match raw {
            "NONE" => true,
            "REDIRECT" | "TPROXY" => false,
            _ => return Err(ctx.error(raw, "expected REDIRECT, TPROXY or NONE")),
        };
        let mode = Mode {
            raw: raw.to_string(),
            disables,
        };
        r.push(&ctx, &mut layer.mode, vec![mode]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::test_util::parse;
    use crate::types::PortRange;

    #[test]
    fn include_ranges_star_empty_and_list() {
        let l = parse(&[(INCLUDE_OUTBOUND_IP_RANGES, " * ")]).unwrap();
        assert_eq!(l.include_cidrs[0].values, values::all_cidrs());
        let l = parse(&[(INCLUDE_OUTBOUND_IP_RANGES, "")]).unwrap();
        assert!(l.include_cidrs[0].values.is_empty());
        let l = parse(&[(INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8, fd00::/8")]).unwrap();
        assert_eq!(l.include_cidrs[0].values.len(), 2);
        assert_eq!(l.include_cidrs[0].merge, Merge::Override);
    }

    #[test]
    fn ports() {
        let l = parse(&[
            (EXCLUDE_OUTBOUND_PORTS, "3306, 6379"),
            (INCLUDE_OUTBOUND_PORTS, "7001"),
            (EXCLUDE_INBOUND_PORTS, "7001,7002,7005"),
        ])
        .unwrap();
        assert_eq!(
            l.exclude_ports[0].values,
            vec![PortRange::single(3306), PortRange::single(6379)]
        );
        assert_eq!(l.include_ports[0].values, vec![PortRange::single(7001)]);
        assert_eq!(l.inbound_exclude_ports[0].values.len(), 3);
        let e = parse(&[(EXCLUDE_OUTBOUND_PORTS, "70000")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pod demo/app: annotation traffic.sidecar.istio.io/excludeOutboundPorts: bad value \"70000\": port out of range 1-65535"
        );
    }

    #[test]
    fn inbound_include_star() {
        let l = parse(&[(INCLUDE_INBOUND_PORTS, "*")]).unwrap();
        assert!(l.inbound_include_ports[0].wildcard);
        let l = parse(&[(INCLUDE_INBOUND_PORTS, "")]).unwrap();
        assert!(
            !l.inbound_include_ports[0].wildcard && l.inbound_include_ports[0].values.is_empty()
        );
        let l = parse(&[(INCLUDE_INBOUND_PORTS, "8080")]).unwrap();
        assert_eq!(
            l.inbound_include_ports[0].values,
            vec![PortRange::single(8080)]
        );
    }

    #[test]
    fn interfaces_and_mode() {
        let l = parse(&[
            (EXCLUDE_INTERFACES, "net1,net2"),
            (INTERCEPTION_MODE, "NONE"),
        ])
        .unwrap();
        assert_eq!(l.exclude_interfaces[0].values, vec!["net1", "net2"]);
        assert!(l.mode[0].values[0].disables);
        let l = parse(&[(INTERCEPTION_MODE, "TPROXY")]).unwrap();
        assert!(!l.mode[0].values[0].disables);
    }

    #[test]
    fn other_keys_are_ignored() {
        let l = parse(&[
            ("traffic.sidecar.istio.io/kubevirtInterfaces", "x y"),
            ("foo", "bar"),
        ])
        .unwrap();
        assert_eq!(l, Layer::default());
    }
}
