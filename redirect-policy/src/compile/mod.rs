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
    let cidrs = |l: &[Sourced<IpNet>], v4| family(l.iter().map(|s| &s.value), v4);
    let ports = |l: &[Sourced<PortRange>]| -> Vec<Prefix> {
        l.iter().flat_map(|s| range_prefixes(&s.value)).collect()
    };
    let (ex4, in4) = (cidrs(&p.exclude_cidrs, true), cidrs(&p.include_cidrs, true));
    let (ex6, in6) = (
        cidrs(&p.exclude_cidrs, false),
        cidrs(&p.include_cidrs, false),
    );
    let (exp, inp) = (ports(&p.exclude_ports), ports(&p.include_ports));
    let mut c = Compiled {
        v4: table(|width| trie::minimal(width, &ex4, &in4)),
        v6: table(|width| trie::minimal(width, &ex6, &in6)),
        ports: table(|width| trie::minimal(width, &exp, &inp)),
    };
    c.v4.sort_unstable();
    c.v6.sort_unstable();
    c.ports.sort_unstable();
    c
}

/// A table's key as a trie prefix and back: the tables hold `Ipv4Net`, `Ipv6Net` and
/// [`PortPrefix`], the trie algorithms ([`trie::minimal`], [`overlay::overlay`]) work on
/// prefixes of the key's width.
pub(crate) trait TableKey: Sized {
    const WIDTH: u8;
    fn prefix(&self) -> Prefix;
    /// The trie never builds a prefix longer than its width.
    fn from_prefix(p: Prefix) -> Self;
}

impl TableKey for Ipv4Net {
    const WIDTH: u8 = 32;
    fn prefix(&self) -> Prefix {
        Prefix {
            bits: u128::from(u32::from(self.network())),
            len: self.prefix_len(),
        }
    }
    fn from_prefix(p: Prefix) -> Self {
        Ipv4Net::new(Ipv4Addr::from(p.bits as u32), p.len).expect("v4 prefix length <= 32")
    }
}

impl TableKey for Ipv6Net {
    const WIDTH: u8 = 128;
    fn prefix(&self) -> Prefix {
        Prefix {
            bits: u128::from(self.network()),
            len: self.prefix_len(),
        }
    }
    fn from_prefix(p: Prefix) -> Self {
        Ipv6Net::new(Ipv6Addr::from(p.bits), p.len).expect("v6 prefix length <= 128")
    }
}

impl TableKey for PortPrefix {
    const WIDTH: u8 = 16;
    fn prefix(&self) -> Prefix {
        Prefix {
            bits: u128::from(self.port),
            len: self.len,
        }
    }
    fn from_prefix(p: Prefix) -> Self {
        PortPrefix {
            port: p.bits as u16,
            len: p.len,
        }
    }
}

/// What a trie algorithm builds at `K`'s width, keyed as the table.
pub(crate) fn table<K: TableKey, V>(build: impl FnOnce(u8) -> Vec<(Prefix, V)>) -> Vec<(K, V)> {
    build(K::WIDTH)
        .into_iter()
        .map(|(p, v)| (K::from_prefix(p), v))
        .collect()
}

/// The prefixes of the IPv4 (`v4`) or the IPv6 networks of `nets`.
pub(crate) fn family<'a>(nets: impl IntoIterator<Item = &'a IpNet>, v4: bool) -> Vec<Prefix> {
    nets.into_iter()
        .filter_map(|n| match n {
            IpNet::V4(n) if v4 => Some(n.prefix()),
            IpNet::V6(n) if !v4 => Some(n.prefix()),
            _ => None,
        })
        .collect()
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
    fn layered<K: TableKey>(
        own: &[(K, Action)],
        base: &[(K, Action)],
    ) -> Vec<(K, overlay::Layered)> {
        let prefixes = |l: &[(K, Action)]| -> Vec<(Prefix, Action)> {
            l.iter().map(|(k, a)| (k.prefix(), *a)).collect()
        };
        table(|width| overlay::overlay(width, &prefixes(own), &prefixes(base)))
    }
    Overlay {
        ports: layered(&own.ports, &base.ports),
        v4: layered(&own.v4, &base.v4),
        v6: layered(&own.v6, &base.v6),
    }
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
