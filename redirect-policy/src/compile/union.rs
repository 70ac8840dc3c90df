//! The overlay of a policy that only adds exclusions to its base's, built from the lists alone
//! without compiling the whole table: FSM's and OSM's union annotations (a pod's CIDRs added to
//! a 100,000-CIDR mesh list), or a pod's own excluded port.
//!
//! Why it is exact: the whole table answers "Exclude if in any exclusion, else Include if in any
//! inclusion". With the same inclusions and the base's exclusions plus `extra`, that is Exclude
//! inside `extra`, and the base's answer everywhere else. An overlay holding `extra` as Exclude
//! entries, over the base, answers exactly that. The property test in proptests.rs holds it to
//! the reference evaluator.
use std::collections::HashSet;

use ipnet::IpNet;

use super::{Overlay, family, overlay::Layered, range_prefixes, table, trie};
use crate::types::{EffectivePolicy, PortRange, Sourced};

/// A base policy's outbound lists as sets, kept to compare workloads' policies against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lists {
    exclude_cidrs: HashSet<IpNet>,
    include_cidrs: HashSet<IpNet>,
    exclude_ports: HashSet<PortRange>,
    include_ports: HashSet<PortRange>,
}

fn set<T: Clone + Eq + std::hash::Hash>(l: &[Sourced<T>]) -> HashSet<T> {
    l.iter().map(|s| s.value.clone()).collect()
}

impl Lists {
    pub fn of(p: &EffectivePolicy) -> Self {
        Lists {
            exclude_cidrs: set(&p.exclude_cidrs),
            include_cidrs: set(&p.include_cidrs),
            exclude_ports: set(&p.exclude_ports),
            include_ports: set(&p.include_ports),
        }
    }
}

/// The values of `own` that `base` lacks.
fn extra<'a, T: Eq + std::hash::Hash>(own: &'a [Sourced<T>], base: &HashSet<T>) -> Vec<&'a T> {
    own.iter()
        .map(|s| &s.value)
        .filter(|v| !base.contains(v))
        .collect()
}

/// The overlay of `own` over `base`, when `own` has exactly the base's inclusions and the base's
/// exclusions plus some of its own; `None` otherwise (compile the whole table then).
pub fn extra_exclusions(own: &EffectivePolicy, base: &Lists) -> Option<Overlay> {
    let same = |own: &[Sourced<IpNet>], base: &HashSet<IpNet>| set(own) == *base;
    if !same(&own.include_cidrs, &base.include_cidrs)
        || set(&own.include_ports) != base.include_ports
    {
        return None;
    }
    // Every base exclusion must still be there (an override may have dropped some).
    fn kept<T: Eq + std::hash::Hash>(own: &HashSet<T>, base: &HashSet<T>) -> bool {
        base.iter().all(|v| own.contains(v))
    }
    let (own_cidrs, own_ports) = (set(&own.exclude_cidrs), set(&own.exclude_ports));
    if own_cidrs.len() < base.exclude_cidrs.len()
        || !kept(&own_cidrs, &base.exclude_cidrs)
        || !kept(&own_ports, &base.exclude_ports)
    {
        return None;
    }
    let cidrs = extra(&own.exclude_cidrs, &base.exclude_cidrs);
    let ports = extra(&own.exclude_ports, &base.exclude_ports);
    Some(exclusion_overlay(&cidrs, &ports))
}

/// The overlay of `cidrs` and `ports` added to `base`'s exclusions (the values it lacks), for a
/// policy that only adds exclusions (crate::additions): what [`extra_exclusions`] gives for
/// that policy, without its whole lists.
pub fn added_exclusions(cidrs: &[IpNet], ports: &[PortRange], base: &Lists) -> Overlay {
    let cidrs: HashSet<&IpNet> = cidrs
        .iter()
        .filter(|v| !base.exclude_cidrs.contains(v))
        .collect();
    let ports: HashSet<&PortRange> = ports
        .iter()
        .filter(|v| !base.exclude_ports.contains(v))
        .collect();
    let (cidrs, ports): (Vec<_>, Vec<_>) =
        (cidrs.into_iter().collect(), ports.into_iter().collect());
    exclusion_overlay(&cidrs, &ports)
}

/// Exclusions alone as an overlay: every entry of these minimal tables says Exclude.
fn exclusion_overlay(cidrs: &[&IpNet], ports: &[&PortRange]) -> Overlay {
    let v4 = family(cidrs.iter().copied(), true);
    let v6 = family(cidrs.iter().copied(), false);
    let ports: Vec<_> = ports.iter().flat_map(|r| range_prefixes(r)).collect();
    fn excluded(width: u8, exclude: &[trie::Prefix]) -> Vec<(trie::Prefix, Layered)> {
        let entries = trie::minimal(width, exclude, &[]).into_iter();
        entries.map(|(p, a)| (p, Layered::Rule(a))).collect()
    }
    let mut o = Overlay {
        v4: table(|width| excluded(width, &v4)),
        v6: table(|width| excluded(width, &v6)),
        ports: table(|width| excluded(width, &ports)),
    };
    o.v4.sort_unstable();
    o.v6.sort_unstable();
    o.ports.sort_unstable();
    o
}
