//! The maps shared with the agent. Names must match `redirect_common::map_names`; the agent pins
//! each one under `--bpffs-dir/<NAME>`.
use aya_ebpf::{
    btf_maps::{HashMap, LpmTrie, PerCpuArray},
    macros::btf_map,
};
use redirect_common::{CidrV4Key, CidrV6Key, DECISION_COUNT, Decision, Policy, PortKey, Rule};

/// cgroup id (inode of the pod's cgroup directory) → policy record.
#[btf_map]
pub static POLICY: HashMap<u64, Policy, 65536> = HashMap::new();

/// {policy id, IPv4 prefix} → exclude/include.
#[btf_map]
pub static CIDR_V4: LpmTrie<CidrV4Key, Rule, 1048576> = LpmTrie::new();

/// {policy id, IPv6 prefix} → exclude/include.
#[btf_map]
pub static CIDR_V6: LpmTrie<CidrV6Key, Rule, 1048576> = LpmTrie::new();

/// {policy id, port prefix} → exclude/include.
#[btf_map]
pub static PORTS: LpmTrie<PortKey, Rule, 1048576> = LpmTrie::new();

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
