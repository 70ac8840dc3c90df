//! The map-apply loop: desired per-cgroup policies → the maps, by diff (docs/architecture.md,
//! "The reconcile rules").
//!
//! Policies are content-addressed: identical compiled entry sets share one policy id and one
//! copy of the trie entries, with a reference count per id. A change acquires the new id first
//! (writing its entries if nobody has them yet), then swaps the cgroup's record in one map update,
//! then releases the old id. A connect therefore sees the old policy or the new one, whole. An id
//! whose last reference is released is *retired*: its entries stay for [`GRACE`], because a connect
//! in flight may have read the old record just before the swap, and are deleted after it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
    time::{Duration, Instant},
};

use redirect_common::{Policy, action, flags, map_names};

use super::{
    Fallback,
    maps::{Capacity, PolicyMaps},
};
use crate::bpf::{BpfError, PinnedMaps, PolicyEntries};

/// How long a replaced entry set stays in the tries after the last record stopped naming it.
pub const GRACE: Duration = Duration::from_secs(2);

/// A compiled entry set with its content digest, computed once. Shared between workloads.
#[derive(Debug)]
pub struct Rules {
    entries: PolicyEntries,
    digest: u64,
}

impl Rules {
    pub fn new(entries: PolicyEntries) -> Arc<Self> {
        let mut h = DefaultHasher::new();
        entries.hash(&mut h);
        Arc::new(Self {
            entries,
            digest: h.finish(),
        })
    }

    pub fn entries(&self) -> &PolicyEntries {
        &self.entries
    }

    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// 0.0.0.0/0 and ::/0 included: the set of the "redirect everything" fallback.
    pub fn redirect_all() -> Arc<Self> {
        let mut e = PolicyEntries::default();
        e.v4.insert((0, [0; 4]), action::INCLUDE);
        e.v6.insert((0, [0; 16]), action::INCLUDE);
        Self::new(e)
    }

    fn same(a: &Arc<Self>, b: &Arc<Self>) -> bool {
        Arc::ptr_eq(a, b) || (a.digest == b.digest && a.entries == b.entries)
    }
}

/// One way to run a workload: its record (the `policy_id` is assigned here) and entries.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub record: Policy,
    pub rules: Arc<Rules>,
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

#[derive(Debug)]
struct Shared {
    rules: Arc<Rules>,
    refs: usize,
    /// When the last reference went away (None while referenced or reserved).
    retired: Option<Instant>,
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

/// Entry counts per map (records; trie entries including retired ones still in grace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    pub policies: usize,
    pub v4: usize,
    pub v6: usize,
    pub ports: usize,
}

