//! Value syntax shared by the dialects: CSV lists, ports, port ranges, CIDRs, uids and interface
//! names. Every parser is strict (digits only, no signs, no empty list items) so that what we accept
//! is never more than what the dialect's own tooling accepts, with one documented exception:
//! surrounding whitespace is trimmed, around the whole value and around each item.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::types::{Origin, PolicyError, PortRange, Source};

/// The object and key being parsed, so that every error and warning can name them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ctx<'a> {
    pub origin: &'a Origin,
    pub key: &'a str,
}

impl<'a> Ctx<'a> {
    pub fn new(origin: &'a Origin, key: &'a str) -> Self {
        Ctx { origin, key }
    }

    pub fn source(&self) -> Source {
        Source::new(self.origin.clone(), self.key)
    }

    pub fn error(&self, value: &str, reason: impl Into<String>) -> PolicyError {
        PolicyError {
            object: self.origin.object(),
            key: self.key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    pub fn warning(&self, value: &str, what: &str) -> String {
        let kind = if self.key.starts_with("spec.") {
            "field"
        } else {
            "annotation"
        };
        format!(
            "{}: {kind} {}: value {}: {what}",
            self.origin.object(),
            self.key,
            crate::types::Shown(value)
        )
    }
}

/// Splits a comma-separated value into trimmed items. An empty (or all-blank) value is an empty
/// list; empty items inside a non-empty value are kept so that the item parser rejects them.
pub(crate) fn csv(raw: &str) -> Vec<&str> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(',').map(str::trim).collect()
}

/// Parses a non-empty run of ASCII digits. Signs, spaces and other bases are rejected (Go's
/// `strconv.ParseUint`, which the meshes use, rejects them too). Saturates instead of overflowing
/// so that huge numbers still produce an "out of range" error rather than a panic.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |acc, b| {
        acc.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// One port, 1-65535.
pub(crate) fn port(ctx: &Ctx, item: &str) -> Result<u16, PolicyError> {
    if item.is_empty() {
        return Err(ctx.error(item, "empty list item"));
    }
    match digits(item) {
        None => Err(ctx.error(item, "not a port number")),
        Some(n) if (1..=65535).contains(&n) => Ok(n as u16),
        Some(_) => Err(ctx.error(item, "port out of range 1-65535")),
    }
}

/// A port or, when `sep` is given, a `lo<sep>hi` range (Linkerd `-`, Kuma `:`).
pub(crate) fn port_range(
    ctx: &Ctx,
    item: &str,
    sep: Option<char>,
) -> Result<PortRange, PolicyError> {
    let Some((lo, hi)) = sep.and_then(|c| item.split_once(c)) else {
        return port(ctx, item).map(PortRange::single);
    };
    // Report the whole item: "-5" is a range with an empty low end, not an empty item.
    let bad = |e: PolicyError| match e.value.is_empty() {
        true => ctx.error(item, "range end missing"),
        false => ctx.error(item, format!("range end {:?}: {}", e.value, e.reason)),
    };
    let lo = port(ctx, lo.trim()).map_err(bad)?;
    let hi = port(ctx, hi.trim()).map_err(bad)?;
    if lo > hi {
        return Err(ctx.error(item, "reversed range (low end above high end)"));
    }
    Ok(PortRange { lo, hi })
}

/// A CSV list of ports / ranges.
pub(crate) fn port_list(
    ctx: &Ctx,
    raw: &str,
    sep: Option<char>,
) -> Result<Vec<PortRange>, PolicyError> {
    csv(raw)
        .into_iter()
        .map(|item| port_range(ctx, item, sep))
        .collect()
}

/// How strict a CIDR item is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CidrSyntax {
    /// `addr/len` only (Go `net.ParseCIDR`: Istio, FSM/OSM, Linkerd).
    CidrOnly,
    /// `addr/len` or a bare address meaning a single host (Kuma).
    CidrOrAddr,
}

