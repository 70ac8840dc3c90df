//! Typed access to the pinned maps. Opening from the pins (rather than from a loaded object) lets
//! `run`, `inspect` and `explain` share one code path, and works with no agent running.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray};
use redirect_common::{Decision, OrigDst, OrigEvent, OrigTupleKey, Policy, map_names};

use super::{BpfError, tries::RuleTries};

/// One policy's trie entries, keyed by (prefix bits after the policy id, address or port).
/// The value is a `redirect_common::action`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyEntries {
    pub v4: BTreeMap<(u32, [u8; 4]), u32>,
    pub v6: BTreeMap<(u32, [u8; 16]), u32>,
    pub ports: BTreeMap<(u32, u16), u32>,
}

impl PolicyEntries {
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len() + self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct PinnedMaps {
    dir: PathBuf,
    policy: HashMap<MapData, u64, Policy>,
    tries: RuleTries,
    counters: PerCpuArray<MapData, u64>,
    /// `POLICY_GEN`, bumped after every `POLICY` write (redirect-ebpf/src/resolve.rs). Optional
    /// so that `inspect` still reads a directory pinned by an agent that predates it.
    generation: Option<Array<MapData, u64>>,
    /// The original-destination maps. Optional so that `inspect` still reads a directory pinned
    /// by an agent that predates them.
    orig: Option<OrigMaps>,
    /// `POD_STATS` (per-workload decision counts): made and deleted with the records.
    pod_stats: Option<super::podstats::PodStats>,
}

struct OrigMaps {
    tuple: HashMap<MapData, OrigTupleKey, OrigDst>,
    stats: PerCpuArray<MapData, u64>,
}

/// How full a record map is (`inspect`, leak checks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: usize,
    pub max_entries: u32,
}

pub(crate) fn open<T: TryFrom<Map, Error = MapError>>(
    dir: &Path,
    name: &'static str,
) -> Result<T, BpfError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| BpfError::OpenPin {
        path: path.clone(),
        source: Box::new(source),
    })?;
    let map = Map::from_map_data(data).map_err(|source| BpfError::OpenPin {
        path: path.clone(),
        source: Box::new(source),
    })?;
    T::try_from(map).map_err(|source| BpfError::OpenPin {
        path,
        source: Box::new(source),
    })
}

/// Counters of a per-CPU array summed over CPUs, one per slot of `all` (a counter enum's
/// `ALL`, in slot order).
pub(crate) fn per_cpu_counters<T: Copy>(
    map: &PerCpuArray<MapData, u64>,
    name: &'static str,
    all: &[T],
) -> Result<Vec<(T, u64)>, BpfError> {
    all.iter()
        .enumerate()
        .map(|(i, &what)| {
            let per_cpu = map
                .get(&(i as u32), 0)
                .map_err(|e| BpfError::map(name, e))?;
            Ok((what, per_cpu.iter().sum()))
        })
        .collect()
}

impl PinnedMaps {
    /// Opens every map pinned under `dir`; fails with a message naming the directory when
    /// nothing (or only part of the set) is pinned there.
    pub fn open(dir: &Path) -> Result<Self, BpfError> {
        if !dir.join(map_names::POLICY).exists() {
            return Err(BpfError::NotPinned(dir.to_path_buf()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            policy: open(dir, map_names::POLICY)?,
            tries: RuleTries::open(
                dir,
                [map_names::CIDR_V4, map_names::CIDR_V6, map_names::PORTS],
            )?,
            counters: open(dir, map_names::COUNTERS)?,
            generation: if dir.join(map_names::POLICY_GEN).exists() {
                Some(open(dir, map_names::POLICY_GEN)?)
            } else {
                None
            },
            orig: if dir.join(map_names::ORIG_TUPLE).exists() {
                Some(OrigMaps {
                    tuple: open(dir, map_names::ORIG_TUPLE)?,
                    stats: open(dir, map_names::ORIG_STATS)?,
                })
            } else {
                None
            },
            pod_stats: super::podstats::PodStats::open(dir)?,
        })
    }

    /// Per-workload decision counts by registered cgroup id (empty if not pinned).
    pub fn pod_decisions(&self) -> Result<BTreeMap<u64, super::podstats::Counts>, BpfError> {
        self.pod_stats
            .as_ref()
            .map_or(Ok(BTreeMap::new()), |s| s.read())
    }

    /// When the next removed workload's counts are due for deletion.
    pub fn pod_stats_due(&self) -> Option<std::time::Instant> {
        self.pod_stats.as_ref().and_then(|s| s.next_due())
    }

    /// Deletes the counts of workloads removed at least the grace period ago.
    pub fn collect_pod_stats(&mut self, now: std::time::Instant) {
        if let Some(s) = &mut self.pod_stats {
            s.collect(now);
        }
    }

    /// Entries and capacity of ORIG_TUPLE (hand-offs not yet taken by a proxy socket); empty if
    /// it is not pinned. Counting walks the keys, which is fine for `inspect` (at most a few
    /// hundred thousand syscalls). The per-socket records in SOCK_STATE are not listed: socket
    /// storage cannot be walked by key, and the kernel frees each with its socket.
    pub fn orig_fill(&self) -> Result<Vec<MapFill>, BpfError> {
        let Some(o) = &self.orig else {
            return Ok(Vec::new());
        };
        let max = |name: &'static str| {
            MapInfo::from_pin(self.dir.join(name))
                .map(|i| i.max_entries())
                .map_err(|e| BpfError::map(name, e))
        };
        // A key that disappears during the walk (a connection closing) ends in an error for
        // that step only; it is simply not counted.
        Ok(vec![MapFill {
            name: map_names::ORIG_TUPLE,
            entries: o.tuple.keys().filter(Result::is_ok).count(),
            max_entries: max(map_names::ORIG_TUPLE)?,
        }])
    }

