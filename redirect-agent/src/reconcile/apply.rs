//! The map-apply loop: desired per-cgroup policies → the maps, by diff (docs/architecture.md,
//! "The reconcile rules").
//!
//! Policies are content-addressed: identical compiled entry sets share one policy id and one
//! copy of the trie entries, with a reference count per id (sets.rs). A workload whose table is
//! a small overlay over a shared base (its mesh default's) names both, and holds a reference on
//! each. A change acquires the new base and the new id first (writing their entries if nobody
//! has them yet), then swaps the cgroup's record in one map update, then releases the old ones.
//! A connect therefore sees the old policy or the new one, whole. Released sets are deleted
//! [`GRACE`] after their last reference went.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use redirect_common::{Policy, decide::NO_BASE, flags};

use super::{
    Fallback,
    maps::PolicyMaps,
    sets::{Fill, Rules, Sets},
};
use crate::bpf::{BpfError, PinnedMaps};

/// How long a replaced entry set stays in the tries after the last record stopped naming it.
pub const GRACE: Duration = Duration::from_secs(2);

/// One way to run a workload: its record (`policy_id` and `base_id` are assigned here) and
/// entries: its whole table, or an overlay over `base`.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub record: Policy,
    pub rules: Arc<Rules>,
    /// The shared set `rules` overlays (`Policy::base_id`), if any.
    pub base: Option<Arc<Rules>>,
}

/// What one cgroup should have, in order of preference.
#[derive(Clone, Debug)]
pub struct Desired {
    /// Who this is, for messages (`namespace/name`).
    pub workload: String,
    /// The workload's own policy; None when it is invalid.
    pub own: Option<Candidate>,
    /// The mesh default for this workload, used when the own policy is invalid or does not fit
    /// and there is no good policy of its own to keep.
    pub mesh_default: Option<Candidate>,
    /// The record of the last resort (with the include-everything entries): a workload is never
    /// left without a record because its entries do not fit.
    pub redirect_all: Policy,
}

/// Where an applied record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Own,
    MeshDefault,
    RedirectAll,
    /// Found in the maps at start: the last good state of the previous run.
    Adopted,
}

#[derive(Clone, Debug)]
struct Applied {
    workload: String,
    record: Policy,
    kind: Kind,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(
        "does not fit: map {map} holds {fill} of its {capacity} entries (--max-rule-entries) and this policy needs {needed} more; \
         a change needs room for the old and the new entries at once (make before break), and replaced entries are freed {grace:?} after the swap"
    )]
    DoesNotFit {
        map: &'static str,
        fill: usize,
        capacity: usize,
        needed: usize,
        grace: Duration,
    },
    #[error(transparent)]
    Map(#[from] BpfError),
}

impl WriteError {
    pub fn is_map_full(&self) -> bool {
        match self {
            WriteError::DoesNotFit { .. } => true,
            WriteError::Map(e) => e.is_map_full(),
        }
    }
}

/// A workload whose policy could not be written, and what it runs with instead.
#[derive(Debug)]
pub struct ApplyError {
    pub workload: String,
    pub cgroup_id: u64,
    pub error: WriteError,
    pub fallback: Fallback,
}

#[derive(Debug, Default)]
pub struct ApplyReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    pub errors: Vec<ApplyError>,
    /// Cgroups that do not run their own desired policy, and what they run instead.
    pub fallbacks: BTreeMap<u64, Fallback>,
}

/// Sole writer of the maps.
pub struct Applier<M: PolicyMaps = PinnedMaps> {
    maps: M,
    applied: BTreeMap<u64, Applied>,
    sets: Sets,
    redirect_all: Arc<Rules>,
    /// Inbound (sk_lookup) state, in maps and an id space of its own; None where the maps have no
    /// inbound side (the in-memory maps of the unit tests).
    pub inbound: Option<super::inbound::InboundApplier>,
}

enum Change {
    None,
    Added,
    Updated,
}

