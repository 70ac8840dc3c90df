//! The decision (docs/architecture.md), answered twice: by a plain first-match walk over the
//! effective policy's lists (the reference, and what `explain` shows), and from compiled tables by longest
//! prefix match (what the kernel does). The property test holds the two equal.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use redirect_common::decide::{Dest, NO_RULE, decide_outbound, layered};

use super::compile::{Overlay, overlay::Layered};
use super::types::{Action, Compiled, EffectivePolicy, PortRange, Sourced, Step, Verdict};

/// The address the datapath evaluates: a v4-mapped IPv6 address (`::ffff:a.b.c.d`) is its IPv4
/// address, because the kernel looks those up in the v4 trie.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `ip` as the datapath's decision functions take it (canonical, see [`canonical_ip`]).
pub fn dest_of(ip: IpAddr) -> Dest {
    match canonical_ip(ip) {
        IpAddr::V4(a) => Dest::V4(a.octets()),
        IpAddr::V6(a) => Dest::V6(a.octets()),
    }
}

/// The address of a decision function's `Dest`, for a lookup by address.
pub fn ip_of(d: &Dest) -> IpAddr {
    match *d {
        Dest::V4(a) => IpAddr::from(a),
        Dest::V6(a) => IpAddr::from(a),
    }
}

/// A table lookup's answer as the map value the decision functions take.
pub fn rule(a: Option<Action>) -> u32 {
    a.map_or(NO_RULE, Action::value)
}

/// Step 3: 127.0.0.0/8 and ::1 (after v4-mapped conversion).
pub fn is_loopback(ip: IpAddr) -> bool {
    canonical_ip(ip).is_loopback()
}

/// Reference evaluator of the ordered rules (first match wins), over the effective policy.
pub fn evaluate(p: &EffectivePolicy, dest: SocketAddr, caller_is_proxy: bool) -> Verdict {
    let verdict = |redirect, step, source| Verdict {
        redirect,
        step,
        source,
    };
    if !p.enabled {
        return verdict(false, Step::Disabled, p.enabled_source.clone());
    }
    if caller_is_proxy {
        let source = p.proxy_uid.as_ref().map(|u| u.source.clone());
        return verdict(false, Step::ProxyCaller, source);
    }
    let ip = canonical_ip(dest.ip());
    let port = dest.port();
    if let Some(r) = first_port(&p.exclude_ports, port) {
        return verdict(false, Step::ExcludedPort, Some(r.source.clone()));
    }
    if ip.is_loopback() {
        return verdict(false, Step::Loopback, None);
    }
    if let Some(r) = first_cidr(&p.exclude_cidrs, ip) {
        return verdict(false, Step::ExcludedCidr, Some(r.source.clone()));
    }
    if let Some(r) = first_port(&p.include_ports, port) {
        return verdict(true, Step::IncludedPort, Some(r.source.clone()));
    }
    if let Some(r) = first_cidr(&p.include_cidrs, ip) {
        return verdict(true, Step::IncludedCidr, Some(r.source.clone()));
    }
    verdict(false, Step::NotIncluded, None)
}

fn first_port(list: &[Sourced<PortRange>], port: u16) -> Option<&Sourced<PortRange>> {
    list.iter().find(|r| r.value.contains(port))
}

fn first_cidr(list: &[Sourced<IpNet>], ip: IpAddr) -> Option<&Sourced<IpNet>> {
    list.iter().find(|r| r.value.contains(&ip))
}

/// The same decision answered from compiled tables, the way the kernel does: one port-trie lookup
/// and one CIDR-trie lookup in the destination's family.
pub fn evaluate_compiled(
    c: &Compiled,
    enabled: bool,
    dest: SocketAddr,
    caller_is_proxy: bool,
) -> (bool, Step) {
    evaluate_lookups(enabled, dest, caller_is_proxy, lookups(c))
}

/// The two longest-prefix lookups a decision asks, whoever answers them: compiled tables
/// ([`lookups`]) or the pinned kernel maps (`explain --bpffs-dir`). Outbound and inbound
/// ([`evaluate_lookups`], `evaluate_inbound_lookups`) take the same pair.
pub struct Lookups<P, I> {
    /// The port trie's entry for a port.
    pub port: P,
    /// The address trie's entry for an address (canonical), in the address's family.
    pub ip: I,
}

