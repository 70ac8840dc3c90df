//! The map writes the applier needs, behind a small trait: the pinned maps in production, an
//! in-memory model (with the kernel's capacity rule) in unit tests and in the scale harness.
use std::collections::BTreeMap;

use redirect_common::{Policy, map_names};

use crate::bpf::{BpfError, PinnedMaps, PolicyEntries};

/// Capacity of each rule trie (`max_entries`, i.e. `--max-rule-entries` when the maps were made).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub v4: usize,
    pub v6: usize,
    pub ports: usize,
}

/// What [`super::Applier`] writes. Entry writes are whole-or-nothing per policy id.
pub trait PolicyMaps {
    /// Every record, by cgroup id (adoption after a restart).
    fn policies(&self) -> Result<BTreeMap<u64, Policy>, BpfError>;
    /// Every trie entry, grouped by policy id (adoption after a restart).
    fn entries(&self) -> Result<BTreeMap<u32, PolicyEntries>, BpfError>;
    fn capacity(&self) -> Capacity;
    /// Writes all of a policy's entries, or none of them.
    fn insert_entries(&mut self, id: u32, e: &PolicyEntries) -> Result<(), BpfError>;
    /// Best effort: an entry that is already gone is not an error.
    fn remove_entries(&mut self, id: u32, e: &PolicyEntries);
    /// One atomic update of a cgroup's record.
    fn set_policy(&mut self, cgroup_id: u64, policy: &Policy) -> Result<(), BpfError>;
    fn remove_policy(&mut self, cgroup_id: u64);
    /// When deferred deletions (the per-pod counters of removed workloads) are due.
    fn next_due(&self) -> Option<std::time::Instant> {
        None
    }
    /// Runs the deferred deletions due at `now`.
    fn collect_due(&mut self, _now: std::time::Instant) {}
}

impl PolicyMaps for PinnedMaps {
    fn policies(&self) -> Result<BTreeMap<u64, Policy>, BpfError> {
        PinnedMaps::policies(self)
    }
    fn entries(&self) -> Result<BTreeMap<u32, PolicyEntries>, BpfError> {
        PinnedMaps::entries(self)
    }
    fn capacity(&self) -> Capacity {
        self.rule_capacity()
    }
    fn insert_entries(&mut self, id: u32, e: &PolicyEntries) -> Result<(), BpfError> {
        PinnedMaps::insert_entries(self, id, e)
    }
    fn remove_entries(&mut self, id: u32, e: &PolicyEntries) {
        PinnedMaps::remove_entries(self, id, e)
    }
    fn set_policy(&mut self, cgroup_id: u64, policy: &Policy) -> Result<(), BpfError> {
        PinnedMaps::set_policy(self, cgroup_id, policy)
    }
    fn remove_policy(&mut self, cgroup_id: u64) {
        PinnedMaps::remove_policy(self, cgroup_id)
    }
    fn next_due(&self) -> Option<std::time::Instant> {
        self.pod_stats_due()
    }
    fn collect_due(&mut self, now: std::time::Instant) {
        self.collect_pod_stats(now)
    }
}

/// The maps in memory, refusing inserts past capacity the way the kernel does (E2BIG), and able
/// to fail the next N writes on demand (fail-then-retry tests).
#[derive(Clone, Debug)]
pub struct MemMaps {
    pub records: BTreeMap<u64, Policy>,
    pub rules: BTreeMap<u32, PolicyEntries>,
    pub capacity: Capacity,
    /// The next this-many record or entry writes fail with EIO.
    pub fail_writes: usize,
    /// Writes done (records and entry sets), for tests that check nothing was rewritten.
    pub writes: usize,
}

impl MemMaps {
    pub fn new(capacity: usize) -> Self {
        Self {
            records: BTreeMap::new(),
            rules: BTreeMap::new(),
            capacity: Capacity {
                v4: capacity,
                v6: capacity,
                ports: capacity,
            },
            fail_writes: 0,
            writes: 0,
        }
    }

    /// Entries per trie (v4, v6, ports).
    pub fn fill(&self) -> (usize, usize, usize) {
        self.rules.values().fold((0, 0, 0), |(a, b, c), e| {
            (a + e.v4.len(), b + e.v6.len(), c + e.ports.len())
        })
    }

    fn fail(&mut self, map: &'static str, errno: i32) -> Result<(), BpfError> {
        Err(BpfError::Map {
            map,
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: std::io::Error::from_raw_os_error(errno),
            }),
        })
    }

    fn take_failure(&mut self) -> bool {
        if self.fail_writes > 0 {
            self.fail_writes -= 1;
            true
        } else {
            false
        }
    }
}

impl PolicyMaps for MemMaps {
    fn policies(&self) -> Result<BTreeMap<u64, Policy>, BpfError> {
        Ok(self.records.clone())
    }
    fn entries(&self) -> Result<BTreeMap<u32, PolicyEntries>, BpfError> {
        Ok(self.rules.clone())
    }
    fn capacity(&self) -> Capacity {
        self.capacity
    }
    fn insert_entries(&mut self, id: u32, e: &PolicyEntries) -> Result<(), BpfError> {
        if self.take_failure() {
            return self.fail(map_names::CIDR_V4, libc::EIO);
        }
        let (v4, v6, ports) = self.fill();
        let have = self.rules.get(&id);
        let new = |n: usize, old: Option<usize>| n - old.unwrap_or(0).min(n);
        if v4 + new(e.v4.len(), have.map(|h| h.v4.len())) > self.capacity.v4 {
            return self.fail(map_names::CIDR_V4, libc::E2BIG);
        }
        if v6 + new(e.v6.len(), have.map(|h| h.v6.len())) > self.capacity.v6 {
            return self.fail(map_names::CIDR_V6, libc::E2BIG);
        }
        if ports + new(e.ports.len(), have.map(|h| h.ports.len())) > self.capacity.ports {
            return self.fail(map_names::PORTS, libc::E2BIG);
        }
        self.writes += 1;
        let slot = self.rules.entry(id).or_default();
        slot.v4.extend(e.v4.iter().map(|(k, v)| (*k, *v)));
        slot.v6.extend(e.v6.iter().map(|(k, v)| (*k, *v)));
        slot.ports.extend(e.ports.iter().map(|(k, v)| (*k, *v)));
        Ok(())
    }
    fn remove_entries(&mut self, id: u32, e: &PolicyEntries) {
        if let Some(slot) = self.rules.get_mut(&id) {
            for k in e.v4.keys() {
                slot.v4.remove(k);
            }
            for k in e.v6.keys() {
                slot.v6.remove(k);
            }
            for k in e.ports.keys() {
                slot.ports.remove(k);
            }
            if slot.is_empty() {
                self.rules.remove(&id);
            }
        }
    }
    fn set_policy(&mut self, cgroup_id: u64, policy: &Policy) -> Result<(), BpfError> {
        if self.take_failure() {
            return self.fail(map_names::POLICY, libc::EIO);
        }
        self.writes += 1;
        self.records.insert(cgroup_id, *policy);
        Ok(())
    }
    fn remove_policy(&mut self, cgroup_id: u64) {
        self.records.remove(&cgroup_id);
    }
}
