//! Node-scale harness (issue #13): many workloads sharing one large mesh exclusion list, some
//! with extra CIDRs of their own, reconciled against the in-memory maps ([`run`]) or against any
//! [`PolicyMaps`], e.g. real pinned maps ([`run_on`]). It measures; it asserts nothing, so the
//! bench (`cargo xtask bench`) can call it and report the figures side by side.
//!
//! ```no_run
//! let report = redirect_agent::reconcile::scale::run(&Default::default());
//! println!("{report}");
//! ```
use std::{
    collections::BTreeMap,
    fmt,
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Applier, MemMaps, PolicyMaps, Reconciler, Snapshot, WorkloadSpec};
use crate::{bpf::BpfError, proxy::ProxyConfig};

/// FSM's union key: the pod's CIDRs are added to the mesh list, not replacing it.
const EXTRA_KEY: &str = "flomesh.io/outbound-ip-range-exclusion-list";
const PORT_KEY: &str = "flomesh.io/outbound-port-exclusion-list";

#[derive(Clone, Debug)]
pub struct ScaleConfig {
    /// Workloads with no annotations of their own (they share the mesh default).
    pub shared_workloads: usize,
    /// Size of the mesh exclusion list (/32s, none adjacent, so none merge).
    pub mesh_cidrs: usize,
    /// Workloads with extra exclusions of their own.
    pub own_workloads: usize,
    pub own_extra_cidrs: usize,
    /// One-workload edits timed for the p50/p99.
    pub edits: usize,
    /// Capacity of each in-memory trie ([`run`] only).
    pub max_rule_entries: usize,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        Self {
            shared_workloads: 1_000,
            mesh_cidrs: 100_000,
            own_workloads: 50,
            own_extra_cidrs: 10,
            edits: 100,
            max_rule_entries: redirect_common::MAX_RULE_ENTRIES as usize,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ScaleReport {
    pub workloads: usize,
    /// Workloads with a record.
    pub registered: usize,
    /// Workloads that run a fallback (their own policy did not fit).
    pub on_fallback: usize,
    /// IPv4 trie entries, and distinct entry sets (policy ids).
    pub v4_entries: usize,
    pub policy_sets: usize,
    pub first_reconcile: Duration,
    /// Resident set size after the first reconcile, and its peak, of this whole process.
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    /// A pass after one workload's annotation changed.
    pub edit_p50: Duration,
    pub edit_p99: Duration,
    /// The most workloads one of those passes recomputed (the rest reused their last result).
    pub edit_recomputed: usize,
    /// A pass after nothing changed.
    pub unchanged_pass: Duration,
    /// A pass after the mesh list changed (one CIDR added).
    pub mesh_edit: Duration,
    /// Workloads on a fallback after that pass (a change needs room for the old and the new
    /// entries at once: make before break).
    pub mesh_edit_on_fallback: usize,
}

impl fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "workloads {} registered {} on_fallback {} v4_entries {} policy_sets {} \
             first_reconcile_ms {:.1} rss_mib {:.1} peak_rss_mib {:.1} edit_p50_ms {:.2} \
             edit_p99_ms {:.2} edit_recomputed {} unchanged_pass_ms {:.2} mesh_edit_ms {:.1} \
             mesh_edit_on_fallback {}",
            self.workloads,
            self.registered,
            self.on_fallback,
            self.v4_entries,
            self.policy_sets,
            ms(self.first_reconcile),
            self.rss_bytes as f64 / 1048576.0,
            self.peak_rss_bytes as f64 / 1048576.0,
            ms(self.edit_p50),
            ms(self.edit_p99),
            self.edit_recomputed,
            ms(self.unchanged_pass),
            ms(self.mesh_edit),
            self.mesh_edit_on_fallback,
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Against the in-memory maps.
pub fn run(cfg: &ScaleConfig) -> ScaleReport {
    run_on(MemMaps::new(cfg.max_rule_entries), cfg).expect("the in-memory maps do not fail")
}

/// Against `maps` (empty ones: what they hold is adopted and then replaced).
pub fn run_on<M: PolicyMaps>(maps: M, cfg: &ScaleConfig) -> Result<ScaleReport, BpfError> {
    let mut rec = Reconciler::new(Applier::adopt(maps)?);
    let mut snap = snapshot(cfg);
    let started = Instant::now();
    let first = rec.reconcile(&snap);
    let mut report = ScaleReport {
        workloads: snap.workloads.len(),
        registered: rec.applier.applied_count(),
        on_fallback: first.report.fallbacks.len(),
        v4_entries: rec.applier.fill().v4,
        policy_sets: rec.applier.policy_sets(),
        first_reconcile: started.elapsed(),
        ..Default::default()
    };
    (report.rss_bytes, report.peak_rss_bytes) = rss();
    let t = Instant::now();
    rec.reconcile(&snap);
    report.unchanged_pass = t.elapsed();
    let mut times = Vec::with_capacity(cfg.edits);
    for i in 0..cfg.edits {
        let w = &mut snap.workloads[i % cfg.shared_workloads.max(1)];
        w.annotations
            .insert(PORT_KEY.into(), (1000 + i % 60000).to_string());
        let t = Instant::now();
        rec.reconcile(&snap);
        times.push(t.elapsed());
        report.edit_recomputed = report.edit_recomputed.max(rec.memo.recomputed);
    }
    times.sort();
    let pct = |p: usize| {
        times
            .get((times.len() * p / 100).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    report.edit_p50 = pct(50);
    report.edit_p99 = pct(99);
    Arc::make_mut(&mut snap.mesh)
        .outbound_ip_range_exclusion_list
        .push("192.0.2.0/24".into());
    let t = Instant::now();
    let pass = rec.reconcile(&snap);
    report.mesh_edit = t.elapsed();
    report.mesh_edit_on_fallback = pass.report.fallbacks.len();
    Ok(report)
}

/// The snapshot of the scenario: cgroup ids are made up (nothing is attached).
pub fn snapshot(cfg: &ScaleConfig) -> Snapshot {
    let mut s = Snapshot {
        proxy: ProxyConfig {
            uid: Some(1337),
            ..ProxyConfig::default()
        },
        ..Snapshot::default()
    };
    // 10.0.0.0 + 2i: /32s with a gap between each, so compilation cannot merge them.
    Arc::make_mut(&mut s.mesh).outbound_ip_range_exclusion_list = (0..cfg.mesh_cidrs as u32)
        .map(|i| format!("{}/32", Ipv4Addr::from(0x0a00_0000 + 2 * i)))
        .collect();
    for i in 0..cfg.shared_workloads + cfg.own_workloads {
        let name = format!("w{i}");
        let cgroup = PathBuf::from(format!("/scale/{name}"));
        let mut annotations = BTreeMap::new();
        if i >= cfg.shared_workloads {
            let n = (i - cfg.shared_workloads) as u32;
            let extras: Vec<String> = (0..cfg.own_extra_cidrs as u32)
                .map(|j| format!("{}/32", Ipv4Addr::from(0xac10_0000 + (n << 8) + 2 * j)))
                .collect();
            annotations.insert(EXTRA_KEY.to_string(), extras.join(","));
        }
        s.cgroups.insert(cgroup.clone(), 1_000_000 + i as u64);
        s.workloads.push(WorkloadSpec {
            namespace: "scale".into(),
            name,
            cgroup,
            proxy_cgroup: None,
            proxy_uid: None,
            netns: None,
            inbound_port: None,
            annotations,
        });
    }
    s
}

/// VmRSS and VmHWM of this process, in bytes (0 where /proc says nothing).
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness at a size that runs in a unit test; the full size is `run(&Default::default())`.
    #[test]
    fn the_harness_registers_every_workload_and_shares_the_mesh_set() {
        let cfg = ScaleConfig {
            shared_workloads: 100,
            mesh_cidrs: 1_000,
            own_workloads: 5,
            own_extra_cidrs: 3,
            edits: 5,
            max_rule_entries: 1 << 20,
        };
        let r = run(&cfg);
        assert_eq!(r.registered, 105);
        assert_eq!(r.on_fallback, 0);
        // One shared set (1,000 exclusions + the include), five overlays over it (their 3
        // extras each), plus the reserved last-resort set.
        assert_eq!(r.v4_entries, 1_001 + 5 * 3 + 1, "{r}");
        assert_eq!(r.policy_sets, 7, "{r}");
        assert_eq!(r.edit_recomputed, 1, "{r}");
    }
}
