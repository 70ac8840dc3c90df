//! `POD_STATS`: per-workload decision counts (docs/kubernetes.md, "Per-pod counters"). The
//! connect programs only add to an existing entry; the agent makes the entry when it writes a
//! workload's first record and deletes it [`GRACE`] after the record is removed, so the last
//! connects in flight are still counted and a scrape in between still sees the final counts.
//!
//! A connect counts once: in its workload's entry, or (no entry) in the node's `COUNTERS`. The
//! node totals are therefore `COUNTERS` plus every entry here; a deleted entry's counts are first
//! folded into the [`RETIRED`] entry, which only the agent writes, so totals never go back.
use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuHashMap, PerCpuValues};
use redirect_common::{DECISION_COUNT, Decision, PodDecisions, map_names};

use super::{BpfError, maps::open};

/// How long a removed workload's counts stay (the reconcile's grace period for entry sets).
pub const GRACE: Duration = crate::reconcile::GRACE;

/// The entry that keeps removed workloads' counts (no cgroup has id 0, so no connect writes it).
pub const RETIRED: u64 = 0;

/// Counts of one workload, summed over CPUs, in `Decision::ALL` order.
pub type Counts = [u64; DECISION_COUNT as usize];

pub struct PodStats {
    map: PerCpuHashMap<MapData, u64, PodDecisions>,
    /// Removed workloads and when their record went.
    retired: BTreeMap<u64, Instant>,
}

impl PodStats {
    /// None if the directory was pinned by an agent without per-pod counters.
    pub fn open(dir: &Path) -> Result<Option<Self>, BpfError> {
        if !dir.join(map_names::POD_STATS).exists() {
            return Ok(None);
        }
        Ok(Some(Self {
            map: open(dir, map_names::POD_STATS)?,
            retired: BTreeMap::new(),
        }))
    }

    /// A workload's record was written: it gets zeroed counts unless it has some already (an
    /// update, a restart, or a quick return within the grace period).
    pub fn register(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        self.retired.remove(&cgroup_id);
        if self.map.get(&cgroup_id, 0).is_ok() {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus().map_err(|(path, e)| BpfError::io("reading", path, e))?;
        let zero = PerCpuValues::try_from(vec![PodDecisions::default(); cpus])
            .map_err(|e| BpfError::io("per-CPU values for map", map_names::POD_STATS, e))?;
        // BPF_NOEXIST: never reset counts that appeared meanwhile.
        match self.map.insert(cgroup_id, zero, 1) {
            Ok(()) => Ok(()),
            Err(_) if self.map.get(&cgroup_id, 0).is_ok() => Ok(()),
            Err(e) => Err(BpfError::map(map_names::POD_STATS, e)),
        }
    }

    /// A workload's record was removed: its counts go after the grace period.
    pub fn retire(&mut self, cgroup_id: u64, now: Instant) {
        self.retired.entry(cgroup_id).or_insert(now);
    }

    /// Deletes the counts of workloads retired at least [`GRACE`] before `now`.
    pub fn collect(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .retired
            .iter()
            .filter(|(_, t)| **t + GRACE <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.retired.remove(&id);
            if let Err(e) = self.fold(id) {
                // Kept, and tried again on the next pass: deleting it would lose its counts.
                tracing::warn!(cgroup_id = id, error = %e, "keeping a removed workload's counters");
                self.retired.insert(id, now);
                continue;
            }
            let _ = self.map.remove(&id);
        }
    }

    /// Adds a removed workload's counts into [`RETIRED`], CPU by CPU. Its record is gone since
    /// the grace period, so no connect adds to it any more.
    fn fold(&mut self, id: u64) -> Result<(), BpfError> {
        let Ok(gone) = self.map.get(&id, 0) else {
            return Ok(());
        };
        let mut sum: Vec<PodDecisions> = match self.map.get(&RETIRED, 0) {
            Ok(v) => v.iter().copied().collect(),
            Err(_) => vec![PodDecisions::default(); gone.len()],
        };
        for (s, g) in sum.iter_mut().zip(gone.iter()) {
            for (a, b) in s.counts.iter_mut().zip(g.counts) {
                *a += b;
            }
        }
        let values = PerCpuValues::try_from(sum)
            .map_err(|e| BpfError::io("per-CPU values for map", map_names::POD_STATS, e))?;
        self.map
            .insert(RETIRED, values, 0)
            .map_err(|e| BpfError::map(map_names::POD_STATS, e))
    }

    /// When the next retired entry is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.retired.values().min().map(|t| *t + GRACE)
    }

    /// Every workload's counts, summed over CPUs.
    pub fn read(&self) -> Result<BTreeMap<u64, Counts>, BpfError> {
        read(&self.map)
    }

    /// What this map adds to the node totals: every entry, [`RETIRED`] included.
    pub fn node_share(&self) -> Counts {
        let mut sum = [0u64; DECISION_COUNT as usize];
        for c in read_all(&self.map).values() {
            for (s, n) in sum.iter_mut().zip(c) {
                *s += n;
            }
        }
        sum
    }
}

/// Every workload's entry of a pinned `POD_STATS`, summed over CPUs (also for `inspect` and
/// `/metrics`, which only read); [`RETIRED`] is not a workload and is left out.
pub fn read(
    map: &PerCpuHashMap<MapData, u64, PodDecisions>,
) -> Result<BTreeMap<u64, Counts>, BpfError> {
    let mut out = read_all(map);
    out.remove(&RETIRED);
    Ok(out)
}

fn read_all(map: &PerCpuHashMap<MapData, u64, PodDecisions>) -> BTreeMap<u64, Counts> {
    let mut out = BTreeMap::new();
    for item in map.iter() {
        // An entry deleted during the walk ends that step only.
        let Ok((id, per_cpu)) = item else { continue };
        let mut sum = [0u64; DECISION_COUNT as usize];
        for v in per_cpu.iter() {
            for (s, n) in sum.iter_mut().zip(v.counts) {
                *s += n;
            }
        }
        out.insert(id, sum);
    }
    out
}

/// Reads the pinned `POD_STATS` under `dir`; empty if it is not pinned.
pub fn read_pinned(dir: &Path) -> Result<BTreeMap<u64, Counts>, BpfError> {
    match PodStats::open(dir)? {
        Some(s) => s.read(),
        None => Ok(BTreeMap::new()),
    }
}

/// `(decision, count)` pairs of one workload's counts.
pub fn by_decision(c: &Counts) -> impl Iterator<Item = (Decision, u64)> + '_ {
    Decision::ALL.iter().copied().zip(c.iter().copied())
}
