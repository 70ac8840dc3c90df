//! Effective policy → trie entries. The kernel does one port-trie lookup and one CIDR-trie lookup
//! per family, so each table must answer "Exclude if in any exclude entry, else Include if in any
//! include entry, else no match" by longest prefix alone. [`trie::minimal`] builds the smallest
//! such table.

pub mod overlay;
pub(crate) mod trie;
pub mod union;

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::types::{Action, Compiled, EffectivePolicy, PortPrefix, PortRange, Sourced};
use trie::Prefix;

/// Compiles the outbound lists of `p` (whether or not `p.enabled`: the caller puts the enabled
/// flag in the policy record).
pub fn compile(p: &EffectivePolicy) -> Compiled {
    let v4 = |l: &[Sourced<IpNet>]| -> Vec<Prefix> {
        l.iter()
            .filter_map(|s| match s.value {
                IpNet::V4(n) => Some(Prefix {
                    bits: u128::from(u32::from(n.network())),
                    len: n.prefix_len(),
                }),
                IpNet::V6(_) => None,
            })
            .collect()
    };
    let v6 = |l: &[Sourced<IpNet>]| -> Vec<Prefix> {
        l.iter()
            .filter_map(|s| match s.value {
                IpNet::V6(n) => Some(Prefix {
                    bits: u128::from(n.network()),
                    len: n.prefix_len(),
                }),
                IpNet::V4(_) => None,
            })
            .collect()
    };
    let ports = |l: &[Sourced<PortRange>]| -> Vec<Prefix> {
        l.iter().flat_map(|s| range_prefixes(&s.value)).collect()
    };

    let mut c = Compiled {
        v4: trie::minimal(32, &v4(&p.exclude_cidrs), &v4(&p.include_cidrs))
            .into_iter()
            .map(|(pre, a)| (v4_net(pre), a))
            .collect(),
        v6: trie::minimal(128, &v6(&p.exclude_cidrs), &v6(&p.include_cidrs))
            .into_iter()
            .map(|(pre, a)| (v6_net(pre), a))
            .collect(),
        ports: trie::minimal(16, &ports(&p.exclude_ports), &ports(&p.include_ports))
            .into_iter()
            .map(|(pre, a)| (port_prefix(pre), a))
            .collect(),
    };
    c.v4.sort_unstable();
    c.v6.sort_unstable();
    c.ports.sort_unstable();
    c
}

/// A workload's CIDR tables as an overlay over its base (the mesh default's tables, shared under
/// their own id): the kernel looks the overlay up first and the base where the overlay has no
/// entry, which answers what `own` answers for every address and port (overlay.rs). The port
/// table is layered too: the kernel falls back to the base for both lookups
/// (`redirect_common::decide::layered`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overlay {
    pub v4: Vec<(Ipv4Net, overlay::Layered)>,
    pub v6: Vec<(Ipv6Net, overlay::Layered)>,
    pub ports: Vec<(PortPrefix, overlay::Layered)>,
}

impl Overlay {
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len() + self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The overlay of `own` over `base` (see [`Overlay`]).
pub fn overlay_of(own: &Compiled, base: &Compiled) -> Overlay {
    let p4 = |l: &[(Ipv4Net, Action)]| -> Vec<(Prefix, Action)> {
        l.iter()
            .map(|(n, a)| {
                let p = Prefix {
                    bits: u128::from(u32::from(n.network())),
                    len: n.prefix_len(),
                };
                (p, *a)
            })
            .collect()
    };
    let p6 = |l: &[(Ipv6Net, Action)]| -> Vec<(Prefix, Action)> {
        l.iter()
            .map(|(n, a)| {
                let p = Prefix {
                    bits: u128::from(n.network()),
                    len: n.prefix_len(),
                };
                (p, *a)
            })
            .collect()
    };
    let pp = |l: &[(PortPrefix, Action)]| -> Vec<(Prefix, Action)> {
        l.iter()
            .map(|(p, a)| {
                let pre = Prefix {
                    bits: u128::from(p.port),
                    len: p.len,
                };
                (pre, *a)
            })
            .collect()
    };
    Overlay {
        ports: overlay::overlay(16, &pp(&own.ports), &pp(&base.ports))
            .into_iter()
            .map(|(p, v)| (port_prefix(p), v))
            .collect(),
        v4: overlay::overlay(32, &p4(&own.v4), &p4(&base.v4))
            .into_iter()
            .map(|(p, v)| (v4_net(p), v))
            .collect(),
        v6: overlay::overlay(128, &p6(&own.v6), &p6(&base.v6))
            .into_iter()
            .map(|(p, v)| (v6_net(p), v))
            .collect(),
    }
}

fn v4_net(p: Prefix) -> Ipv4Net {
    // The trie never builds a prefix longer than its width.
    Ipv4Net::new(Ipv4Addr::from(p.bits as u32), p.len).expect("v4 prefix length <= 32")
}

fn port_prefix(p: Prefix) -> PortPrefix {
    PortPrefix {
        port: p.bits as u16,
        len: p.len,
    }
}

fn v6_net(p: Prefix) -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::from(p.bits), p.len).expect("v6 prefix length <= 128")
}

/// The fewest aligned binary prefixes covering exactly `lo..=hi` (at most 30 for 16 bits).
pub(crate) fn range_prefixes(r: &PortRange) -> Vec<Prefix> {
    let (mut lo, hi) = (u32::from(r.lo), u32::from(r.hi));
    let mut out = Vec::new();
    while lo <= hi {
        // The largest block that starts at `lo`, is aligned, and ends by `hi`.
        let mut k = lo.trailing_zeros().min(16);
        while lo + (1 << k) - 1 > hi {
            k -= 1;
        }
        out.push(Prefix {
            bits: u128::from(lo),
            len: (16 - k) as u8,
        });
        lo += 1 << k;
    }
    out
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
