//! Typed access to the pinned inbound maps (sk_lookup): the per-netns records, their rule tries
//! and the counters. Entries use the same [`PolicyEntries`] shape as the outbound tries, in an id
//! space of their own.
use std::{collections::BTreeMap, path::Path};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key as LpmKey};
use redirect_common::{
    CidrV4Key, CidrV6Key, POLICY_ID_BITS, PortKey, Rule,
    inbound::{INBOUND_COUNTER_COUNT, InboundCounter, InboundRecord, map_names},
};

use super::{BpfError, PolicyEntries};

pub struct InboundMaps {
    records: HashMap<MapData, u64, InboundRecord>,
    ports: LpmTrie<MapData, PortKey, Rule>,
    src_v4: LpmTrie<MapData, CidrV4Key, Rule>,
    src_v6: LpmTrie<MapData, CidrV6Key, Rule>,
    stats: PerCpuArray<MapData, u64>,
}

fn open<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &'static str) -> Result<T, BpfError> {
    let path = dir.join(name);
    let err = |source: Box<dyn std::error::Error + Send + Sync>| BpfError::OpenPin {
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(|e| err(Box::new(e)))?;
    let map = Map::from_map_data(data).map_err(|e| err(Box::new(e)))?;
    T::try_from(map).map_err(|e| err(Box::new(e)))
}

fn id_bytes(id: u32) -> [u8; 4] {
    id.to_be_bytes()
}

fn port_key(id: u32, bits: u32, port: u16) -> LpmKey<PortKey> {
    let key = PortKey {
        policy_id: id_bytes(id),
        port: port.to_be_bytes(),
        _pad: [0; 2],
    };
    LpmKey::new(POLICY_ID_BITS + bits, key)
}

fn v4_key(id: u32, bits: u32, addr: [u8; 4]) -> LpmKey<CidrV4Key> {
    LpmKey::new(
        POLICY_ID_BITS + bits,
        CidrV4Key {
            policy_id: id_bytes(id),
            addr,
        },
    )
}

fn v6_key(id: u32, bits: u32, addr: [u8; 16]) -> LpmKey<CidrV6Key> {
    LpmKey::new(
        POLICY_ID_BITS + bits,
        CidrV6Key {
            policy_id: id_bytes(id),
            addr,
        },
    )
}

impl InboundMaps {
    /// Opens the inbound maps pinned under `dir` (an agent older than inbound has none).
    pub fn open(dir: &Path) -> Result<Self, BpfError> {
        Ok(Self {
            records: open(dir, map_names::INBOUND)?,
            ports: open(dir, map_names::IN_PORTS)?,
            src_v4: open(dir, map_names::IN_SRC_V4)?,
            src_v6: open(dir, map_names::IN_SRC_V6)?,
            stats: open(dir, map_names::IN_STATS)?,
        })
    }

    pub fn records(&self) -> Result<BTreeMap<u64, InboundRecord>, BpfError> {
        self.records
            .iter()
            .map(|r| r.map_err(|e| BpfError::map(map_names::INBOUND, e)))
            .collect()
    }

    pub fn record(&self, netns_cookie: u64) -> Option<InboundRecord> {
        self.records.get(&netns_cookie, 0).ok()
    }

    pub fn set_record(&mut self, netns_cookie: u64, r: &InboundRecord) -> Result<(), BpfError> {
        self.records
            .insert(netns_cookie, r, 0)
            .map_err(|e| BpfError::map(map_names::INBOUND, e))
    }

    pub fn remove_record(&mut self, netns_cookie: u64) {
        let _ = self.records.remove(&netns_cookie);
    }

