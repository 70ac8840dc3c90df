//! The maps shared with the agent. Names must match `redirect_common::map_names`; the agent pins
//! each one under `--bpffs-dir/<NAME>`.
use aya_ebpf::{
    btf_maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use redirect_common::{
    CidrV4Key, CidrV6Key, DECISION_COUNT, Decision, MAX_RULE_ENTRIES, ORIG_EVENT_COUNT, OrigDst,
    OrigEvent, OrigTupleKey, Policy, PortKey, Rule,
};

/// cgroup id (inode of the pod's cgroup directory) → policy record.
#[btf_map]
pub static POLICY: HashMap<u64, Policy, 65536> = HashMap::new();

/// {policy id, IPv4 prefix} → exclude/include.
#[btf_map]
pub static CIDR_V4: LpmTrie<CidrV4Key, Rule, { MAX_RULE_ENTRIES as usize }> = LpmTrie::new();

/// {policy id, IPv6 prefix} → exclude/include.
#[btf_map]
pub static CIDR_V6: LpmTrie<CidrV6Key, Rule, { MAX_RULE_ENTRIES as usize }> = LpmTrie::new();

/// {policy id, port prefix} → exclude/include.
#[btf_map]
pub static PORTS: LpmTrie<PortKey, Rule, { MAX_RULE_ENTRIES as usize }> = LpmTrie::new();

/// Per-CPU decision counters, indexed by `Decision`.
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { DECISION_COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(decision: Decision) {
    if let Some(slot) = COUNTERS.get_ptr_mut(decision as u32) {
        // Per-CPU slot: no other writer can race with this increment.
        unsafe { *slot += 1 };
    }
}

/// Socket cookie of a redirected client socket → its original destination. Written at connect
/// time, read by getpeername, deleted when the socket closes (sockops state callback). LRU
/// bounds what a socket that fails before tcp_connect (no close callback) leaves behind.
#[btf_map]
pub static ORIG_COOKIE: LruHashMap<u64, OrigDst, 65536> = LruHashMap::new();

/// {client netns, client → proxy 4-tuple} → original destination, for the proxy's accepted
/// socket (which has a different cookie, and in node mode another netns). Written when the client
/// side is established, deleted when the proxy's socket closes; LRU bounds records whose proxy
/// side never shows up in the attached cgroup tree.
#[btf_map]
pub static ORIG_TUPLE: LruHashMap<OrigTupleKey, OrigDst, 65536> = LruHashMap::new();

/// Per-CPU counters of the original-destination programs, indexed by `OrigEvent`.
#[btf_map]
pub static ORIG_STATS: PerCpuArray<u64, { ORIG_EVENT_COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn orig_count(event: OrigEvent) {
    if let Some(slot) = ORIG_STATS.get_ptr_mut(event as u32) {
        // Per-CPU slot: no other writer can race with this increment.
        unsafe { *slot += 1 };
    }
}