impl<M: PolicyMaps> Applier<M> {
    /// Takes over whatever the maps already hold (a restart, even after kill -9): those records
    /// are the last good state and stay until a snapshot says otherwise. Entries no record refers
    /// to (a crash between writing entries and swapping the record) are retired.
    pub fn adopt(maps: M) -> Result<Self, BpfError> {
        let entries = maps.entries()?;
        let records = maps.policies()?;
        let mut a = Self {
            sets: Sets::new(maps.capacity(), GRACE),
            maps,
            applied: BTreeMap::new(),
            redirect_all: Rules::redirect_all(),
            inbound: None,
        };
        let now = Instant::now();
        for (id, e) in entries {
            a.sets.adopt_entries(id, e, now);
        }
        for (cgroup_id, record) in records {
            // A record whose entries are gone still names its id (nothing matches: it redirects
            // nothing but loopback rules); keep it as found until a snapshot replaces it. Its
            // base, if any, stays referenced as long as it does.
            a.sets.adopt_reference(record.policy_id);
            if record.base_id != NO_BASE {
                a.sets.adopt_reference(record.base_id);
            }
            a.applied.insert(
                cgroup_id,
                Applied {
                    workload: format!("(adopted cgroup {cgroup_id})"),
                    record,
                    kind: Kind::Adopted,
                },
            );
        }
        a.sets.fill.policies = a.applied.len();
        a.sets.start_ids_after_adopted();
        // Reserve the last-resort set now, while there is room; one reference is held forever.
        let all = a.redirect_all.clone();
        if let Ok(id) = a.sets.acquire(&mut a.maps, &all) {
            a.redirect_all = a.sets.rules(id).expect("acquired").clone();
        }
        Ok(a)
    }

    /// Adds the inbound applier (the agent's pinned maps have one).
    pub fn with_inbound(mut self, inbound: super::inbound::InboundApplier) -> Self {
        self.inbound = Some(inbound);
        self
    }

    /// Sets the grace period (tests use zero or a long one).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.sets.grace = grace;
        self
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    pub fn is_applied(&self, cgroup_id: u64) -> bool {
        self.applied.contains_key(&cgroup_id)
    }

    pub fn applied_count(&self) -> usize {
        self.applied.len()
    }

    /// Distinct entry sets in the tries (shared policies count once), including retired ones.
    pub fn policy_sets(&self) -> usize {
        self.sets.len()
    }

    /// Entries written per map (what the metrics report as fill levels).
    pub fn fill(&self) -> Fill {
        self.sets.fill
    }

    /// References held on a set (tests).
    #[cfg(test)]
    pub(super) fn refs(&self, id: u32) -> Option<usize> {
        self.sets.refs(id)
    }

    /// When the next retired entry set is due for deletion.
    pub fn next_collect(&self) -> Option<Instant> {
        let inbound = self.inbound.as_ref().and_then(|i| i.next_collect());
        self.sets.next_collect().into_iter().chain(inbound).min()
    }

    /// Deletes the entries of ids retired at least the grace period before `now`. Returns how
    /// many entry sets were freed.
    pub fn collect(&mut self, now: Instant) -> usize {
        if let Some(i) = self.inbound.as_mut() {
            i.collect(now);
        }
        self.sets.collect(&mut self.maps, now)
    }

    /// Applies a full desired state. Cgroups in `keep` are left exactly as they are (their new
    /// state is not known yet); every other applied cgroup missing from `desired` is removed.
    pub fn apply(&mut self, desired: &BTreeMap<u64, Desired>, keep: &BTreeSet<u64>) -> ApplyReport {
        let mut report = ApplyReport::default();
        self.collect(Instant::now());
        let mut full = Vec::new();
        for (&cgroup_id, want) in super::pending::disabled_first(desired) {
            let rejected = self.apply_one(cgroup_id, want, &mut report);
            if rejected {
                full.push(cgroup_id);
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
                self.release(&old.record);
                report.removed += 1;
            }
        }
        self.sets.fill.policies = self.applied.len();
        // Room may have appeared in this pass (a zero grace period, or sets retired earlier):
        // a rejected workload gets another try at once rather than at the next event.
        if !full.is_empty() && self.collect(Instant::now()) > 0 {
            let retry: BTreeSet<u64> = full.into_iter().collect();
            report.errors.retain(|e| !retry.contains(&e.cgroup_id));
            for cgroup_id in retry {
                report.fallbacks.remove(&cgroup_id);
                self.apply_one(cgroup_id, &desired[&cgroup_id], &mut report);
            }
            self.sets.fill.policies = self.applied.len();
        }
        report
    }

