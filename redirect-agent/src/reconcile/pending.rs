//! The order in which a pass writes its records. Disabled records come first: a record on a
//! parent cgroup that redirects (the Kubernetes source's startup-race guard on the kubepods
//! roots, docs/kubernetes.md "The startup race") must never catch, even for the moment between
//! two writes of one pass, a pod that is to be left alone and gets its disabled record in the
//! same pass.
use std::collections::BTreeMap;

use redirect_common::flags;

use super::Desired;

/// `desired` in write order: records without `ENABLED` first, then the rest, each in cgroup id
/// order.
pub fn disabled_first(desired: &BTreeMap<u64, Desired>) -> impl Iterator<Item = (&u64, &Desired)> {
    let off = |w: &Desired| {
        w.own
            .as_ref()
            .is_some_and(|c| c.record.flags & flags::ENABLED == 0)
    };
    let first = desired.iter().filter(move |(_, w)| off(w));
    first.chain(desired.iter().filter(move |(_, w)| !off(w)))
}
