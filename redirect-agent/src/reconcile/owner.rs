//! The one owner of the BPF maps (modelled on ztunnel's in-pod state manager): sources submit
//! whole snapshots; a dedicated thread applies them in order, coalescing a backlog into the
//! newest, and publishes what each pass found. A pass whose writes failed is retried with
//! backoff (not only when another event arrives), and retired entry sets are deleted when their
//! grace period ends, which may make room for a workload that did not fit. Readiness: the first
//! snapshot is applied, nothing is queued and no failed write is waiting for its retry.
use std::{
    sync::mpsc,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::{Applier, Fallback, PolicyMaps, Reconciler, Snapshot, WorkloadIssue};
use crate::metrics::Metrics;

/// A snapshot and the time of the oldest source event it answers (for the latency metric).
#[derive(Debug)]
pub struct Update {
    pub snapshot: Snapshot,
    pub since: Instant,
}

/// Liveness and readiness, shared with the admin endpoint.
#[derive(Debug, Default)]
pub struct Health {
    first_applied: AtomicBool,
    /// Submitted and not yet applied.
    in_flight: AtomicUsize,
    owner_alive: AtomicBool,
    generation: AtomicU64,
    /// Some workload's cgroup does not exist (the file source resends its snapshot then).
    waiting: Arc<AtomicBool>,
    /// Workloads whose last write failed and is waiting for its retry.
    errors_pending: AtomicUsize,
}

/// First retry of a failed write; doubles up to [`RETRY_MAX`], reset by a clean pass.
pub const RETRY_MIN: Duration = Duration::from_millis(200);
pub const RETRY_MAX: Duration = Duration::from_secs(30);

impl Health {
    pub fn ready(&self) -> bool {
        self.first_applied.load(Ordering::Acquire)
            && self.in_flight.load(Ordering::Acquire) == 0
            && self.errors_pending.load(Ordering::Acquire) == 0
    }

    pub fn live(&self) -> bool {
        self.owner_alive.load(Ordering::Acquire)
    }

    /// Passes applied so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Why not ready, for /readyz.
    pub fn reason(&self) -> &'static str {
        if !self.live() {
            "the reconcile owner has stopped"
        } else if !self.first_applied.load(Ordering::Acquire) {
            "waiting for the first snapshot (initial lists and cgroup scan)"
        } else if self.in_flight.load(Ordering::Acquire) != 0 {
            "a snapshot is waiting to be applied"
        } else if self.errors_pending.load(Ordering::Acquire) != 0 {
            "writing some workload's policy failed; retrying (see the log and redirect_workload_policy_error)"
        } else {
            "ready"
        }
    }

    pub fn waiting_flag(&self) -> Arc<AtomicBool> {
        self.waiting.clone()
    }
}

/// A workload whose policy could not be written.
#[derive(Clone, Debug)]
pub struct ApplyFailure {
    /// `namespace/name`.
    pub workload: String,
    pub cgroup_id: u64,
    pub error: String,
    pub map_full: bool,
    /// What the workload runs with instead.
    pub fallback: Fallback,
}

/// What the latest pass found: the input of Kubernetes Events and logs.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    pub generation: u64,
    pub issues: Vec<WorkloadIssue>,
    pub apply_errors: Vec<ApplyFailure>,
    pub pending: Vec<String>,
}

/// Handle to the owner thread. Dropping every clone stops the thread after the queue drains.
#[derive(Clone)]
pub struct Owner {
    tx: mpsc::Sender<Update>,
    health: Arc<Health>,
    reports: watch::Receiver<Arc<PassReport>>,
}