/// The kernel's decision order over two longest-prefix lookups, whoever answers them. The order
/// itself is `redirect_common::decide::decide_outbound`, the function the eBPF programs run.
pub fn evaluate_lookups(
    enabled: bool,
    dest: SocketAddr,
    caller_is_proxy: bool,
    l: Lookups<impl FnOnce(u16) -> Option<Action>, impl FnOnce(IpAddr) -> Option<Action>>,
) -> (bool, Step) {
    let Lookups { port, ip } = l;
    evaluate_rules(
        enabled,
        dest,
        caller_is_proxy,
        |p| rule(port(p)),
        |a| rule(ip(a)),
    )
}

/// [`evaluate_lookups`] over lookups that answer raw map values (`redirect_common::action`,
/// or `NO_RULE`): what a layered lookup returns (`redirect_common::decide::layered`).
pub fn evaluate_rules(
    enabled: bool,
    dest: SocketAddr,
    caller_is_proxy: bool,
    port_rule: impl FnOnce(u16) -> u32,
    ip_rule: impl FnOnce(IpAddr) -> u32,
) -> (bool, Step) {
    let step = decide_outbound(
        enabled,
        caller_is_proxy,
        &dest_of(dest.ip()),
        || port_rule(dest.port()),
        |d| ip_rule(ip_of(d)),
    );
    (step.redirects(), step)
}

/// The decision from an overlay over its base, the way the kernel layers them: the overlay's
/// entries first, the base's where the overlay has none (`decide::layered`, the function the
/// eBPF programs run). `base_id` only stands for "there is a base" here.
pub fn evaluate_layered(
    o: &Overlay,
    base: &Compiled,
    enabled: bool,
    dest: SocketAddr,
    caller_is_proxy: bool,
) -> (bool, Step) {
    fn longest<K>(l: &[(K, Layered)], has: impl Fn(&K) -> bool, len: impl Fn(&K) -> u8) -> u32 {
        l.iter()
            .filter(|(k, _)| has(k))
            .max_by_key(|(k, _)| len(k))
            .map_or(NO_RULE, |(_, v)| v.value())
    }
    evaluate_rules(
        enabled,
        dest,
        caller_is_proxy,
        |port| {
            let own = longest(&o.ports, |p| p.contains(port), |p| p.len);
            layered(own, 1, |_| rule(lookup_port(base, port)))
        },
        |ip| {
            let own = match ip {
                IpAddr::V4(a) => longest(&o.v4, |n| n.contains(&a), |n| n.prefix_len()),
                IpAddr::V6(a) => longest(&o.v6, |n| n.contains(&a), |n| n.prefix_len()),
            };
            layered(own, 1, |_| rule(lookup_ip(base, ip)))
        },
    )
}

/// The port and the address lookup over compiled tables.
pub fn lookups(
    c: &Compiled,
) -> Lookups<impl Fn(u16) -> Option<Action> + '_, impl Fn(IpAddr) -> Option<Action> + '_> {
    Lookups {
        port: move |port| lookup_port(c, port),
        ip: move |ip| lookup_ip(c, ip),
    }
}

/// Longest-prefix match over the port entries.
pub fn lookup_port(c: &Compiled, port: u16) -> Option<Action> {
    c.ports
        .iter()
        .filter(|(p, _)| p.contains(port))
        .max_by_key(|(p, _)| p.len)
        .map(|(_, a)| *a)
}