    /// Original-destination event counters summed over CPUs, in `OrigEvent::ALL` order; empty if
    /// the map is not pinned.
    pub fn orig_stats(&self) -> Result<Vec<(OrigEvent, u64)>, BpfError> {
        let Some(o) = &self.orig else {
            return Ok(Vec::new());
        };
        per_cpu_counters(&o.stats, map_names::ORIG_STATS, &OrigEvent::ALL)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `max_entries` of each rule trie (what `--max-rule-entries` set when they were created);
    /// a trie whose size cannot be read counts as unbounded (the kernel still refuses past it).
    pub fn rule_capacity(&self) -> crate::reconcile::Capacity {
        let max = |name: &'static str| {
            MapInfo::from_pin(self.dir.join(name))
                .map(|i| i.max_entries() as usize)
                .unwrap_or(usize::MAX / 2)
        };
        crate::reconcile::Capacity {
            v4: max(map_names::CIDR_V4),
            v6: max(map_names::CIDR_V6),
            ports: max(map_names::PORTS),
        }
    }

    pub fn policies(&self) -> Result<BTreeMap<u64, Policy>, BpfError> {
        self.policy
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| BpfError::map(map_names::POLICY, e))
    }

    pub fn policy(&self, cgroup_id: u64) -> Option<Policy> {
        self.policy.get(&cgroup_id, 0).ok()
    }

    /// One map update: the kernel swaps the record atomically, so a connect sees the old policy
    /// or the new one.
    pub fn set_policy(&mut self, cgroup_id: u64, policy: &Policy) -> Result<(), BpfError> {
        let r = self
            .policy
            .insert(cgroup_id, policy, 0)
            .map_err(|e| BpfError::map(map_names::POLICY, e));
        self.bump_generation();
        if r.is_ok()
            && let Some(s) = &mut self.pod_stats
            && let Err(e) = s.register(cgroup_id)
        {
            // Observability only: the record is in, the workload is intercepted.
            tracing::warn!(cgroup_id, error = %e, "no per-pod counters for this workload");
        }
        r
    }

    pub fn remove_policy(&mut self, cgroup_id: u64) {
        let _ = self.policy.remove(&cgroup_id);
        self.bump_generation();
        if let Some(s) = &mut self.pod_stats {
            s.retire(cgroup_id, std::time::Instant::now());
        }
    }

    /// After a `POLICY` write (never before it: redirect-ebpf/src/resolve.rs), so that no
    /// per-cgroup answer resolved before the write is used again. The new value is above the old
    /// one and above the clock, so that two writers (an upgrade's old and new agent) never both
    /// land on a value some cache entry was resolved under. A failure here leaves cached answers
    /// in place: it is logged, and the next write bumps again.
    fn bump_generation(&mut self) {
        let Some(g) = &mut self.generation else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let next = g.get(&0, 0).unwrap_or(0).wrapping_add(1).max(now);
        if let Err(e) = g.set(0, next, 0) {
            tracing::warn!(error = %e, "could not bump POLICY_GEN; cached cgroup answers may be stale until the next write");
        }
    }

    /// The reconciler's map-writer trait names these by path (`PinnedMaps::entries`), so they
    /// are spelled out here; the rest of `RuleTries` comes through `Deref`.
    pub fn entries(&self) -> Result<BTreeMap<u32, PolicyEntries>, BpfError> {
        self.tries.entries()
    }

    pub fn insert_entries(&mut self, id: u32, e: &PolicyEntries) -> Result<(), BpfError> {
        self.tries.insert_entries(id, e)
    }

    pub fn remove_entries(&mut self, id: u32, e: &PolicyEntries) {
        self.tries.remove_entries(id, e)
    }

    /// The node's decision totals, in `Decision::ALL` order: `COUNTERS` (connects of workloads
    /// without a per-pod entry, and of cgroups not in the mesh) plus every `POD_STATS` entry,
    /// since a connect is counted in one of them only.
    pub fn counters(&self) -> Result<Vec<(Decision, u64)>, BpfError> {
        let mut node = per_cpu_counters(&self.counters, map_names::COUNTERS, &Decision::ALL)?;
        if let Some(s) = &self.pod_stats {
            for ((_, n), p) in node.iter_mut().zip(s.node_share()) {
                *n += p;
            }
        }
        Ok(node)
    }
}

super::tries::deref_to_tries!(PinnedMaps);
