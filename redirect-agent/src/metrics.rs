//! Prometheus metrics (prometheus-client, OpenMetrics text) for `/metrics`.
//!
//! Two kinds: the agent's own (reconcile latency and duration, errors, registered workloads, map
//! fill levels), updated by the reconcile owner and the sources; and the kernel's, read from the
//! pinned maps at each scrape (decision counters, map capacities), so they are right even for
//! state an earlier agent left behind.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge,
        gauge::Gauge, histogram::Histogram,
    },
    registry::Registry,
};
use redirect_common::map_names;

use crate::bpf::PinnedMaps;

/// Label set: a list of (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    /// From the source event (watch event, inotify event, file change) to the maps applied.
    pub reconcile_latency: Histogram,
    /// One reconcile pass (build + map writes).
    pub reconcile_duration: Histogram,
    pub reconciles: Counter,
    /// Workload policies rejected by passes (bad annotation or MeshConfig value).
    pub policy_rejections: Counter,
    /// Failed map writes, by `reason` (`map_full` or `other`).
    pub apply_errors: Family<Labels, Counter>,
    /// Workloads with a policy record in the kernel.
    pub workloads_registered: Gauge,
    /// Workloads known to the source whose cgroup does not exist (yet).
    pub workloads_pending: Gauge,
    /// 1 per workload whose latest policy was rejected: {namespace, name, key, reason}.
    pub workload_errors: Family<Labels, Gauge>,
    /// Entries the agent has written, by `map`.
    pub map_entries: Family<Labels, Gauge>,
    /// 1 once the first snapshot is applied and nothing is queued.
    pub ready: Gauge,
    /// Errors from Kubernetes watches, by `resource`; each one leads to a re-list.
    pub watch_errors: Family<Labels, Counter>,
    /// Kubernetes Events posted, by `reason`.
    pub events_posted: Family<Labels, Counter>,
    /// Pods on this node that are in the mesh (Kubernetes source).
    pub pods_meshed: Gauge,
    /// Since when each Kubernetes watch has been failing (`redirect_kube_watch_down_seconds`).
    pub watch_down: Arc<WatchDown>,
    /// 1 while the MeshConfig in the API is rejected and the last valid one is in force.
    pub meshconfig_rejected: Gauge,
    /// Meshed pods not registered because their proxy cannot be exempted (Kubernetes source).
    pub pods_not_exempt: Gauge,
    /// Registered cgroup id → `namespace/name`, set after each pass: the labels of the per-pod
    /// decision counters read from `POD_STATS` at scrape time.
    workload_names: Arc<Mutex<BTreeMap<u64, String>>>,
}