/// Sole writer of the maps.
pub struct Applier<M: PolicyMaps = PinnedMaps> {
    maps: M,
    capacity: Capacity,
    grace: Duration,
    applied: BTreeMap<u64, Applied>,
    shared: HashMap<u32, Shared>,
    by_digest: HashMap<u64, u32>,
    fill: Fill,
    redirect_all: Arc<Rules>,
    /// Above every id in use until it wraps; in-use ids are skipped.
    next_id: u32,
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
            capacity: maps.capacity(),
            maps,
            grace: GRACE,
            applied: BTreeMap::new(),
            shared: HashMap::new(),
            by_digest: HashMap::new(),
            fill: Fill::default(),
            redirect_all: Rules::redirect_all(),
            next_id: 1,
            inbound: None,
        };
        let now = Instant::now();
        for (id, e) in entries {
            a.count(&e, true);
            let rules = Rules::new(e);
            a.by_digest.entry(rules.digest).or_insert(id);
            a.shared.insert(
                id,
                Shared {
                    rules,
                    refs: 0,
                    retired: Some(now),
                },
            );
        }
        for (cgroup_id, record) in records {
            let id = record.policy_id;
            // A record whose entries are gone still names its id (nothing matches: it redirects
            // nothing but loopback rules); keep it as found until a snapshot replaces it.
            let s = a.shared.entry(id).or_insert_with(|| Shared {
                rules: Arc::new(Rules {
                    entries: PolicyEntries::default(),
                    digest: 0,
                }),
                refs: 0,
                retired: None,
            });
            s.refs += 1;
            s.retired = None;
            a.applied.insert(
                cgroup_id,
                Applied {
                    workload: format!("(adopted cgroup {cgroup_id})"),
                    record,
                    kind: Kind::Adopted,
                },
            );
        }
        a.fill.policies = a.applied.len();
        a.next_id = a.shared.keys().max().map_or(1, |m| m.wrapping_add(1));
        // Reserve the last-resort set now, while there is room; one reference is held forever.
        let all = a.redirect_all.clone();
        if let Ok(id) = a.acquire(&all) {
            a.redirect_all = a.shared[&id].rules.clone();
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
        self.grace = grace;
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
        self.shared.len()
    }

    /// Entries written per map (what the metrics report as fill levels).
    pub fn fill(&self) -> Fill {
        self.fill
    }

    /// When the next retired entry set is due for deletion.
    pub fn next_collect(&self) -> Option<Instant> {
        let inbound = self.inbound.as_ref().and_then(|i| i.next_collect());
        self.shared
            .values()
            .filter_map(|s| s.retired)
            .min()
            .map(|t| t + self.grace)
            .into_iter()
            .chain(inbound)
            .min()
    }

    /// Deletes the entries of ids retired at least the grace period before `now`. Returns how
    /// many entry sets were freed.
    pub fn collect(&mut self, now: Instant) -> usize {
        if let Some(i) = self.inbound.as_mut() {
            i.collect(now);
        }
        let due: Vec<u32> = self
            .shared
            .iter()
            .filter(|(_, s)| s.retired.is_some_and(|t| t + self.grace <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            let s = self.shared.remove(id).expect("listed");
            self.maps.remove_entries(*id, &s.rules.entries);
            self.count(&s.rules.entries, false);
            if self.by_digest.get(&s.rules.digest) == Some(id) {
                self.by_digest.remove(&s.rules.digest);
            }
        }
        due.len()
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
                self.release(old.record.policy_id);
                report.removed += 1;
            }
        }
        self.fill.policies = self.applied.len();
        // Room may have appeared in this pass (a zero grace period, or sets retired earlier):
        // a rejected workload gets another try at once rather than at the next event.
        if !full.is_empty() && self.collect(Instant::now()) > 0 {
            let retry: BTreeSet<u64> = full.into_iter().collect();
            report.errors.retain(|e| !retry.contains(&e.cgroup_id));
            for cgroup_id in retry {
                report.fallbacks.remove(&cgroup_id);
                self.apply_one(cgroup_id, &desired[&cgroup_id], &mut report);
            }
            self.fill.policies = self.applied.len();
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
            let id = old.record.policy_id;
            let same_record = Policy {
                policy_id: id,
                ..c.record
            } == old.record;
            if same_record
                && self
                    .shared
                    .get(&id)
                    .is_some_and(|s| Rules::same(&s.rules, &c.rules))
            {
                let old = self.applied.get_mut(&cgroup_id).expect("present");
                old.kind = kind;
                if old.workload != workload {
                    old.workload = workload.to_string();
                }
                return Ok(Change::None);
            }
        }
        let id = self.acquire(&c.rules)?;
        let record = Policy {
            policy_id: id,
            ..c.record
        };
        if let Err(e) = self.maps.set_policy(cgroup_id, &record) {
            self.release(id);
            return Err(e.into());
        }
        let new = Applied {
            workload: workload.to_string(),
            record,
            kind,
        };
        Ok(match self.applied.insert(cgroup_id, new) {
            Some(old) => {
                self.release(old.record.policy_id);
                Change::Updated
            }
            None => Change::Added,
        })
    }

    /// One more reference to the id holding `rules`, writing them under a fresh id if no id
    /// holds them (a retired one is revived).
    fn acquire(&mut self, rules: &Arc<Rules>) -> Result<u32, WriteError> {
        if let Some(&id) = self.by_digest.get(&rules.digest)
            && let Some(s) = self.shared.get_mut(&id)
            && Rules::same(&s.rules, rules)
        {
            s.refs += 1;
            s.retired = None;
            return Ok(id);
        }
        self.fits(&rules.entries)?;
        let id = self.allocate_id();
        self.maps.insert_entries(id, &rules.entries)?;
        self.count(&rules.entries, true);
        self.by_digest.entry(rules.digest).or_insert(id);
        self.shared.insert(
            id,
            Shared {
                rules: rules.clone(),
                refs: 1,
                retired: None,
            },
        );
        Ok(id)
    }

    fn release(&mut self, id: u32) {
        if let Some(s) = self.shared.get_mut(&id) {
            s.refs = s.refs.saturating_sub(1);
            if s.refs == 0 {
                s.retired = Some(Instant::now());
            }
        }
    }

    fn fits(&self, e: &PolicyEntries) -> Result<(), WriteError> {
        for (map, fill, capacity, needed) in [
            (
                map_names::CIDR_V4,
                self.fill.v4,
                self.capacity.v4,
                e.v4.len(),
            ),
            (
                map_names::CIDR_V6,
                self.fill.v6,
                self.capacity.v6,
                e.v6.len(),
            ),
            (
                map_names::PORTS,
                self.fill.ports,
                self.capacity.ports,
                e.ports.len(),
            ),
        ] {
            if fill + needed > capacity {
                return Err(WriteError::DoesNotFit {
                    map,
                    fill,
                    capacity,
                    needed,
                    grace: self.grace,
                });
            }
        }
        Ok(())
    }

    fn count(&mut self, e: &PolicyEntries, add: bool) {
        let f = &mut self.fill;
        if add {
            f.v4 += e.v4.len();
            f.v6 += e.v6.len();
            f.ports += e.ports.len();
        } else {
            f.v4 = f.v4.saturating_sub(e.v4.len());
            f.v6 = f.v6.saturating_sub(e.v6.len());
            f.ports = f.ports.saturating_sub(e.ports.len());
        }
    }

    /// Ids are never 0 and never one in use (or retired), so the old and new entries of an
    /// update cannot collide.
    fn allocate_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if id != 0 && !self.shared.contains_key(&id) {
                return id;
            }
        }
    }
}
