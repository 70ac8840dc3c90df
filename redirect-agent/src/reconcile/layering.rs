//! Which entries a workload gets: its own whole table, or an overlay over a shared base (its
//! mesh default's table, which every workload without annotations of its own already shares).
//! The kernel looks the overlay up first and the base where the overlay has no entry
//! (`redirect_common::decide::layered`), which answers what the whole table answers for every
//! destination (redirect-policy's compile/overlay.rs, held to it by property tests).
//!
//! So a pod that adds ten CIDRs to a 100,000-CIDR mesh list costs ten entries, not 100,010.
use std::sync::Arc;

use super::{Rules, desired::entries};
use crate::{
    bpf::PolicyEntries,
    policy::{Compiled, EffectivePolicy, Lists, Overlay, extra_exclusions, overlay_of},
};

/// A policy other workloads' tables can overlay: its compiled table, its lists and its entries.
pub struct Base<'a> {
    pub table: &'a Compiled,
    pub lists: &'a Lists,
    pub rules: &'a Arc<Rules>,
}

/// The overlay of a policy that only adds exclusions to its base's, from the lists alone,
/// without compiling the whole table (redirect-policy's compile/union.rs); None when that is not
/// the case or the overlay would not pay (then [`layer`] decides from the compiled table).
pub fn layer_exclusions(own: &EffectivePolicy, base: &Base) -> Option<(PolicyEntries, Arc<Rules>)> {
    exclusions_overlay(&extra_exclusions(own, base.lists)?, base)
}

/// The entries of an exclusions-only overlay `o` over `base`, when the overlay pays; None when
/// it does not (the whole table then).
pub fn exclusions_overlay(o: &Overlay, base: &Base) -> Option<(PolicyEntries, Arc<Rules>)> {
    let base_len = base.table.v4.len() + base.table.v6.len() + base.table.ports.len();
    // The whole table would have at most base_len + o.len() entries: the same rule as `layer`.
    (base_len + o.len() >= MIN_LAYERED && !o.is_empty() && o.len() <= base_len)
        .then(|| (overlay_entries(o), base.rules.clone()))
}

/// Tables smaller than this are written whole: the overlay would save little, and costs a
/// second trie lookup on every connect it does not match.
pub const MIN_LAYERED: usize = 64;

/// The entries for `own`, and the base they overlay (if they do). An overlay is chosen when it
/// is at most half the size of the whole table.
pub fn layer(own: &Compiled, base: Option<&Base>) -> (PolicyEntries, Option<Arc<Rules>>) {
    let whole = own.v4.len() + own.v6.len() + own.ports.len();
    if let Some(base) = base
        && whole >= MIN_LAYERED
        && base.table != own
    {
        let o = overlay_of(own, base.table);
        if !o.is_empty() && o.len() * 2 <= whole {
            return (overlay_entries(&o), Some(base.rules.clone()));
        }
    }
    (entries(own), None)
}

/// Overlay prefixes → trie entries (`Stop` is `action::STOP`).
pub fn overlay_entries(o: &Overlay) -> PolicyEntries {
    let mut e = PolicyEntries::default();
    for (net, v) in &o.v4 {
        e.v4.insert(
            (u32::from(net.prefix_len()), net.network().octets()),
            v.value(),
        );
    }
    for (net, v) in &o.v6 {
        e.v6.insert(
            (u32::from(net.prefix_len()), net.network().octets()),
            v.value(),
        );
    }
    for (p, v) in &o.ports {
        e.ports.insert((u32::from(p.len), p.port), v.value());
    }
    e
}