    /// Every rule entry, grouped by inbound policy id.
    pub fn entries(&self) -> Result<BTreeMap<u32, PolicyEntries>, BpfError> {
        let mut out: BTreeMap<u32, PolicyEntries> = BTreeMap::new();
        for item in self.ports.iter() {
            let (k, v) = item.map_err(|e| BpfError::map(map_names::IN_PORTS, e))?;
            let d = k.data();
            let bits = k.prefix_len() - POLICY_ID_BITS;
            out.entry(u32::from_be_bytes(d.policy_id))
                .or_default()
                .ports
                .insert((bits, u16::from_be_bytes(d.port)), v.action);
        }
        for item in self.src_v4.iter() {
            let (k, v) = item.map_err(|e| BpfError::map(map_names::IN_SRC_V4, e))?;
            let d = k.data();
            let bits = k.prefix_len() - POLICY_ID_BITS;
            out.entry(u32::from_be_bytes(d.policy_id))
                .or_default()
                .v4
                .insert((bits, d.addr), v.action);
        }
        for item in self.src_v6.iter() {
            let (k, v) = item.map_err(|e| BpfError::map(map_names::IN_SRC_V6, e))?;
            let d = k.data();
            let bits = k.prefix_len() - POLICY_ID_BITS;
            out.entry(u32::from_be_bytes(d.policy_id))
                .or_default()
                .v6
                .insert((bits, d.addr), v.action);
        }
        Ok(out)
    }

    /// All or nothing: on failure the entries written so far are removed again.
    pub fn insert_entries(&mut self, id: u32, e: &PolicyEntries) -> Result<(), BpfError> {
        let mut done = PolicyEntries::default();
        let r = self.insert_tracked(id, e, &mut done);
        if r.is_err() {
            self.remove_entries(id, &done);
        }
        r
    }

    fn insert_tracked(
        &mut self,
        id: u32,
        e: &PolicyEntries,
        done: &mut PolicyEntries,
    ) -> Result<(), BpfError> {
        for (&(bits, port), &action) in &e.ports {
            self.ports
                .insert(&port_key(id, bits, port), Rule { action }, 0)
                .map_err(|e| BpfError::map(map_names::IN_PORTS, e))?;
            done.ports.insert((bits, port), action);
        }
        for (&(bits, addr), &action) in &e.v4 {
            self.src_v4
                .insert(&v4_key(id, bits, addr), Rule { action }, 0)
                .map_err(|e| BpfError::map(map_names::IN_SRC_V4, e))?;
            done.v4.insert((bits, addr), action);
        }
        for (&(bits, addr), &action) in &e.v6 {
            self.src_v6
                .insert(&v6_key(id, bits, addr), Rule { action }, 0)
                .map_err(|e| BpfError::map(map_names::IN_SRC_V6, e))?;
            done.v6.insert((bits, addr), action);
        }
        Ok(())
    }

    /// Best effort: an entry already gone is not an error.
    pub fn remove_entries(&mut self, id: u32, e: &PolicyEntries) {
        for &(bits, port) in e.ports.keys() {
            let _ = self.ports.remove(&port_key(id, bits, port));
        }
        for &(bits, addr) in e.v4.keys() {
            let _ = self.src_v4.remove(&v4_key(id, bits, addr));
        }
        for &(bits, addr) in e.v6.keys() {
            let _ = self.src_v6.remove(&v6_key(id, bits, addr));
        }
    }

    /// Lookups exactly as the sk_lookup program does them, for `explain --inbound --bpffs-dir`.
    pub fn lookup_port(&self, id: u32, port: u16) -> Option<u32> {
        self.ports
            .get(&port_key(id, 16, port), 0)
            .ok()
            .map(|r| r.action)
    }

    pub fn lookup_v4(&self, id: u32, addr: [u8; 4]) -> Option<u32> {
        self.src_v4
            .get(&v4_key(id, 32, addr), 0)
            .ok()
            .map(|r| r.action)
    }

    pub fn lookup_v6(&self, id: u32, addr: [u8; 16]) -> Option<u32> {
        self.src_v6
            .get(&v6_key(id, 128, addr), 0)
            .ok()
            .map(|r| r.action)
    }

    /// Inbound counters summed over CPUs, in `InboundCounter::ALL` order.
    pub fn counters(&self) -> Result<Vec<(InboundCounter, u64)>, BpfError> {
        (0..INBOUND_COUNTER_COUNT)
            .map(|i| {
                let per_cpu = self
                    .stats
                    .get(&i, 0)
                    .map_err(|e| BpfError::map(map_names::IN_STATS, e))?;
                Ok((InboundCounter::ALL[i as usize], per_cpu.iter().sum()))
            })
            .collect()
    }
}
