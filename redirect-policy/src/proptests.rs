//! Property test: compiled LPM tables answer exactly like the first-match reference evaluator,
//! for random policies (v4, v6 and ports, nested and overlapping either way) and destinations
//! chosen at and around every rule boundary.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;

use super::compile::{range_prefixes, trie};
use super::types::{EffectivePolicy, Origin, PortRange, Source, Sourced};
use super::{
    Lists, compile, evaluate, evaluate_compiled, evaluate_layered, extra_exclusions, overlay_of,
};

fn src(key: &str) -> Source {
    Source::new(Origin::Pod("p/p".into()), key)
}

/// Addresses cluster around a few bases so that random prefixes overlap and nest often.
fn v4_net() -> impl Strategy<Value = IpNet> {
    let base = prop::sample::select(vec![0x0a00_0000u32, 0x0a01_0000, 0xc0a8_0000, 0, u32::MAX]);
    let noise = prop::sample::select(vec![0u32, 0xff, 0xffff, 0x00ff_ffff, u32::MAX]);
    (base, noise, any::<u32>(), 0u8..=32).prop_map(|(b, m, r, len)| {
        let net = Ipv4Net::new(Ipv4Addr::from(b ^ (r & m)), len).expect("len <= 32");
        IpNet::V4(net.trunc())
    })
}

fn v6_net() -> impl Strategy<Value = IpNet> {
    let fd = 0xfd00u128 << 112;
    let doc = 0x2001_0db8u128 << 96;
    let base = prop::sample::select(vec![fd, doc, 0, u128::MAX, 0xffff_0000_0000]);
    let noise = prop::sample::select(vec![0u128, 0xffff, u128::from(u64::MAX), u128::MAX >> 8]);
    (base, noise, any::<u128>(), 0u8..=128).prop_map(|(b, m, r, len)| {
        let net = Ipv6Net::new(Ipv6Addr::from(b ^ (r & m)), len).expect("len <= 128");
        IpNet::V6(net.trunc())
    })
}

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![v4_net(), v6_net()]
}

fn port_range() -> impl Strategy<Value = PortRange> {
    let lo = prop_oneof![
        prop::sample::select(vec![1u16, 80, 1024, 8000, 8080, 32768, 65535]),
        1u16..=65535,
    ];
    let width = prop_oneof![Just(0u16), 0u16..=16, 0u16..=2000, any::<u16>()];
    (lo, width).prop_map(|(lo, w)| PortRange {
        lo,
        hi: lo.saturating_add(w),
    })
}

fn sourced<T: std::fmt::Debug + Clone>(
    s: impl Strategy<Value = T>,
    max: usize,
    key: &'static str,
) -> impl Strategy<Value = Vec<Sourced<T>>> {
    prop::collection::vec(s, 0..=max).prop_map(move |v| {
        v.into_iter()
            .map(|value| Sourced {
                value,
                source: src(key),
            })
            .collect()
    })
}

fn policy() -> impl Strategy<Value = EffectivePolicy> {
    (
        prop::bool::weighted(0.9),
        sourced(net(), 8, "exclude"),
        sourced(net(), 8, "include"),
        sourced(port_range(), 4, "exclude_ports"),
        sourced(port_range(), 4, "include_ports"),
    )
        .prop_map(|(enabled, ex, inc, exp, inp)| EffectivePolicy {
            enabled,
            exclude_cidrs: ex,
            include_cidrs: inc,
            exclude_ports: exp,
            include_ports: inp,
            ..Default::default()
        })
}

/// The first and last address of a net and their outside neighbours, plus loopback and
/// v4-mapped forms, so every boundary of every rule is probed.
fn probe_ips(p: &EffectivePolicy, extra: &[IpAddr]) -> Vec<IpAddr> {
    let mut out = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(Ipv4Addr::new(127, 1, 2, 3).to_ipv6_mapped()),
    ];
    out.extend_from_slice(extra);
    for s in p.exclude_cidrs.iter().chain(&p.include_cidrs) {
        match s.value {
            IpNet::V4(n) => {
                let (a, b) = (u32::from(n.network()), u32::from(n.broadcast()));
                for x in [a, b, a.wrapping_sub(1), b.wrapping_add(1)] {
                    out.push(IpAddr::V4(x.into()));
                    out.push(IpAddr::V6(Ipv4Addr::from(x).to_ipv6_mapped()));
                }
            }
            IpNet::V6(n) => {
                let (a, b) = (u128::from(n.network()), u128::from(n.broadcast()));
                for x in [a, b, a.wrapping_sub(1), b.wrapping_add(1)] {
                    out.push(IpAddr::V6(x.into()));
                }
            }
        }
    }
    out
}