/// Longest-prefix match in the trie of `ip`'s family (`ip` already canonical).
pub fn lookup_ip(c: &Compiled, ip: IpAddr) -> Option<Action> {
    match ip {
        IpAddr::V4(a) => {
            c.v4.iter()
                .filter(|(n, _)| n.contains(&a))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, a)| *a)
        }
        IpAddr::V6(a) => {
            c.v6.iter()
                .filter(|(n, _)| n.contains(&a))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, a)| *a)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use crate::fixtures::{nets, ports, src};
    use crate::types::{Origin, Source};

    fn both(p: &EffectivePolicy, dest: &str, proxy: bool) -> (bool, Step) {
        let d: SocketAddr = dest.parse().unwrap();
        let v = evaluate(p, d, proxy);
        let c = evaluate_compiled(&compile(p), p.enabled, d, proxy);
        assert_eq!((v.redirect, v.step), c, "{dest}");
        c
    }

    #[test]
    fn decision_order() {
        let p = EffectivePolicy {
            enabled: true,
            exclude_cidrs: nets(&["10.0.0.0/8", "fd00::/8"], "ex"),
            include_cidrs: nets(&["10.1.0.0/16", "0.0.0.0/0", "::/0"], "in"),
            exclude_ports: ports(&[(22, 22)], "exp"),
            include_ports: ports(&[(8000, 8999)], "inp"),
            ..Default::default()
        };
        // Exclude 10/8 still excludes 10.1.2.3 despite include 10.1/16.
        assert_eq!(both(&p, "10.1.2.3:80", false), (false, Step::ExcludedCidr));
        assert_eq!(
            both(&p, "10.1.2.3:8080", false),
            (false, Step::ExcludedCidr)
        );
        assert_eq!(both(&p, "1.2.3.4:22", false), (false, Step::ExcludedPort));
        assert_eq!(both(&p, "127.0.0.1:8080", false), (false, Step::Loopback));
        assert_eq!(both(&p, "[::1]:8080", false), (false, Step::Loopback));
        assert_eq!(
            both(&p, "[::ffff:127.0.0.5]:80", false),
            (false, Step::Loopback)
        );
        assert_eq!(
            both(&p, "[::ffff:10.9.9.9]:80", false),
            (false, Step::ExcludedCidr)
        );
        assert_eq!(both(&p, "[fd00::1]:80", false), (false, Step::ExcludedCidr));
        assert_eq!(both(&p, "1.2.3.4:80", false), (true, Step::IncludedCidr));
        assert_eq!(
            both(&p, "[2001:db8::1]:80", false),
            (true, Step::IncludedCidr)
        );
        assert_eq!(both(&p, "1.2.3.4:80", true), (false, Step::ProxyCaller));
        let v = evaluate(&p, "10.1.2.3:80".parse().unwrap(), false);
        assert_eq!(v.source, Some(src("ex")));
        assert_eq!(
            v.to_string(),
            "bypass at step 4 (excluded_cidr): pod demo/app annotation ex"
        );
        let v = evaluate(&p, "127.0.0.1:80".parse().unwrap(), false);
        assert_eq!(v.to_string(), "bypass at step 3 (loopback)");
    }

    #[test]
    fn source_display() {
        let s = |o, k| Source::new(o, k).to_string();
        assert_eq!(
            s(Origin::Mesh, "spec.traffic.x"),
            "mesh config field spec.traffic.x"
        );
        assert_eq!(
            s(Origin::Namespace("demo".into()), "k"),
            "namespace demo annotation k"
        );
        assert_eq!(
            s(Origin::Default, "spec.traffic.y"),
            "default for spec.traffic.y"
        );
        assert_eq!(
            serde_json::to_string(&Step::IncludedCidr).unwrap(),
            "\"included_cidr\""
        );
    }

    #[test]
    fn included_port_beats_missing_cidr() {
        let p = EffectivePolicy {
            enabled: true,
            include_cidrs: nets(&["10.0.0.0/8"], "in"),
            include_ports: ports(&[(6379, 6379)], "inp"),
            ..Default::default()
        };
        assert_eq!(both(&p, "8.8.8.8:6379", false), (true, Step::IncludedPort));
        assert_eq!(both(&p, "8.8.8.8:80", false), (false, Step::NotIncluded));
        assert_eq!(
            both(&p, "[2001:db8::1]:80", false),
            (false, Step::NotIncluded)
        );
        let v = evaluate(&p, "8.8.8.8:6379".parse().unwrap(), false);
        assert_eq!(v.source, Some(src("inp")));
    }

    #[test]
    fn disabled() {
        let p = EffectivePolicy {
            enabled: false,
            enabled_source: Some(src("sidecar.istio.io/interceptionMode")),
            include_cidrs: nets(&["0.0.0.0/0"], "in"),
            ..Default::default()
        };
        assert_eq!(both(&p, "1.2.3.4:80", false), (false, Step::Disabled));
        let v = evaluate(&p, "1.2.3.4:80".parse().unwrap(), false);
        assert_eq!(v.source, p.enabled_source);
    }
}
