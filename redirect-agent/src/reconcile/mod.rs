//! Snapshot → desired state → map diff. Every source (the file, Kubernetes) produces a
//! [`Snapshot`]; this module alone turns it into kernel state.
pub mod apply;
mod desired;
pub mod inbound;
pub mod owner;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

pub use apply::{Applier, ApplyError, ApplyReport, Desired, Fill};
pub use desired::{Fallback, WorkloadIssue, build};
pub use owner::{Health, Owner, PassReport};

use crate::{
    policy::{Annotations, MeshTraffic},
    proxy::ProxyConfig,
};

/// Everything a source knows, in one piece.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub mesh: MeshTraffic,
    pub proxy: ProxyConfig,
    /// Namespace name → its annotations.
    pub namespaces: BTreeMap<String, Annotations>,
    pub workloads: Vec<WorkloadSpec>,
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
    /// Workloads whose policy was rejected; they keep their last good policy.
    pub issues: Vec<WorkloadIssue>,
    /// Non-fatal notes (e.g. host bits normalised), naming workload, key and value.
    pub warnings: Vec<String>,
    /// Workloads whose cgroup does not exist (yet).
    pub pending: Vec<String>,
    pub inbound: inbound::InboundReport,
}

/// Applies one snapshot.
pub fn reconcile(applier: &mut Applier, snapshot: &Snapshot) -> Outcome {
    let built = build(snapshot, |cgroup_id| applier.is_applied(cgroup_id));
    let report = applier.apply(&built.desired, &built.keep);
    let inbound = applier.inbound.apply(snapshot);
    Outcome {
        inbound,
        report,
        issues: built.issues,
        warnings: built.warnings,
        pending: built.pending,
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