fn probe_ports(p: &EffectivePolicy, extra: u16) -> Vec<u16> {
    let mut out = vec![0, 1, 65535, extra];
    for r in p.exclude_ports.iter().chain(&p.include_ports) {
        let r = &r.value;
        out.extend([r.lo, r.hi, r.lo.wrapping_sub(1), r.hi.wrapping_add(1)]);
    }
    out
}

/// An upper bound on the minimal table: the input itself, less duplicates and the includes that
/// sit inside an exclude, is a valid table, so the compiler must never do worse.
fn naive_bound(ex: &[trie::Prefix], inc: &[trie::Prefix], width: u8) -> usize {
    let covers = |a: &trie::Prefix, b: &trie::Prefix| {
        a.len <= b.len && (a.len == 0 || (a.bits ^ b.bits) >> (width - a.len) == 0)
    };
    let mut ex: Vec<_> = ex.to_vec();
    ex.sort();
    ex.dedup();
    let mut inc: Vec<_> = inc
        .iter()
        .filter(|i| !ex.iter().any(|e| covers(e, i)))
        .copied()
        .collect();
    inc.sort();
    inc.dedup();
    ex.len() + inc.len()
}

fn prefixes(l: &[Sourced<IpNet>], v4: bool) -> Vec<trie::Prefix> {
    l.iter()
        .filter_map(|s| match s.value {
            IpNet::V4(n) if v4 => Some(trie::Prefix {
                bits: u128::from(u32::from(n.network())),
                len: n.prefix_len(),
            }),
            IpNet::V6(n) if !v4 => Some(trie::Prefix {
                bits: u128::from(n.network()),
                len: n.prefix_len(),
            }),
            _ => None,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 4000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn compiled_tables_match_the_reference(
        p in policy(),
        extra_v4 in any::<u32>(),
        extra_v6 in any::<u128>(),
        extra_port in any::<u16>(),
        proxy in prop::bool::weighted(0.05),
    ) {
        let c = compile(&p);
        let extra = [IpAddr::V4(extra_v4.into()), IpAddr::V6(extra_v6.into())];
        let ips = probe_ips(&p, &extra);
        let ports = probe_ports(&p, extra_port);
        // Every address with two ports, and every port with two addresses: each rule boundary meets
        // several of the others' without the full cross product.
        let pairs = ips.iter().enumerate().flat_map(|(i, ip)| {
            [(*ip, ports[i % ports.len()]), (*ip, ports[(i * 7 + 3) % ports.len()])]
        });
        let pairs = pairs.chain(ports.iter().enumerate().flat_map(|(i, port)| {
            [(ips[i % ips.len()], *port), (ips[(i * 5 + 1) % ips.len()], *port)]
        }));
        for (ip, port) in pairs {
            let dest = SocketAddr::new(ip, port);
            let want = evaluate(&p, dest, proxy);
            let got = evaluate_compiled(&c, p.enabled, dest, proxy);
            prop_assert_eq!((want.redirect, want.step), got, "dest {} table {:?}", dest, c);
        }

        // Sorted, no duplicate keys, never larger than the naive valid table.
        prop_assert!(c.v4.windows(2).all(|w| w[0].0 < w[1].0));
        prop_assert!(c.v6.windows(2).all(|w| w[0].0 < w[1].0));
        prop_assert!(c.ports.windows(2).all(|w| w[0].0 < w[1].0));
        let bound4 = naive_bound(&prefixes(&p.exclude_cidrs, true), &prefixes(&p.include_cidrs, true), 32);
        let bound6 = naive_bound(&prefixes(&p.exclude_cidrs, false), &prefixes(&p.include_cidrs, false), 128);
        prop_assert!(c.v4.len() <= bound4, "{} > {}", c.v4.len(), bound4);
        prop_assert!(c.v6.len() <= bound6, "{} > {}", c.v6.len(), bound6);
        let px: Vec<_> = p.exclude_ports.iter().flat_map(|r| range_prefixes(&r.value)).collect();
        let pi: Vec<_> = p.include_ports.iter().flat_map(|r| range_prefixes(&r.value)).collect();
        prop_assert!(c.ports.len() <= naive_bound(&px, &pi, 16));
    }

}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1500,
        ..ProptestConfig::default()
    })]

    /// A workload whose table is an overlay over a shared base (the mesh default's) decides,
    /// through `decide::layered` as the kernel does, exactly like the reference evaluator over
    /// its own policy: the base plus extras (a union key) or a policy of its own (an override).
    #[test]
    fn layered_tables_match_the_reference(
        base in policy(),
        extra in policy(),
        replace in any::<bool>(),
        exclusions_only in any::<bool>(),
        extra_v4 in any::<u32>(),
        extra_port in any::<u16>(),
        proxy in prop::bool::weighted(0.05),
    ) {
        let mut extra = extra;
        if exclusions_only {
            // The union annotations' case, which `extra_exclusions` builds without compiling.
            extra.include_cidrs.clear();
            extra.include_ports.clear();
        }
        let own = if replace {
            EffectivePolicy { enabled: base.enabled, ..extra }
        } else {
            let cat = |a: &[Sourced<IpNet>], b: &[Sourced<IpNet>]| [a, b].concat();
            let catp = |a: &[Sourced<PortRange>], b: &[Sourced<PortRange>]| [a, b].concat();
            EffectivePolicy {
                enabled: base.enabled,
                exclude_cidrs: cat(&base.exclude_cidrs, &extra.exclude_cidrs),
                include_cidrs: cat(&base.include_cidrs, &extra.include_cidrs),
                exclude_ports: catp(&base.exclude_ports, &extra.exclude_ports),
                include_ports: catp(&base.include_ports, &extra.include_ports),
                ..Default::default()
            }
        };
        let (cb, co) = (compile(&base), compile(&own));
        let o = overlay_of(&co, &cb);
        let fast = extra_exclusions(&own, &Lists::of(&base));
        prop_assert!(fast.is_some() || !exclusions_only || replace, "a union of exclusions was not recognised");
        // Probe every boundary of both policies: the base's rules matter where the overlay is silent.
        let both = EffectivePolicy {
            exclude_cidrs: [own.exclude_cidrs.clone(), base.exclude_cidrs.clone()].concat(),
            include_cidrs: [own.include_cidrs.clone(), base.include_cidrs.clone()].concat(),
            exclude_ports: [own.exclude_ports.clone(), base.exclude_ports.clone()].concat(),
            include_ports: [own.include_ports.clone(), base.include_ports.clone()].concat(),
            ..Default::default()
        };
        let ips = probe_ips(&both, &[IpAddr::V4(extra_v4.into())]);
        let ports = probe_ports(&both, extra_port);
        let pairs = ips.iter().enumerate().map(|(i, ip)| (*ip, ports[i % ports.len()]));
        let pairs = pairs.chain(ports.iter().enumerate().map(|(i, port)| (ips[(i * 5 + 1) % ips.len()], *port)));
        for (ip, port) in pairs {
            let dest = SocketAddr::new(ip, port);
            let want = evaluate(&own, dest, proxy);
            let got = evaluate_layered(&o, &cb, own.enabled, dest, proxy);
            prop_assert_eq!((want.redirect, want.step), got, "dest {} overlay {:?} base {:?}", dest, o, cb);
            if let Some(f) = &fast {
                let got = evaluate_layered(f, &cb, own.enabled, dest, proxy);
                prop_assert_eq!((want.redirect, want.step), got, "dest {} fast overlay {:?} base {:?}", dest, f, cb);
            }
        }
        if co == cb {
            prop_assert!(o.is_empty());
        }
    }
}