/// One CIDR. Host bits are cleared with a warning (`10.1.2.3/8` → `10.0.0.0/8`), and an IPv4-mapped
/// IPv6 prefix of length ≥ 96 becomes the IPv4 prefix it denotes, with a warning, because the
/// datapath evaluates v4-mapped destinations against the v4 rules.
pub(crate) fn cidr(
    ctx: &Ctx,
    item: &str,
    syntax: CidrSyntax,
    warnings: &mut Vec<String>,
) -> Result<IpNet, PolicyError> {
    if item.is_empty() {
        return Err(ctx.error(item, "empty list item"));
    }
    let (addr, len) = match item.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (item, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| ctx.error(item, "not an IP address/prefix-length (CIDR)"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => match digits(l) {
            Some(n) if n <= max => n as u8,
            Some(_) => return Err(ctx.error(item, format!("prefix length out of range 0-{max}"))),
            None => return Err(ctx.error(item, "not an IP address/prefix-length (CIDR)")),
        },
        None if syntax == CidrSyntax::CidrOrAddr => max as u8,
        None => return Err(ctx.error(item, "missing prefix length (expected address/length)")),
    };
    // Lengths were range-checked above, so these constructors cannot fail.
    let net = match addr {
        IpAddr::V4(a) => Ipv4Net::new(a, len).map(IpNet::V4),
        IpAddr::V6(a) => Ipv6Net::new(a, len).map(IpNet::V6),
    }
    .map_err(|_| ctx.error(item, "prefix length out of range"))?;
    let mut norm = net.trunc();
    if norm != net {
        warnings.push(ctx.warning(item, &format!("host bits set; using {norm}")));
    }
    if let Some(v4) = v4_mapped(&norm) {
        warnings.push(ctx.warning(
            item,
            &format!("IPv4-mapped IPv6 prefix; using the IPv4 prefix {v4}"),
        ));
        norm = v4;
    }
    Ok(norm)
}

/// `::ffff:a.b.c.d/len` with len ≥ 96 → `a.b.c.d/(len-96)`.
fn v4_mapped(net: &IpNet) -> Option<IpNet> {
    let IpNet::V6(n) = net else { return None };
    if n.prefix_len() < 96 {
        return None;
    }
    let v4 = n.addr().to_ipv4_mapped()?;
    Ipv4Net::new(v4, n.prefix_len() - 96).ok().map(IpNet::V4)
}

/// A CSV list of CIDRs.
pub(crate) fn cidr_list(
    ctx: &Ctx,
    raw: &str,
    syntax: CidrSyntax,
    warnings: &mut Vec<String>,
) -> Result<Vec<IpNet>, PolicyError> {
    csv(raw)
        .into_iter()
        .map(|item| cidr(ctx, item, syntax, warnings))
        .collect()
}

/// `0.0.0.0/0` and `::/0`: what `*` means for destination CIDRs.
pub(crate) fn all_cidrs() -> Vec<IpNet> {
    vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())]
}

/// A user id, 0..=4294967294 (4294967295 is `(uid_t)-1`, "no uid").
pub(crate) fn uid(ctx: &Ctx, raw: &str) -> Result<u32, PolicyError> {
    let item = raw.trim();
    match digits(item) {
        None => Err(ctx.error(item, "not a user id")),
        Some(n) if n < u64::from(u32::MAX) => Ok(n as u32),
        Some(_) => Err(ctx.error(item, "user id out of range 0-4294967294")),
    }
}

/// A network interface name as Linux accepts it: 1-15 bytes, no `/`, no whitespace, not `.`/`..`.
pub(crate) fn interface(ctx: &Ctx, item: &str) -> Result<String, PolicyError> {
    if item.is_empty() {
        return Err(ctx.error(item, "empty list item"));
    }
    if item.len() > 15 {
        return Err(ctx.error(item, "interface name longer than 15 bytes"));
    }
    if item == "."
        || item == ".."
        || item.contains('/')
        || item
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ':')
    {
        return Err(ctx.error(item, "not a valid interface name"));
    }
    Ok(item.to_string())
}

