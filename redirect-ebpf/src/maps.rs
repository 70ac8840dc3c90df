//! The maps shared with the agent, and the lookups and counters every program uses. Names must
//! match `redirect_common::map_names`; the agent pins each one under `--bpffs-dir/<NAME>`.
use aya_ebpf::{
    btf_maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    macros::btf_map,
};
use redirect_common::{
    CidrV4Key, CidrV6Key, DECISION_COUNT, Decision, MAX_RULE_ENTRIES, ORIG_EVENT_COUNT, OrigDst,
    OrigEvent, OrigTupleKey, POD_STATS_ENTRIES, POLICY_ID_BITS, PodDecisions, Policy, PortKey,
    Rule,
    decide::{Dest, NO_RULE},
};

/// cgroup id (inode of the pod's cgroup directory) → policy record.
#[btf_map]
pub static POLICY: HashMap<u64, Policy, 65536> = HashMap::new();

/// Declares one rule trie: {policy id, prefix} `$key` → an exclude/include [`Rule`].
macro_rules! rule_trie {
    ($key:ty, $entries:expr; $(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[aya_ebpf::macros::btf_map]
        pub static $name: aya_ebpf::btf_maps::LpmTrie<$key, redirect_common::Rule, { $entries as usize }> =
            aya_ebpf::btf_maps::LpmTrie::new();
    };
}
pub(crate) use rule_trie;

/// Declares one set of rule tries of `$entries` entries each: the port trie, then the IPv4 and
/// IPv6 address tries. The outbound set (`PORTS`, `CIDR_V4`, `CIDR_V6`) and the inbound one
/// (inbound.rs) are the same tables in policy-id spaces of their own, read by [`port_rule`] and
/// [`addr_rule`].
macro_rules! rule_tries {
    ($entries:expr; $(#[$pm:meta])* $ports:ident, $(#[$m4:meta])* $v4:ident, $(#[$m6:meta])* $v6:ident) => {
        $crate::maps::rule_trie!(redirect_common::PortKey, $entries; $(#[$pm])* $ports);
        $crate::maps::rule_trie!(redirect_common::CidrV4Key, $entries; $(#[$m4])* $v4);
        $crate::maps::rule_trie!(redirect_common::CidrV6Key, $entries; $(#[$m6])* $v6);
    };
}
pub(crate) use rule_tries;

/// Declares a per-CPU `u64` counter array with one slot per variant of a `counter_enum!` of
/// redirect-common (`$slots` is its count), written by [`bump`].
macro_rules! counter_array {
    ($(#[$meta:meta])* $name:ident, $slots:expr) => {
        $(#[$meta])*
        #[aya_ebpf::macros::btf_map]
        pub static $name: aya_ebpf::btf_maps::PerCpuArray<u64, { $slots as usize }> =
            aya_ebpf::btf_maps::PerCpuArray::new();
    };
}
pub(crate) use counter_array;

rule_tries!(MAX_RULE_ENTRIES;
    /// {policy id, port prefix} → exclude/include.
    PORTS,
    /// {policy id, IPv4 prefix} → exclude/include.
    CIDR_V4,
    /// {policy id, IPv6 prefix} → exclude/include.
    CIDR_V6
);

counter_array!(
    /// Per-CPU decision counters, indexed by `Decision`.
    COUNTERS,
    DECISION_COUNT
);

/// Registered workload (its `POLICY` key) → this CPU's decision counts. Entries are made and
/// deleted by the agent only; a workload without one is counted in `COUNTERS` instead. Key 0
/// (no cgroup has id 0) holds the counts of removed workloads, folded in by the agent alone.
#[btf_map]
pub static POD_STATS: PerCpuHashMap<u64, PodDecisions, { POD_STATS_ENTRIES as usize }> =
    PerCpuHashMap::new();

/// {client netns, client → proxy 4-tuple} → original destination: the hand-off from a client
/// socket (or from sk_lookup, inbound) to the proxy's accepted socket, which has another
/// cookie and in node mode another netns. Written when the client side is established, taken
/// (copied into the proxy socket's own storage and deleted) when the proxy side is. LRU bounds
/// hand-offs whose proxy side never shows up in the attached cgroup tree.
#[btf_map]
pub static ORIG_TUPLE: LruHashMap<OrigTupleKey, OrigDst, 65536> = LruHashMap::new();

counter_array!(
    /// Per-CPU counters of the original-destination programs, indexed by `OrigEvent`.
    ORIG_STATS,
    ORIG_EVENT_COUNT
);

/// Adds one to slot `index` of a per-CPU counter array.
#[inline(always)]
pub fn bump<const N: usize, const F: usize>(map: &PerCpuArray<u64, N, F>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race with this increment.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count(decision: Decision) {
    bump(&COUNTERS, decision as u32);
}

/// Counts a registered workload's decision once: in its `POD_STATS` entry if it has one (one
/// per-CPU hash lookup), else in the node's `COUNTERS`. Never both, so a connect costs one
/// per-CPU update; the agent's node totals are `COUNTERS` plus every `POD_STATS` entry
/// (redirect-agent/src/bpf/podstats.rs).
#[inline(always)]
pub fn count_workload(workload: u64, decision: Decision) {
    if let Some(p) = POD_STATS.get_ptr_mut(workload)
        && let Some(slot) = unsafe { (*p).counts.get_mut(decision as usize) }
    {
        // Per-CPU value: no other writer can race with this increment.
        *slot += 1;
        return;
    }
    count(decision);
}

#[inline(always)]
pub fn orig_count(event: OrigEvent) {
    bump(&ORIG_STATS, event as u32);
}

/// The port trie's answer for `port` (big-endian) under `policy_id` (big-endian), or `NO_RULE`.
/// Shared by the outbound tries (PORTS) and the inbound ones (IN_PORTS).
#[inline(always)]
pub fn port_rule<const N: usize, const F: usize>(
    trie: &LpmTrie<PortKey, Rule, N, F>,
    policy_id: [u8; 4],
    port: [u8; 2],
) -> u32 {
    let key = PortKey {
        policy_id,
        port,
        _pad: [0; 2],
    };
    trie.get(&Key::new(POLICY_ID_BITS + 16, key))
        .map_or(NO_RULE, |r| r.action)
}

/// The address tries' answer for `addr` under `policy_id`, or `NO_RULE`: CIDR_V4/6 for a
/// destination, IN_SRC_V4/6 for an inbound source.
#[inline(always)]
pub fn addr_rule<const N4: usize, const F4: usize, const N6: usize, const F6: usize>(
    v4: &LpmTrie<CidrV4Key, Rule, N4, F4>,
    v6: &LpmTrie<CidrV6Key, Rule, N6, F6>,
    policy_id: [u8; 4],
    addr: &Dest,
) -> u32 {
    match *addr {
        Dest::V4(addr) => {
            let key = Key::new(POLICY_ID_BITS + 32, CidrV4Key { policy_id, addr });
            v4.get(&key).map_or(NO_RULE, |r| r.action)
        }
        Dest::V6(addr) => {
            let key = Key::new(POLICY_ID_BITS + 128, CidrV6Key { policy_id, addr });
            v6.get(&key).map_or(NO_RULE, |r| r.action)
        }
    }
}