    /// One cgroup, by the rules: its own policy; else keep its own last good one; else the mesh
    /// default; else keep what it has; else redirect everything. True if a write was refused
    /// for lack of room.
    fn apply_one(&mut self, cgroup_id: u64, want: &Desired, report: &mut ApplyReport) -> bool {
        let kind = self.applied.get(&cgroup_id).map(|a| a.kind);
        let own_last_good = matches!(kind, Some(Kind::Own | Kind::Adopted));
        let mut error = None;
        let tally = |r: &mut ApplyReport, c: Change| match c {
            Change::None => r.unchanged += 1,
            Change::Added => r.added += 1,
            Change::Updated => r.updated += 1,
        };
        let fallback = 'decide: {
            if let Some(own) = &want.own {
                match self.install(cgroup_id, &want.workload, own, Kind::Own) {
                    Ok(c) => {
                        tally(report, c);
                        return false;
                    }
                    Err(e) => error = Some(e),
                }
            }
            if own_last_good {
                self.claim(cgroup_id, &want.workload);
                break 'decide Fallback::LastGood;
            }
            if let Some(md) = &want.mesh_default {
                match self.install(cgroup_id, &want.workload, md, Kind::MeshDefault) {
                    Ok(c) => {
                        tally(report, c);
                        break 'decide Fallback::MeshDefault;
                    }
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                }
            }
            if kind.is_some() {
                self.claim(cgroup_id, &want.workload);
                break 'decide Fallback::LastGood;
            }
            let all = Candidate {
                record: Policy {
                    flags: want.redirect_all.flags | flags::ENABLED,
                    ..want.redirect_all
                },
                rules: self.redirect_all.clone(),
                base: None,
            };
            match self.install(cgroup_id, &want.workload, &all, Kind::RedirectAll) {
                Ok(c) => {
                    tally(report, c);
                    Fallback::RedirectAll
                }
                Err(e) => {
                    error.get_or_insert(e);
                    Fallback::Nothing
                }
            }
        };
        if matches!(fallback, Fallback::LastGood) && error.is_none() {
            report.unchanged += 1;
        }
        report.fallbacks.insert(cgroup_id, fallback);
        let full = error.as_ref().is_some_and(WriteError::is_map_full);
        if let Some(error) = error {
            report.errors.push(ApplyError {
                workload: want.workload.clone(),
                cgroup_id,
                error,
                fallback,
            });
        }
        full
    }

    /// A kept record is now claimed by its workload (names adopted records in messages).
    fn claim(&mut self, cgroup_id: u64, workload: &str) {
        if let Some(a) = self.applied.get_mut(&cgroup_id)
            && a.workload != workload
        {
            a.workload = workload.to_string();
        }
    }

    fn install(
        &mut self,
        cgroup_id: u64,
        workload: &str,
        c: &Candidate,
        kind: Kind,
    ) -> Result<Change, WriteError> {
        if let Some(old) = self.applied.get(&cgroup_id) {
            let (id, base_id) = (old.record.policy_id, old.record.base_id);
            let same_record = Policy {
                policy_id: id,
                base_id,
                ..c.record
            } == old.record;
            if same_record
                && self.sets.holds(id, Some(&c.rules))
                && self.sets.holds(base_id, c.base.as_ref())
            {
                let old = self.applied.get_mut(&cgroup_id).expect("present");
                old.kind = kind;
                if old.workload != workload {
                    old.workload = workload.to_string();
                }
                return Ok(Change::None);
            }
        }
        // Make before break: the base first, then the overlay, then the record.
        let base_id = match &c.base {
            Some(b) => self.sets.acquire(&mut self.maps, b)?,
            None => NO_BASE,
        };
        let id = match self.sets.acquire(&mut self.maps, &c.rules) {
            Ok(id) => id,
            Err(e) => {
                self.sets.release(base_id);
                return Err(e);
            }
        };
        let record = Policy {
            policy_id: id,
            base_id,
            ..c.record
        };
        if let Err(e) = self.maps.set_policy(cgroup_id, &record) {
            self.release(&record);
            return Err(e.into());
        }
        let new = Applied {
            workload: workload.to_string(),
            record,
            kind,
        };
        Ok(match self.applied.insert(cgroup_id, new) {
            Some(old) => {
                self.release(&old.record);
                Change::Updated
            }
            None => Change::Added,
        })
    }

    /// The references a record holds: its own set and its base.
    fn release(&mut self, record: &Policy) {
        self.sets.release(record.policy_id);
        self.sets.release(record.base_id);
    }
}
