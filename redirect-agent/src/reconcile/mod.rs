//! Snapshot → desired state → map diff. Every source (the file, Kubernetes) produces a
//! [`Snapshot`], with the cgroup ids it found; this module alone turns it into kernel state
//! (docs/architecture.md, "The reconcile rules").
pub mod apply;
mod desired;
pub mod inbound;
pub mod layering;
#[cfg(test)]
mod layering_tests;
pub mod maps;
pub mod owner;
mod pending;
pub mod scale;
mod sets;
mod slots;
#[cfg(test)]
mod slots_tests;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
};

pub use apply::{Applier, ApplyError, ApplyReport, Candidate, Desired, GRACE, Kind, WriteError};
pub use desired::{Fallback, Memo, RecordInputs, WorkloadIssue, build, entries, record};
pub use maps::{Capacity, MemMaps, PolicyMaps};
pub use owner::{Health, Owner, PassReport};
pub use sets::{Fill, Rules};

use crate::{
    cgroup::{
        self,
        netns_ids::{NetnsId, NetnsIds},
    },
    policy::{Annotations, MeshTraffic},
    proxy::ProxyConfig,
};

/// Everything a source knows, in one piece.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Shared, so that a pass can tell an unchanged mesh config (100,000 CIDRs at node scale)
    /// by pointer rather than by comparing it, and clones of a snapshot do not copy it.
    pub mesh: Arc<MeshTraffic>,
    pub proxy: ProxyConfig,
    /// Namespace name → its annotations.
    pub namespaces: BTreeMap<String, Annotations>,
    pub workloads: Vec<WorkloadSpec>,
    /// cgroup directory → its cgroup id, as the source found it. A workload (or proxy) cgroup
    /// missing here is pending.
    pub cgroups: BTreeMap<PathBuf, u64>,
    /// netns file → its inode and cookie as the source found them ([`Self::resolve_netns`]), or
    /// why they could not be read; the reconcile reads no netns itself.
    pub netns: BTreeMap<PathBuf, Result<NetnsId, String>>,
}

impl Snapshot {
    /// Resolves every workload's netns through `ids` (a cookie is read once per namespace and
    /// then cached, cgroup/netns_ids.rs), and lets go of the namespaces no workload names now.
    pub fn resolve_netns(&mut self, ids: &mut NetnsIds) {
        self.netns.clear();
        for w in &self.workloads {
            if let Some(path) = &w.netns
                && !self.netns.contains_key(path)
            {
                self.netns.insert(path.clone(), ids.resolve(path));
            }
        }
        let keep = self
            .netns
            .values()
            .filter_map(|r| r.as_ref().ok().map(|id| id.inode))
            .collect();
        ids.retain(&keep);
    }

    /// Looks up the cgroup id of every workload and proxy cgroup path that exists now (for
    /// sources that know paths only, like the file source).
    pub fn resolve_cgroups(&mut self) {
        self.cgroups.clear();
        for w in &self.workloads {
            for p in std::iter::once(&w.cgroup).chain(w.proxy_cgroup.as_ref()) {
                if let Ok(id) = cgroup::cgroup_id(p) {
                    self.cgroups.insert(p.clone(), id);
                }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadSpec {
    pub namespace: String,
    pub name: String,
    /// Absolute path of the workload's cgroup directory.
    pub cgroup: PathBuf,
    pub proxy_cgroup: Option<PathBuf>,
    /// This workload's proxy uid (Kubernetes: the sidecar container's runAsUser). An annotation
    /// (Linkerd `proxy-uid`, Kuma `sidecar-uid`) overrides it; it overrides `proxy.uid`.
    pub proxy_uid: Option<u32>,
    /// The workload's network namespace (a netns file such as /run/netns/NAME or
    /// /proc/PID/ns/net); None means no inbound interception.
    pub netns: Option<PathBuf>,
    /// This workload's proxy inbound port (Kubernetes: by the pod's dialect); None means
    /// `proxy.inbound_port`.
    pub inbound_port: Option<u16>,
    pub annotations: Annotations,
}

impl WorkloadSpec {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The result of one reconcile pass, for logs, metrics and readiness.
#[derive(Debug, Default)]
pub struct Outcome {
    pub report: ApplyReport,
    /// Workloads whose policy was rejected, with what they run instead.
    pub issues: Vec<WorkloadIssue>,
    /// Non-fatal notes (e.g. host bits normalised), naming workload, key and value.
    pub warnings: Vec<String>,
    /// Workloads whose cgroup (or proxy cgroup) does not exist (yet).
    pub pending: Vec<String>,
    pub inbound: inbound::InboundReport,
    /// Registered cgroup id → `namespace/name`, for the per-pod counters' labels.
    pub names: BTreeMap<u64, String>,
}

/// The applier and the memo of compiled policies: the reconcile state kept across passes.
pub struct Reconciler<M: PolicyMaps = crate::bpf::PinnedMaps> {
    pub applier: Applier<M>,
    pub memo: Memo,
}

impl<M: PolicyMaps> Reconciler<M> {
    pub fn new(applier: Applier<M>) -> Self {
        Self {
            applier,
            memo: Memo::default(),
        }
    }

    /// Applies one snapshot.
    pub fn reconcile(&mut self, snapshot: &Snapshot) -> Outcome {
        let applier = &self.applier;
        let built = build(snapshot, &mut self.memo, |id| applier.is_applied(id));
        let report = self.applier.apply(&built.desired, &built.keep);
        let names = built
            .desired
            .iter()
            .map(|(id, d)| (*id, d.workload.clone()))
            .collect();
        let mut issues = built.issues;
        for i in &mut issues {
            if let Some(f) = i.cgroup_id.and_then(|id| report.fallbacks.get(&id)) {
                i.fallback = *f;
            }
        }
        let inbound = self
            .applier
            .inbound
            .as_mut()
            .map(|i| i.apply(snapshot))
            .unwrap_or_default();
        Outcome {
            report,
            issues,
            warnings: built.warnings,
            pending: built.pending,
            inbound,
            names,
        }
    }
}

/// Output of [`build`].
#[derive(Debug, Default)]
pub struct Built {
    pub desired: BTreeMap<u64, Desired>,
    pub keep: BTreeSet<u64>,
    pub issues: Vec<WorkloadIssue>,
    pub warnings: Vec<String>,
    pub pending: Vec<String>,
}