proptest! {
    // A cheap structural property: a few hundred cases are plenty.
    #![proptest_config(ProptestConfig {
        cases: 500,
        ..ProptestConfig::default()
    })]

    /// Compiling is a function of the sets, not of the order or multiplicity of the lists.
    #[test]
    fn compile_ignores_order_and_duplicates(p in policy()) {
        let mut q = p.clone();
        q.exclude_cidrs.reverse();
        q.include_cidrs.extend(p.include_cidrs.iter().cloned());
        q.exclude_ports.reverse();
        q.include_ports.extend(p.include_ports.iter().cloned());
        prop_assert_eq!(compile(&p), compile(&q));
    }
}

/// Every port, exhaustively, for a fixed awkward policy (ranges that nest and straddle).
#[test]
fn every_port_matches_the_reference() {
    let r = |lo, hi, key| Sourced {
        value: PortRange { lo, hi },
        source: src(key),
    };
    let p = EffectivePolicy {
        enabled: true,
        exclude_ports: vec![r(1000, 1999, "x"), r(1500, 2500, "x"), r(65535, 65535, "x")],
        include_ports: vec![r(1, 65535, "i"), r(1200, 1300, "i"), r(3, 3, "i")],
        ..Default::default()
    };
    let c = compile(&p);
    for port in 0..=65535u16 {
        let dest = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), port);
        let want = evaluate(&p, dest, false);
        assert_eq!(
            (want.redirect, want.step),
            evaluate_compiled(&c, true, dest, false),
            "{port}"
        );
    }
}
