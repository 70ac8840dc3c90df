//! The DNS capture counters (`DNS_STATS`, redirect-ebpf/src/dns.rs), read from their pin for
//! `inspect` and `/metrics`.
use std::path::Path;

use aya::maps::{MapData, PerCpuArray};
use redirect_common::dns::{DnsEvent, map_names};

use super::BpfError;

/// DNS event counters summed over CPUs, in `DnsEvent::ALL` order; empty when the map is not
/// pinned (maps made by a build without DNS capture).
pub fn dns_stats(dir: &Path) -> Result<Vec<(DnsEvent, u64)>, BpfError> {
    if !dir.join(map_names::DNS_STATS).exists() {
        return Ok(Vec::new());
    }
    let stats: PerCpuArray<MapData, u64> = super::maps::open(dir, map_names::DNS_STATS)?;
    super::maps::per_cpu_counters(&stats, map_names::DNS_STATS, &DnsEvent::ALL)
}
