//! The Kubernetes view of this node → reconcile snapshots. Holds the reflector stores (pods on
//! this node, namespace metadata, the MeshConfig) and the pod-cgroup map, and submits a snapshot
//! whenever what they say changes, but not before every store has a complete list and the cgroup
//! tree has been scanned: a partial first snapshot would remove adopted entries of pods not listed
//! yet.
use std::{sync::Arc, time::Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{core::PartialObjectMeta, runtime::reflector::Store};
use tracing::debug;

use super::{
    KubeOptions,
    crd::MeshConfig,
    pods::{self, MeshedPod},
    watch::{Signal, Watched},
};
use crate::{
    cgroup::watch::{CgroupWatcher, Change},
    metrics::Metrics,
    reconcile::{Owner, Snapshot, WorkloadSpec},
};

pub struct Stores {
    pub pods: Store<Pod>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub mesh_configs: Store<MeshConfig>,
}

pub struct Aggregator {
    opts: KubeOptions,
    stores: Stores,
    synced: [bool; 3],
    /// The oldest event not yet answered by a submitted snapshot.
    dirty_since: Option<Instant>,
    /// A cgroup changed: submit even if the snapshot looks the same (a replaced sandbox keeps its
    /// path but has a new cgroup id).
    cgroups_changed: bool,
    last: Option<Snapshot>,
    metrics: Arc<Metrics>,
}

fn index(r: Watched) -> usize {
    match r {
        Watched::Pods => 0,
        Watched::Namespaces => 1,
        Watched::MeshConfig => 2,
    }
}

impl Aggregator {
    pub fn new(opts: KubeOptions, stores: Stores, metrics: Arc<Metrics>) -> Self {
        Self {
            opts,
            stores,
            synced: [false; 3],
            dirty_since: None,
            cgroups_changed: false,
            last: None,
            metrics,
        }
    }

    fn touch(&mut self, at: Instant) {
        self.dirty_since = Some(self.dirty_since.map_or(at, |d| d.min(at)));
    }

    pub fn signal(&mut self, s: Signal) {
        match s {
            Signal::Synced { resource, at } => {
                self.synced[index(resource)] = true;
                self.touch(at);
            }
            Signal::Changed { at, .. } => self.touch(at),
        }
    }

    pub fn cgroup_changes(&mut self, changes: &[Change], at: Instant) {
        for c in changes {
            debug!(?c, "pod cgroup change");
        }
        self.cgroups_changed = true;
        self.touch(at);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    /// Submits a snapshot if something changed since the last one and every store is synced.
    pub fn maybe_submit(&mut self, owner: &Owner, cgroups: &mut CgroupWatcher) {
        let Some(since) = self.dirty_since else {
            return;
        };
        if !self.is_synced() {
            return;
        }
        let snapshot = self.snapshot(cgroups);
        let same = self.last.as_ref() == Some(&snapshot);
        if !same || self.cgroups_changed {
            owner.submit(snapshot.clone(), since);
            self.last = Some(snapshot);
        }
        self.dirty_since = None;
        self.cgroups_changed = false;
    }

    /// The whole desired state, from the stores and the cgroup map.
    pub fn snapshot(&self, cgroups: &mut CgroupWatcher) -> Snapshot {
        let mesh = self
            .stores
            .mesh_configs
            .state()
            .into_iter()
            .find(|m| m.metadata.name.as_deref() == Some(self.opts.mesh_config_name.as_str()))
            .map(|m| m.spec.traffic.clone())
            .unwrap_or_default();
        let namespaces = self
            .stores
            .namespaces
            .state()
            .into_iter()
            .filter_map(|ns| {
                let name = ns.metadata.name.clone()?;
                Some((name, ns.metadata.annotations.clone().unwrap_or_default()))
            })
            .collect();
        let mut meshed: Vec<MeshedPod> = self
            .stores
            .pods
            .state()
            .iter()
            .filter(|p| {
                // The field selector already says so; a pod that moved is not ours.
                p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                    == Some(self.opts.node_name.as_str())
            })
            .filter_map(|p| pods::meshed(p, &self.opts.sidecar_containers))
            .collect();
        // Stable order, so that equal states compare equal.
        meshed.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.metrics.pods_meshed.set(meshed.len() as i64);
        let workloads = meshed
            .into_iter()
            .map(|p| WorkloadSpec {
                // A pod whose cgroup is not there yet gets an empty path: reconcile reports it
                // as pending, and the inotify event for its directory triggers the next pass.
                cgroup: cgroups.lookup(&p.uid).map(|c| c.path).unwrap_or_default(),
                namespace: p.namespace,
                name: p.name,
                proxy_cgroup: None,
                proxy_uid: p.proxy_uid,
                netns: None,
                annotations: p.annotations,
            })
            .collect();
        Snapshot {
            mesh,
            proxy: self.opts.proxy.clone(),
            namespaces,
            workloads,
        }
    }
}
