//! The shared entry sets: content-addressed, reference-counted policy ids and their trie
//! entries (docs/architecture.md, "Shared policies"). A set is referenced by every record that
//! names it, as its own `policy_id` or as its `base_id` (an overlay's base), so a base is not
//! freed while any overlay over it is applied. A set whose last reference goes is *retired*: its
//! entries stay for the grace period, because a connect in flight may have read the old record
//! just before the swap, and are deleted after it.
use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
    time::{Duration, Instant},
};

use redirect_common::{action, decide::NO_BASE, map_names};

use super::{
    WriteError,
    maps::{Capacity, PolicyMaps},
};
use crate::bpf::PolicyEntries;

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

    /// The set of a record found at start whose entries are gone.
    pub(super) fn missing() -> Arc<Self> {
        Arc::new(Self {
            entries: PolicyEntries::default(),
            digest: 0,
        })
    }

    pub(super) fn same(a: &Arc<Self>, b: &Arc<Self>) -> bool {
        Arc::ptr_eq(a, b) || (a.digest == b.digest && a.entries == b.entries)
    }
}

#[derive(Debug)]
struct Shared {
    rules: Arc<Rules>,
    refs: usize,
    /// When the last reference went away (None while referenced or reserved).
    retired: Option<Instant>,
}

/// Entry counts per map (records; trie entries including retired ones still in grace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    pub policies: usize,
    pub v4: usize,
    pub v6: usize,
    pub ports: usize,
}

/// The sets in the tries, by id.
#[derive(Debug)]
pub(super) struct Sets {
    shared: HashMap<u32, Shared>,
    by_digest: HashMap<u64, u32>,
    pub fill: Fill,
    pub capacity: Capacity,
    pub grace: Duration,
    /// Above every id in use until it wraps; in-use ids are skipped.
    next_id: u32,
}

impl Sets {
    pub fn new(capacity: Capacity, grace: Duration) -> Self {
        Self {
            shared: HashMap::new(),
            by_digest: HashMap::new(),
            fill: Fill::default(),
            capacity,
            grace,
            next_id: 1,
        }
    }

    pub fn len(&self) -> usize {
        self.shared.len()
    }

    pub fn rules(&self, id: u32) -> Option<&Arc<Rules>> {
        self.shared.get(&id).map(|s| &s.rules)
    }

    /// Whether `id` holds `rules` (`None`: whether `id` is "no base").
    pub fn holds(&self, id: u32, rules: Option<&Arc<Rules>>) -> bool {
        match rules {
            None => id == NO_BASE,
            Some(r) => self.rules(id).is_some_and(|s| Rules::same(s, r)),
        }
    }

    /// Entries found in the maps at start, referenced by nothing yet (retired now).
    pub fn adopt_entries(&mut self, id: u32, e: PolicyEntries, now: Instant) {
        self.count(&e, true);
        let rules = Rules::new(e);
        self.by_digest.entry(rules.digest).or_insert(id);
        self.shared.insert(
            id,
            Shared {
                rules,
                refs: 0,
                retired: Some(now),
            },
        );
    }

    /// A reference found at start (a pinned record naming `id`).
    pub fn adopt_reference(&mut self, id: u32) {
        let s = self.shared.entry(id).or_insert_with(|| Shared {
            rules: Rules::missing(),
            refs: 0,
            retired: None,
        });
        s.refs += 1;
        s.retired = None;
    }

    pub fn start_ids_after_adopted(&mut self) {
        self.next_id = self.shared.keys().max().map_or(1, |m| m.wrapping_add(1));
    }

    /// When the next retired set is due for deletion.
    pub fn next_collect(&self) -> Option<Instant> {
        self.shared
            .values()
            .filter_map(|s| s.retired)
            .min()
            .map(|t| t + self.grace)
    }

    /// Deletes the entries of sets retired at least the grace period before `now`. Returns how
    /// many were freed.
    pub fn collect(&mut self, maps: &mut impl PolicyMaps, now: Instant) -> usize {
        let due: Vec<u32> = self
            .shared
            .iter()
            .filter(|(_, s)| s.retired.is_some_and(|t| t + self.grace <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            let s = self.shared.remove(id).expect("listed");
            maps.remove_entries(*id, &s.rules.entries);
            self.count(&s.rules.entries, false);
            if self.by_digest.get(&s.rules.digest) == Some(id) {
                self.by_digest.remove(&s.rules.digest);
            }
        }
        due.len()
    }

    /// One more reference to the id holding `rules`, writing them under a fresh id if no id
    /// holds them (a retired one is revived).
    pub fn acquire(
        &mut self,
        maps: &mut impl PolicyMaps,
        rules: &Arc<Rules>,
    ) -> Result<u32, WriteError> {
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
        maps.insert_entries(id, &rules.entries)?;
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

    /// One reference fewer (`NO_BASE` and unknown ids are no-ops).
    pub fn release(&mut self, id: u32) {
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

    /// Ids are never 0 (`NO_BASE`) and never one in use (or retired), so the old and new
    /// entries of an update cannot collide.
    fn allocate_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if id != NO_BASE && !self.shared.contains_key(&id) {
                return id;
            }
        }
    }

    /// References held on `id` (tests).
    #[cfg(test)]
    pub fn refs(&self, id: u32) -> Option<usize> {
        self.shared.get(&id).map(|s| s.refs)
    }
}