impl Owner {
    /// Starts the owner thread with the adopted applier.
    pub fn spawn<M: PolicyMaps + Send + 'static>(
        applier: Applier<M>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Owner, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let (report_tx, reports) = watch::channel(Arc::new(PassReport::default()));
        let health = Arc::new(Health::default());
        health.owner_alive.store(true, Ordering::Release);
        metrics
            .workloads_registered
            .set(applier.applied_count() as i64);
        let thread = std::thread::Builder::new()
            .name("reconcile".into())
            .spawn({
                let health = health.clone();
                move || {
                    run(Reconciler::new(applier), rx, &health, &metrics, &report_tx);
                    health.owner_alive.store(false, Ordering::Release);
                }
            })?;
        Ok((
            Owner {
                tx,
                health,
                reports,
            },
            thread,
        ))
    }

    /// Queues a snapshot. False if the owner has stopped.
    pub fn submit(&self, snapshot: Snapshot, since: Instant) -> bool {
        self.health.in_flight.fetch_add(1, Ordering::AcqRel);
        let ok = self.tx.send(Update { snapshot, since }).is_ok();
        if !ok {
            self.health.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        ok
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// The latest pass's findings; changes once per pass.
    pub fn reports(&self) -> watch::Receiver<Arc<PassReport>> {
        self.reports.clone()
    }
}

fn run<M: PolicyMaps>(
    mut rec: Reconciler<M>,
    rx: mpsc::Receiver<Update>,
    health: &Health,
    metrics: &Metrics,
    reports: &watch::Sender<Arc<PassReport>>,
) {
    let mut last: Option<Snapshot> = None;
    let mut backoff = RETRY_MIN;
    let mut retry_at: Option<Instant> = None;
    // A write refused for lack of room, waiting for retired entries to be freed.
    let mut want_room = false;
    loop {
        let wake = [
            retry_at,
            rec.applier.next_collect(),
            rec.applier.maps().next_due(),
        ]
        .into_iter()
        .flatten()
        .min();
        let received = match wake {
            None => match rx.recv() {
                Ok(u) => Some(u),
                Err(_) => return,
            },
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(u) => Some(u),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
        };
        let (taken, since) = match received {
            Some(first) => {
                let mut taken = 1;
                let mut since = first.since;
                let mut snapshot = first.snapshot;
                while let Ok(newer) = rx.try_recv() {
                    taken += 1;
                    since = since.min(newer.since);
                    snapshot = newer.snapshot;
                }
                last = Some(snapshot);
                (taken, since)
            }
            None => {
                let now = Instant::now();
                let freed = rec.applier.collect(now);
                rec.applier.maps_mut().collect_due(now);
                let due = retry_at.is_some_and(|t| t <= now) || (freed > 0 && want_room);
                if !due || last.is_none() {
                    record_fill(metrics, &rec.applier);
                    continue;
                }
                (0, now)
            }
        };
        let snapshot = last.as_ref().expect("set above");
        let started = Instant::now();
        let outcome = rec.reconcile(snapshot);
        let generation = health.generation.fetch_add(1, Ordering::AcqRel) + 1;
        metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        if taken > 0 {
            metrics.observe_latency(since.elapsed());
        }
        health
            .waiting
            .store(!outcome.pending.is_empty(), Ordering::Release);
        let errors = &outcome.report.errors;
        want_room = errors.iter().any(|e| e.error.is_map_full());
        if errors.is_empty() {
            retry_at = None;
            backoff = RETRY_MIN;
        } else {
            retry_at = Some(Instant::now() + backoff);
            backoff = (backoff * 2).min(RETRY_MAX);
        }
        health.errors_pending.store(errors.len(), Ordering::Release);
        let report = PassReport {
            generation,
            issues: outcome.issues.clone(),
            apply_errors: errors
                .iter()
                .map(|e| ApplyFailure {
                    workload: e.workload.clone(),
                    cgroup_id: e.cgroup_id,
                    error: e.error.to_string(),
                    map_full: e.error.is_map_full(),
                    fallback: e.fallback,
                })
                .collect(),
            pending: outcome.pending.clone(),
        };
        record(metrics, &rec.applier, &report);
        metrics.set_workload_names(&outcome.names);
        log(generation, &outcome, started);
        let _ = reports.send(Arc::new(report));
        health.first_applied.store(true, Ordering::Release);
        health.in_flight.fetch_sub(taken, Ordering::AcqRel);
        metrics.ready.set(i64::from(health.ready()));
    }
}

fn record<M: PolicyMaps>(metrics: &Metrics, applier: &Applier<M>, report: &PassReport) {
    metrics.reconciles.inc();
    metrics
        .workloads_registered
        .set(applier.applied_count() as i64);
    metrics.workloads_pending.set(report.pending.len() as i64);
    metrics.policy_rejections.inc_by(report.issues.len() as u64);
    for e in &report.apply_errors {
        let reason = if e.map_full { "map_full" } else { "other" };
        metrics
            .apply_errors
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }
    metrics.workload_errors.clear();
    for i in &report.issues {
        let labels = vec![
            ("namespace", i.namespace.clone()),
            ("name", i.name.clone()),
            ("key", i.key.clone()),
            ("reason", "invalid_policy".to_string()),
            ("fallback", i.fallback.label().to_string()),
        ];
        metrics.workload_errors.get_or_create(&labels).set(1);
    }
    for e in &report.apply_errors {
        let (namespace, name) = e.workload.split_once('/').unwrap_or(("", &e.workload));
        let reason = if e.map_full {
            "map_full"
        } else {
            "apply_failed"
        };
        let labels = vec![
            ("namespace", namespace.to_string()),
            ("name", name.to_string()),
            ("key", String::new()),
            ("reason", reason.to_string()),
            ("fallback", e.fallback.label().to_string()),
        ];
        metrics.workload_errors.get_or_create(&labels).set(1);
    }
    record_fill(metrics, applier);
}

fn record_fill<M: PolicyMaps>(metrics: &Metrics, applier: &Applier<M>) {
    let fill = applier.fill();
    for (map, n) in [
        (redirect_common::map_names::POLICY, fill.policies),
        (redirect_common::map_names::CIDR_V4, fill.v4),
        (redirect_common::map_names::CIDR_V6, fill.v6),
        (redirect_common::map_names::PORTS, fill.ports),
    ] {
        metrics
            .map_entries
            .get_or_create(&vec![("map", map.to_string())])
            .set(n as i64);
    }
}

fn log(generation: u64, outcome: &super::Outcome, started: Instant) {
    for w in &outcome.warnings {
        warn!("{w}");
    }
    for issue in &outcome.issues {
        error!(
            workload = %format!("{}/{}", issue.namespace, issue.name),
            fallback = issue.fallback.label(),
            "policy rejected: {}; {}",
            issue.error,
            issue.fallback.describe()
        );
    }
    for e in &outcome.report.errors {
        error!(
            workload = %e.workload,
            cgroup_id = e.cgroup_id,
            fallback = e.fallback.label(),
            "applying policy failed, {}: {}",
            e.fallback.describe(),
            e.error
        );
    }
    if !outcome.pending.is_empty() {
        info!(workloads = ?outcome.pending, "waiting for cgroups to appear");
    }
    let r = &outcome.report;
    let changed = r.added + r.updated + r.removed + r.errors.len() + outcome.issues.len() > 0;
    if !changed {
        debug!(generation, unchanged = r.unchanged, "applied, no change");
        return;
    }
    info!(
        generation,
        added = r.added,
        updated = r.updated,
        removed = r.removed,
        unchanged = r.unchanged,
        errors = r.errors.len() + outcome.issues.len(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "applied"
    );
}
