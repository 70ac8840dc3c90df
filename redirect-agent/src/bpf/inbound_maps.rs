//! Typed access to the pinned inbound maps (sk_lookup): the per-netns records, their rule tries
//! and the counters. Entries use the same [`PolicyEntries`] shape as the outbound tries, in an id
//! space of their own.
use std::{collections::BTreeMap, path::Path};

use aya::maps::{HashMap, MapData, PerCpuArray};
use redirect_common::inbound::{InboundCounter, InboundRecord, map_names};

use super::{
    BpfError,
    maps::{open, per_cpu_counters},
    tries::RuleTries,
};

pub struct InboundMaps {
    records: HashMap<MapData, u64, InboundRecord>,
    tries: RuleTries,
    stats: PerCpuArray<MapData, u64>,
}

impl InboundMaps {
    /// Opens the inbound maps pinned under `dir` (an agent older than inbound has none).
    pub fn open(dir: &Path) -> Result<Self, BpfError> {
        Ok(Self {
            records: open(dir, map_names::INBOUND)?,
            tries: RuleTries::open(
                dir,
                [
                    map_names::IN_SRC_V4,
                    map_names::IN_SRC_V6,
                    map_names::IN_PORTS,
                ],
            )?,
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

    /// Inbound counters summed over CPUs, in `InboundCounter::ALL` order.
    pub fn counters(&self) -> Result<Vec<(InboundCounter, u64)>, BpfError> {
        per_cpu_counters(&self.stats, map_names::IN_STATS, &InboundCounter::ALL)
    }
}

super::tries::deref_to_tries!(InboundMaps);
