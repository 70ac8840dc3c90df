//! Typed access to the pinned maps. Opening from the pins (rather than from a loaded object) lets
//! `run`, `inspect` and `explain` share one code path, and works with no agent running.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::maps::{
    HashMap, LpmTrie, Map, MapData, MapError, MapInfo, PerCpuArray, lpm_trie::Key as LpmKey,
};
use redirect_common::{
    CidrV4Key, CidrV6Key, DECISION_COUNT, Decision, ORIG_EVENT_COUNT, OrigDst, OrigEvent,
    OrigTupleKey, POLICY_ID_BITS, Policy, PortKey, Rule, map_names,
};

use super::BpfError;

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
    cidr_v4: LpmTrie<MapData, CidrV4Key, Rule>,
    cidr_v6: LpmTrie<MapData, CidrV6Key, Rule>,
    ports: LpmTrie<MapData, PortKey, Rule>,
    counters: PerCpuArray<MapData, u64>,
    /// The original-destination maps. Optional so that `inspect` still reads a directory pinned
    /// by an agent that predates them.
    orig: Option<OrigMaps>,
}

struct OrigMaps {
    cookie: HashMap<MapData, u64, OrigDst>,
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

fn v4_key(id: u32, bits: u32, addr: [u8; 4]) -> LpmKey<CidrV4Key> {
    let policy_id = id.to_be_bytes();
    LpmKey::new(POLICY_ID_BITS + bits, CidrV4Key { policy_id, addr })
}

fn v6_key(id: u32, bits: u32, addr: [u8; 16]) -> LpmKey<CidrV6Key> {
    let policy_id = id.to_be_bytes();
    LpmKey::new(POLICY_ID_BITS + bits, CidrV6Key { policy_id, addr })
}

fn port_key(id: u32, bits: u32, port: u16) -> LpmKey<PortKey> {
    let key = PortKey {
        policy_id: id.to_be_bytes(),
        port: port.to_be_bytes(),
        _pad: [0; 2],
    };
    LpmKey::new(POLICY_ID_BITS + bits, key)
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
            cidr_v4: open(dir, map_names::CIDR_V4)?,
            cidr_v6: open(dir, map_names::CIDR_V6)?,
            ports: open(dir, map_names::PORTS)?,
            counters: open(dir, map_names::COUNTERS)?,
            orig: if dir.join(map_names::ORIG_TUPLE).exists() {
                Some(OrigMaps {
                    cookie: open(dir, map_names::ORIG_COOKIE)?,
                    tuple: open(dir, map_names::ORIG_TUPLE)?,
                    stats: open(dir, map_names::ORIG_STATS)?,
                })
            } else {
                None
            },
        })
    }

    /// Entries and capacity of ORIG_COOKIE and ORIG_TUPLE; empty if they are not pinned. Counting
    /// walks the keys, which is fine for `inspect` (at most a few hundred thousand syscalls).
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
        Ok(vec![
            MapFill {
                name: map_names::ORIG_COOKIE,
                entries: o.cookie.keys().filter(Result::is_ok).count(),
                max_entries: max(map_names::ORIG_COOKIE)?,
            },
            MapFill {
                name: map_names::ORIG_TUPLE,
                entries: o.tuple.keys().filter(Result::is_ok).count(),
                max_entries: max(map_names::ORIG_TUPLE)?,
            },
        ])
    }

    /// Original-destination event counters summed over CPUs, in `OrigEvent::ALL` order; empty if
    /// the map is not pinned.
    pub fn orig_stats(&self) -> Result<Vec<(OrigEvent, u64)>, BpfError> {
        let Some(o) = &self.orig else {
            return Ok(Vec::new());
        };
        (0..ORIG_EVENT_COUNT)
            .map(|i| {
                let per_cpu = o
                    .stats
                    .get(&i, 0)
                    .map_err(|e| BpfError::map(map_names::ORIG_STATS, e))?;
                Ok((OrigEvent::ALL[i as usize], per_cpu.iter().sum()))
            })
            .collect()
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

    /// Every trie entry, grouped by policy id.
    pub fn entries(&self) -> Result<BTreeMap<u32, PolicyEntries>, BpfError> {
        let mut out: BTreeMap<u32, PolicyEntries> = BTreeMap::new();
        for item in self.cidr_v4.iter() {
            let (k, v) = item.map_err(|e| BpfError::map(map_names::CIDR_V4, e))?;
            let d = k.data();
            let id = u32::from_be_bytes(d.policy_id);
            let bits = k.prefix_len() - POLICY_ID_BITS;
            out.entry(id)
                .or_default()
                .v4
                .insert((bits, d.addr), v.action);
        }
        for item in self.cidr_v6.iter() {
            let (k, v) = item.map_err(|e| BpfError::map(map_names::CIDR_V6, e))?;
            let d = k.data();
            let id = u32::from_be_bytes(d.policy_id);
            let bits = k.prefix_len() - POLICY_ID_BITS;
            out.entry(id)
                .or_default()
                .v6
                .insert((bits, d.addr), v.action);
        }
        for item in self.ports.iter() {
            let (k, v) = item.map_err(|e| BpfError::map(map_names::PORTS, e))?;
            let d = k.data();
            let id = u32::from_be_bytes(d.policy_id);
            let bits = k.prefix_len() - POLICY_ID_BITS;
            let port = u16::from_be_bytes(d.port);
            out.entry(id)
                .or_default()
                .ports
                .insert((bits, port), v.action);
        }
        Ok(out)
    }

    /// Writes all of a policy's entries. On failure (a full map, typically) the entries written
    /// so far are removed again, so a policy lands whole or not at all.
    pub fn insert_entries(&mut self, id: u32, e: &PolicyEntries) -> Result<(), BpfError> {
        let mut done = PolicyEntries::default();
        let result = self.insert_tracked(id, e, &mut done);
        if result.is_err() {
            self.remove_entries(id, &done);
        }
        result
    }

    fn insert_tracked(
        &mut self,
        id: u32,
        e: &PolicyEntries,
        done: &mut PolicyEntries,
    ) -> Result<(), BpfError> {
        for (&(bits, addr), &action) in &e.v4 {
            self.cidr_v4
                .insert(&v4_key(id, bits, addr), Rule { action }, 0)
                .map_err(|e| BpfError::map(map_names::CIDR_V4, e))?;
            done.v4.insert((bits, addr), action);
        }
        for (&(bits, addr), &action) in &e.v6 {
            self.cidr_v6
                .insert(&v6_key(id, bits, addr), Rule { action }, 0)
                .map_err(|e| BpfError::map(map_names::CIDR_V6, e))?;
            done.v6.insert((bits, addr), action);
        }
        for (&(bits, port), &action) in &e.ports {
            self.ports
                .insert(&port_key(id, bits, port), Rule { action }, 0)
                .map_err(|e| BpfError::map(map_names::PORTS, e))?;
            done.ports.insert((bits, port), action);
        }
        Ok(())
    }

    /// Best effort: an entry that is already gone is not an error.
    pub fn remove_entries(&mut self, id: u32, e: &PolicyEntries) {
        for &(bits, addr) in e.v4.keys() {
            let _ = self.cidr_v4.remove(&v4_key(id, bits, addr));
        }
        for &(bits, addr) in e.v6.keys() {
            let _ = self.cidr_v6.remove(&v6_key(id, bits, addr));
        }
        for &(bits, port) in e.ports.keys() {
            let _ = self.ports.remove(&port_key(id, bits, port));
        }
    }

    /// One map update: the kernel swaps the record atomically, so a connect sees the old policy
    /// or the new one.
    pub fn set_policy(&mut self, cgroup_id: u64, policy: &Policy) -> Result<(), BpfError> {
        self.policy
            .insert(cgroup_id, policy, 0)
            .map_err(|e| BpfError::map(map_names::POLICY, e))
    }

    pub fn remove_policy(&mut self, cgroup_id: u64) {
        let _ = self.policy.remove(&cgroup_id);
    }

    /// Longest-prefix lookups exactly as the kernel program does them (the kernel answers), for
    /// `explain --bpffs-dir`.
    pub fn lookup_port(&self, id: u32, port: u16) -> Option<u32> {
        self.ports
            .get(&port_key(id, 16, port), 0)
            .ok()
            .map(|r| r.action)
    }

    pub fn lookup_v4(&self, id: u32, addr: [u8; 4]) -> Option<u32> {
        self.cidr_v4
            .get(&v4_key(id, 32, addr), 0)
            .ok()
            .map(|r| r.action)
    }

    pub fn lookup_v6(&self, id: u32, addr: [u8; 16]) -> Option<u32> {
        self.cidr_v6
            .get(&v6_key(id, 128, addr), 0)
            .ok()
            .map(|r| r.action)
    }

    /// Decision counters summed over CPUs, in `Decision::ALL` order.
    pub fn counters(&self) -> Result<Vec<(Decision, u64)>, BpfError> {
        (0..DECISION_COUNT)
            .map(|i| {
                let per_cpu = self
                    .counters
                    .get(&i, 0)
                    .map_err(|e| BpfError::map(map_names::COUNTERS, e))?;
                Ok((Decision::ALL[i as usize], per_cpu.iter().sum()))
            })
            .collect()
    }
}
