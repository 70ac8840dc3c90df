//! The map-apply loop: desired per-cgroup policies → the pinned maps, by diff.
//!
//! Every change writes the new entries under a fresh policy id, then swaps the cgroup's record in
//! one map update, then deletes the old entries. A connect therefore sees the old policy or the
//! new one, whole, and there is never a window with missing entries.
use std::collections::{BTreeMap, BTreeSet};

use redirect_common::Policy;

use crate::bpf::{BpfError, PinnedMaps, PolicyEntries};

/// What one cgroup should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Who this is, for messages (`namespace/name`).
    pub workload: String,
    /// The record to install; its `policy_id` is ignored (assigned here).
    pub record: Policy,
    pub entries: PolicyEntries,
}

#[derive(Clone, Debug)]
struct Applied {
    workload: String,
    record: Policy,
    entries: PolicyEntries,
}

/// A workload whose policy could not be written; it keeps what it had.
#[derive(Debug)]
pub struct ApplyError {
    pub workload: String,
    pub cgroup_id: u64,
    pub error: BpfError,
}

#[derive(Debug, Default)]
pub struct ApplyReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    pub errors: Vec<ApplyError>,
}

/// Entry counts per map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    pub policies: usize,
    pub v4: usize,
    pub v6: usize,
    pub ports: usize,
}

/// Sole writer of the pinned maps.
pub struct Applier {
    maps: PinnedMaps,
    applied: BTreeMap<u64, Applied>,
    /// Above every id in use until it wraps.
    next_id: u32,
    /// Set once `next_id` has wrapped: from then on a candidate id may still be in use.
    wrapped: bool,
    /// Inbound (sk_lookup) state, in maps and an id space of its own.
    pub inbound: super::inbound::InboundApplier,
}

impl Applier {
    /// Takes over whatever the maps already hold (a restart, even after kill -9): those records
    /// are the last good state and stay until a snapshot says otherwise. Entries no record refers
    /// to (a crash between writing entries and swapping the record) are deleted.
    pub fn adopt(mut maps: PinnedMaps) -> Result<Self, BpfError> {
        let mut by_id = maps.entries()?;
        let mut applied = BTreeMap::new();
        for (cgroup_id, record) in maps.policies()? {
            let entries = by_id.remove(&record.policy_id).unwrap_or_default();
            applied.insert(
                cgroup_id,
                Applied {
                    workload: format!("(adopted cgroup {cgroup_id})"),
                    record,
                    entries,
                },
            );
        }
        for (id, orphan) in &by_id {
            maps.remove_entries(*id, orphan);
        }
        let next_id = applied
            .values()
            .map(|a| a.record.policy_id)
            .max()
            .unwrap_or(0)
            .wrapping_add(1);
        Ok(Self {
            inbound: super::inbound::InboundApplier::adopt(maps.dir()),
            maps,
            applied,
            next_id,
            wrapped: false,
        })
    }

    pub fn maps(&self) -> &PinnedMaps {
        &self.maps
    }

    pub fn is_applied(&self, cgroup_id: u64) -> bool {
        self.applied.contains_key(&cgroup_id)
    }

    pub fn applied_count(&self) -> usize {
        self.applied.len()
    }

    /// Entries written per map (what the metrics report as fill levels).
    pub fn fill(&self) -> Fill {
        let mut f = Fill {
            policies: self.applied.len(),
            ..Fill::default()
        };
        for a in self.applied.values() {
            f.v4 += a.entries.v4.len();
            f.v6 += a.entries.v6.len();
            f.ports += a.entries.ports.len();
        }
        f
    }

    /// Applies a full desired state. Cgroups in `keep` are left exactly as they are (their new
    /// policy was invalid); every other applied cgroup missing from `desired` is removed.
    pub fn apply(&mut self, desired: &BTreeMap<u64, Desired>, keep: &BTreeSet<u64>) -> ApplyReport {
        let mut report = ApplyReport::default();
        // Adds and updates first, removals last.
        for (&cgroup_id, want) in desired {
            match self.apply_one(cgroup_id, want) {
                Ok(Change::None) => report.unchanged += 1,
                Ok(Change::Added) => report.added += 1,
                Ok(Change::Updated) => report.updated += 1,
                Err(error) => report.errors.push(ApplyError {
                    workload: want.workload.clone(),
                    cgroup_id,
                    error,
                }),
            }
        }
        let gone: Vec<u64> = self
            .applied
            .keys()
            .filter(|id| !desired.contains_key(id) && !keep.contains(id))
            .copied()
            .collect();
        for cgroup_id in gone {
            if let Some(old) = self.applied.remove(&cgroup_id) {
                self.maps.remove_policy(cgroup_id);
                self.maps.remove_entries(old.record.policy_id, &old.entries);
                report.removed += 1;
            }
        }
        report
    }

    fn apply_one(&mut self, cgroup_id: u64, want: &Desired) -> Result<Change, BpfError> {
        let old = self.applied.get(&cgroup_id);
        if let Some(old) = old {
            let same_record = Policy {
                policy_id: old.record.policy_id,
                ..want.record
            } == old.record;
            if same_record && old.entries == want.entries {
                if old.workload != want.workload {
                    // An adopted record has just been claimed by its workload.
                    let old = self.applied.get_mut(&cgroup_id).expect("present");
                    old.workload = want.workload.clone();
                }
                return Ok(Change::None);
            }
        }
        let id = self.allocate_id();
        self.maps.insert_entries(id, &want.entries)?;
        let record = Policy {
            policy_id: id,
            ..want.record
        };
        if let Err(e) = self.maps.set_policy(cgroup_id, &record) {
            self.maps.remove_entries(id, &want.entries);
            return Err(e);
        }
        let change = if let Some(old) = self.applied.insert(
            cgroup_id,
            Applied {
                workload: want.workload.clone(),
                record,
                entries: want.entries.clone(),
            },
        ) {
            self.maps.remove_entries(old.record.policy_id, &old.entries);
            Change::Updated
        } else {
            Change::Added
        };
        Ok(change)
    }

    /// Ids are never 0 and never one in use, so the old and new entries of an update cannot
    /// collide. Ids only repeat after 2^32 allocations, so the scan for one in use runs only
    /// once the counter has wrapped, instead of on every allocation of a reconcile pass.
    fn allocate_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if id == 0 {
                self.wrapped = true;
                continue;
            }
            if !self.wrapped || !self.applied.values().any(|a| a.record.policy_id == id) {
                return id;
            }
        }
    }
}

enum Change {
    None,
    Added,
    Updated,
}
