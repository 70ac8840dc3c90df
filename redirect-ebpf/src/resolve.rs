//! Which registered workload the calling task belongs to (docs/architecture.md, "The life of a
//! connect", step 2), resolved once per cgroup and kept in `CGROUP_CACHE`.
//!
//! The answer for a cgroup (the nearest registered ancestor, and whether the cgroup sits in
//! that workload's proxy container) only changes when the agent changes `POLICY`. The agent
//! bumps `POLICY_GEN` after every such write, so an entry is used only while the generation it
//! was resolved under is current:
//! - a program reads the generation *before* it walks, and stores the entry under that
//!   generation; the agent writes `POLICY` *before* it bumps. An entry that carries the
//!   current generation was therefore walked after the last bump's writes were in place;
//! - a walk that raced with a write the agent has not bumped for yet may see the old or the new
//!   registrations, as a connect at that instant could without the cache; the bump retires it.
//!
//! `BPF_MAP_TYPE_CGRP_STORAGE` would key this by the cgroup itself, but needs Linux 6.2 (our
//! minimum is 5.15), hence an LRU hash keyed by the cgroup id: a cgroup that goes away is
//! evicted in time, and a full or evicted cache only costs a walk.
use core::ptr::read_volatile;

use aya_ebpf::{
    btf_maps::{Array, LruHashMap},
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    macros::btf_map,
};
use redirect_common::{CGROUP_CACHE_ENTRIES, CgroupCache, MAX_CGROUP_DEPTH, Policy, flags};

use crate::maps::POLICY;

/// Slot 0: the registration generation, bumped by the agent after each `POLICY` write.
#[btf_map]
pub static POLICY_GEN: Array<u64, 1> = Array::new();

/// Current cgroup id → what the walk found there, under which generation.
#[btf_map]
pub static CGROUP_CACHE: LruHashMap<u64, CgroupCache, { CGROUP_CACHE_ENTRIES as usize }> =
    LruHashMap::new();

/// How many times [`policy_of`] copies again when the key's element changed under the copy.
const RECOPIES: usize = 2;

/// `POLICY`'s record for `id`, copied to the stack. POLICY is a preallocated hash: an update of a
/// key frees its old element, and the next update of another key on that CPU takes it over at
/// once, with no grace period (tests/tests/policy_slot_recycle.rs measures it). So the record is
/// copied straight after the lookup, and the key is looked up again after the copy: the same
/// element means the copy is this key's record even if this program was preempted meanwhile;
/// another element means the record was rewritten under the copy, and the current one is copied
/// instead (bounded: an agent rewriting it faster than a copy leaves the last copy, of this
/// key). `None`: no record (any more), as a connect an instant later would see.
#[inline(always)]
fn policy_of(id: u64) -> Option<Policy> {
    let mut p = POLICY.get_ptr(id)?;
    let mut copy = unsafe { read_volatile(p) };
    for _ in 0..RECOPIES {
        let again = POLICY.get_ptr(id)?;
        if core::ptr::eq(again, p) {
            return Some(copy);
        }
        p = again;
        copy = unsafe { read_volatile(p) };
    }
    Some(copy)
}

/// The policy record of the calling task's workload (copied to the stack by [`policy_of`]),
/// and whether the task sits in (or below) the proxy
/// container's cgroup, and the workload's registered cgroup id (its `POLICY` key). `None`: not
/// in the mesh.
#[inline(always)]
fn current_workload() -> Option<(Policy, bool, u64)> {
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let generation = POLICY_GEN
        .get_ptr(0)
        .map_or(0, |p| unsafe { read_volatile(p) });
    if let Some(p) = CGROUP_CACHE.get_ptr(cgroup) {
        // The entry names its own key and generation, and is checked after the copy: an LRU
        // node recycled for another key or generation while being read fails the check and
        // costs a walk, never a wrong answer.
        let c = unsafe { read_volatile(p) };
        if c.cgroup_id == cgroup && c.generation == generation {
            if c.workload_cgroup == 0 {
                return None;
            }
            // Gone although the generation is current: the agent removed the record and has
            // not bumped yet; walk, as a connect at this instant would without the cache.
            if let Some(policy) = policy_of(c.workload_cgroup) {
                return Some((policy, c.in_proxy_cgroup != 0, c.workload_cgroup));
            }
        }
    }
    let (workload_cgroup, in_proxy_cgroup) = walk();
    let entry = CgroupCache {
        cgroup_id: cgroup,
        generation,
        workload_cgroup,
        in_proxy_cgroup: in_proxy_cgroup as u32,
        _pad: 0,
    };
    // Best effort: a full or busy cache only means the next call walks again.
    let _ = CGROUP_CACHE.insert(cgroup, entry, 0);
    if workload_cgroup == 0 {
        return None;
    }
    policy_of(workload_cgroup).map(|policy| (policy, in_proxy_cgroup, workload_cgroup))
}

/// Walks from the root's first level down to the current cgroup and keeps the deepest
/// registered one, so a container cgroup created after its pod was registered is covered with
/// no agent action. Also reports whether the caller sits in (or below) the proxy container's
/// cgroup. Returns (registered cgroup id or 0, in proxy cgroup).
#[inline(always)]
fn walk() -> (u64, bool) {
    let mut found = 0u64;
    let mut proxy_cgroup = 0u64;
    let mut in_proxy_cgroup = false;
    for level in 1..=MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        if let Some(p) = POLICY.get_ptr(id) {
            // A deeper registration wins; a proxy match above it belonged to another policy.
            found = id;
            let f = unsafe { read_volatile(&(*p).flags) };
            proxy_cgroup = if f & flags::HAS_PROXY_CGROUP != 0 {
                unsafe { read_volatile(&(*p).proxy_cgroup) }
            } else {
                0
            };
            in_proxy_cgroup = false;
        } else if found != 0 && proxy_cgroup != 0 && proxy_cgroup == id {
            in_proxy_cgroup = true;
        }
    }
    (found, in_proxy_cgroup)
}

/// The workload of a connect (or a DNS datagram) and whether its caller is the proxy: in the
/// proxy container's cgroup, or the socket's owner (`sk->sk_uid`) is the proxy uid, compared as
/// iptables' `--uid-owner` does (sockstate.rs), not with whoever calls connect(). Also returns
/// the workload's registered cgroup id (the `POD_STATS` key).
#[inline(always)]
pub fn lookup_policy(sa: *mut aya_ebpf::bindings::bpf_sock_addr) -> Option<(Policy, bool, u64)> {
    let (policy, in_proxy_cgroup, workload) = current_workload()?;
    let is_proxy = in_proxy_cgroup
        || (policy.flags & flags::HAS_PROXY_UID != 0
            && crate::sockstate::owner_uid(sa) == policy.proxy_uid);
    Some((policy, is_proxy, workload))
}