/// Per watched resource: None while the watch is healthy, else when it started failing. Read at
/// scrape time, so the figure is current without a ticking task.
#[derive(Debug, Default)]
pub struct WatchDown(Mutex<BTreeMap<&'static str, Option<Instant>>>);

impl WatchDown {
    /// The watch of `resource` failed; keeps the first failure's time while it stays down.
    pub fn down(&self, resource: &'static str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(resource)
            .or_default()
            .get_or_insert_with(Instant::now);
    }

    /// The watch of `resource` delivered a complete list (or an event): it is up.
    pub fn up(&self, resource: &'static str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(resource, None);
    }

    /// Seconds each watch has been down (0 when up).
    pub fn seconds(&self) -> Vec<(&'static str, f64)> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .map(|(r, since)| (*r, since.map_or(0.0, |s| s.elapsed().as_secs_f64())))
            .collect()
    }
}

impl Collector for WatchDown {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut e = encoder.encode_descriptor(
            "kube_watch_down_seconds",
            "How long each Kubernetes watch has been failing (0 while it is healthy); the applied state is kept meanwhile",
            None,
            MetricType::Gauge,
        )?;
        for (resource, secs) in self.seconds() {
            let labels = [("resource", resource)];
            ConstGauge::new(secs).encode(e.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Seconds: 100 µs to 10 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ]
    .into_iter()
}

impl Metrics {
    /// `bpffs_dir`: where the maps are pinned, for the kernel metrics (None: agent metrics only).
    pub fn new(bpffs_dir: Option<&Path>) -> Self {
        let mut registry = Registry::with_prefix("redirect");
        let m = Self {
            reconcile_latency: Histogram::new(latency_buckets()),
            reconcile_duration: Histogram::new(latency_buckets()),
            reconciles: Counter::default(),
            policy_rejections: Counter::default(),
            apply_errors: Family::default(),
            workloads_registered: Gauge::default(),
            workloads_pending: Gauge::default(),
            workload_errors: Family::default(),
            map_entries: Family::default(),
            ready: Gauge::default(),
            watch_errors: Family::default(),
            events_posted: Family::default(),
            pods_meshed: Gauge::default(),
            watch_down: Arc::default(),
            meshconfig_rejected: Gauge::default(),
            pods_not_exempt: Gauge::default(),
            workload_names: Arc::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "reconcile_latency_seconds",
            "Time from a source event (watch, inotify, file change) to the maps being applied",
            m.reconcile_latency.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile pass",
            m.reconcile_duration.clone(),
        );
        r.register("reconciles", "Reconcile passes", m.reconciles.clone());
        r.register(
            "policy_rejections",
            "Workload policies rejected by a pass (bad annotation or MeshConfig value); the workload keeps its last good policy or the mesh default",
            m.policy_rejections.clone(),
        );
        r.register(
            "apply_errors",
            "Failed map writes by reason (map_full, other); the workload keeps its last good policy",
            m.apply_errors.clone(),
        );
        r.register(
            "workloads_registered",
            "Workloads with a policy in the kernel",
            m.workloads_registered.clone(),
        );
        r.register(
            "workloads_pending",
            "Workloads whose cgroup does not exist yet",
            m.workloads_pending.clone(),
        );
        r.register(
            "workload_policy_error",
            "1 for each workload whose current policy input is invalid or could not be written, with the key at fault and the fallback it runs with",
            m.workload_errors.clone(),
        );
        r.register(
            "map_entries",
            "Entries written by the agent, by map",
            m.map_entries.clone(),
        );
        r.register(
            "ready",
            "1 when the first snapshot is applied and nothing is queued",
            m.ready.clone(),
        );
        r.register(
            "kube_watch_errors",
            "Kubernetes watch errors by resource; each one is followed by a re-list",
            m.watch_errors.clone(),
        );
        r.register(
            "kube_events_posted",
            "Kubernetes Events posted, by reason",
            m.events_posted.clone(),
        );
        r.register(
            "pods_meshed",
            "Pods on this node that are in the mesh",
            m.pods_meshed.clone(),
        );
        r.register(
            "meshconfig_rejected",
            "1 while the MeshConfig in the API is invalid and the last valid one (or the built-in default) is in force",
            m.meshconfig_rejected.clone(),
        );
        r.register(
            "pods_not_exempt",
            "Meshed pods not registered because their proxy can be exempted neither by cgroup nor by uid (an Event names why)",
            m.pods_not_exempt.clone(),
        );
        r.register_collector(Box::new(m.watch_down.clone()));
        if let Some(dir) = bpffs_dir {
            r.register_collector(Box::new(KernelCollector {
                dir: dir.to_path_buf(),
                names: m.workload_names.clone(),
            }));
        }
        Self { registry, ..m }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a collector error leaves a partial page, which the
        // scraper reports.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The workloads' names after a pass (the per-pod counters' `namespace` and `pod` labels).
    pub fn set_workload_names(&self, names: &BTreeMap<u64, String>) {
        let mut n = self
            .workload_names
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *n != *names {
            *n = names.clone();
        }
    }

    pub fn observe_latency(&self, d: Duration) {
        self.reconcile_latency.observe(d.as_secs_f64());
    }
}

/// Reads the pinned maps at scrape time.
#[derive(Debug)]
struct KernelCollector {
    dir: PathBuf,
    names: Arc<Mutex<BTreeMap<u64, String>>>,
}

impl KernelCollector {
    /// `redirect_pod_decisions_total{namespace,pod,decision}` from `POD_STATS`. A workload
    /// the agent has no name for (a record adopted after a restart, before its first pass)
    /// is labelled `pod="cgroup-<id>"`.
    fn pod_decisions(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(stats) = crate::bpf::podstats::read_pinned(&self.dir) else {
            return Ok(());
        };
        if stats.is_empty() {
            return Ok(());
        }
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut e = encoder.encode_descriptor(
            "pod_decisions",
            "connect() decisions made by the kernel program, per registered workload (pod) and decision",
            None,
            MetricType::Counter,
        )?;
        for (id, counts) in &stats {
            let (namespace, pod) = match names.get(id).and_then(|n| n.split_once('/')) {
                Some((ns, pod)) => (ns.to_string(), pod.to_string()),
                None => (String::new(), format!("cgroup-{id}")),
            };
            for (decision, n) in crate::bpf::podstats::by_decision(counts) {
                let labels = [
                    ("namespace", namespace.as_str()),
                    ("pod", pod.as_str()),
                    ("decision", decision.name()),
                ];
                ConstCounter::new(n).encode(e.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // No pins (yet): nothing to report, and not an error for the scrape.
        let Ok(maps) = PinnedMaps::open(&self.dir) else {
            return Ok(());
        };
        if let Ok(counters) = maps.counters() {
            let mut e = encoder.encode_descriptor(
                "decisions",
                "connect() decisions made by the kernel program, by decision",
                None,
                MetricType::Counter,
            )?;
            for (decision, n) in counters {
                let labels = [("decision", decision.name())];
                ConstCounter::new(n).encode(e.encode_family(&labels)?)?;
            }
        }
        self.pod_decisions(&mut encoder)?;
        if let Ok(inbound) = crate::bpf::inbound_maps::InboundMaps::open(&self.dir)
            && let Ok(counters) = inbound.counters()
        {
            let mut e = encoder.encode_descriptor(
                "inbound_decisions",
                "sk_lookup decisions and listener events of the inbound program, by event",
                None,
                MetricType::Counter,
            )?;
            for (c, n) in counters {
                ConstCounter::new(n).encode(e.encode_family(&[("event", c.name())])?)?;
            }
        }
        if let Ok(counters) = crate::bpf::dns::dns_stats(&self.dir)
            && !counters.is_empty()
        {
            let mut e = encoder.encode_descriptor(
                "dns_events",
                "DNS capture events of the sendmsg/recvmsg/connect/getpeername programs, by event",
                None,
                MetricType::Counter,
            )?;
            for (ev, n) in counters {
                ConstCounter::new(n).encode(e.encode_family(&[("event", ev.name())])?)?;
            }
        }
        let mut e = encoder.encode_descriptor(
            "map_capacity",
            "max_entries of each pinned map",
            None,
            MetricType::Gauge,
        )?;
        for name in [
            map_names::POLICY,
            map_names::CIDR_V4,
            map_names::CIDR_V6,
            map_names::PORTS,
        ] {
            if let Ok(info) = aya::maps::MapInfo::from_pin(self.dir.join(name)) {
                let labels = [("map", name)];
                ConstGauge::new(i64::from(info.max_entries())).encode(e.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_agent_metrics() {
        let m = Metrics::new(None);
        m.observe_latency(Duration::from_millis(3));
        m.workloads_registered.set(2);
        m.apply_errors
            .get_or_create(&vec![("reason", "map_full".to_string())])
            .inc();
        let text = m.encode();
        assert!(
            text.contains("redirect_reconcile_latency_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("redirect_workloads_registered 2"), "{text}");
        assert!(
            text.contains("redirect_apply_errors_total{reason=\"map_full\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