/// A CSV list of interface names.
pub(crate) fn interface_list(ctx: &Ctx, raw: &str) -> Result<Vec<String>, PolicyError> {
    csv(raw).into_iter().map(|i| interface(ctx, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every test reads values of the key "example.io/key" of pod demo/app.
    fn ctx() -> Ctx<'static> {
        static POD: std::sync::OnceLock<Origin> = std::sync::OnceLock::new();
        Ctx::new(
            POD.get_or_init(|| Origin::Pod("demo/app".into())),
            "example.io/key",
        )
    }

    #[test]
    fn csv_trims_and_keeps_empty_items() {
        assert!(csv("  ").is_empty());
        assert_eq!(csv(" a , b "), vec!["a", "b"]);
        assert_eq!(csv("a,,b"), vec!["a", "", "b"]);
    }

    #[test]
    fn ports_are_strict() {
        let c = ctx();
        assert_eq!(port(&c, "80").unwrap(), 80);
        assert_eq!(port(&c, "080").unwrap(), 80);
        for bad in [
            "",
            "0",
            "65536",
            "+80",
            "-1",
            "8o",
            "99999999999999999999999",
            "80 81",
        ] {
            let e = port(&c, bad).unwrap_err();
            assert_eq!(e.value, bad);
            assert_eq!(e.key, "example.io/key");
        }
    }

    #[test]
    fn ranges() {
        let c = ctx();
        assert_eq!(
            port_range(&c, "10-20", Some('-')).unwrap(),
            PortRange { lo: 10, hi: 20 }
        );
        assert_eq!(
            port_range(&c, "10 : 20", Some(':')).unwrap(),
            PortRange { lo: 10, hi: 20 }
        );
        assert!(
            port_range(&c, "20-10", Some('-'))
                .unwrap_err()
                .reason
                .contains("reversed")
        );
        assert!(port_range(&c, "10-20", None).is_err());
        assert!(port_range(&c, "0-20", Some('-')).is_err());
        assert!(port_range(&c, "10-", Some('-')).is_err());
        assert_eq!(
            port_range(&c, "10-20", Some(':')).unwrap_err().value,
            "10-20"
        );
    }

    #[test]
    fn cidrs() {
        let c = ctx();
        let mut w = Vec::new();
        let n = cidr(&c, "10.1.2.3/8", CidrSyntax::CidrOnly, &mut w).unwrap();
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("pod demo/app")
                && w[0].contains("10.1.2.3/8")
                && w[0].contains("example.io/key")
        );
        w.clear();
        let n = cidr(&c, "::ffff:10.0.0.0/104", CidrSyntax::CidrOnly, &mut w).unwrap();
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert_eq!(
            cidr(&c, "fd00::/8", CidrSyntax::CidrOnly, &mut w)
                .unwrap()
                .to_string(),
            "fd00::/8"
        );
        assert_eq!(
            cidr(&c, "1.2.3.4", CidrSyntax::CidrOrAddr, &mut w)
                .unwrap()
                .to_string(),
            "1.2.3.4/32"
        );
        for bad in [
            "1.2.3.4",
            "1.2.3.4/33",
            "::/129",
            "1.2.3/8",
            "1.2.3.4/+8",
            "x",
            "",
            "1.2.3.4/",
            "01.2.3.4/8",
        ] {
            let e = cidr(&c, bad, CidrSyntax::CidrOnly, &mut w).unwrap_err();
            assert_eq!(e.value, bad);
        }
    }

    #[test]
    fn uids_and_interfaces() {
        let c = ctx();
        assert_eq!(uid(&c, " 2102 ").unwrap(), 2102);
        assert_eq!(uid(&c, "0").unwrap(), 0);
        assert!(uid(&c, "4294967295").is_err());
        assert!(uid(&c, "-1").is_err());
        assert_eq!(
            interface_list(&c, "eth0, net1").unwrap(),
            vec!["eth0", "net1"]
        );
        assert!(interface(&c, "a/b").is_err());
        assert!(interface(&c, "0123456789abcdef").is_err());
    }
}
