//! The Kubernetes view of this node → reconcile snapshots. Holds the reflector stores (pods on
//! this node, namespace metadata, the MeshConfig) and the pod-cgroup map, and submits a snapshot
//! whenever what they say changes, but not before every store has a complete list and the cgroup
//! tree has been scanned: a partial first snapshot would remove adopted entries of pods not listed
//! yet.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{core::PartialObjectMeta, runtime::reflector::Store};
use tokio::sync::watch;
use tracing::{debug, error, info};

use super::{
    KubeOptions,
    crd::MeshConfig,
    events::{self, Finding, Regarding},
    guard,
    pods::{self, MeshedBy, MeshedPod},
    watch::{Signal, Watched},
};
use crate::{
    cgroup::{
        discover,
        netns::NetnsWatcher,
        watch::{CgroupWatcher, Change},
    },
    metrics::Metrics,
    policy::{Annotations, MeshTraffic, WorkloadInputs},
    proxy::ProxyMode,
    reconcile::{Owner, Snapshot, WorkloadSpec},
};

/// The MeshConfig `spec.traffic` in force: the newest valid one seen, or the built-in default if
/// there never was a valid one. A rejected MeshConfig never reaches reconcile, so it cannot stop
/// new pods from registering or freeze the pods that are there (each keeps following its own
/// annotations).
#[derive(Debug, Default)]
struct MeshInForce {
    traffic: MeshTraffic,
    /// `traffic` with the DNS default, as snapshots carry it: one `Arc` per content, so that a
    /// pass sees an unchanged mesh by pointer (reconcile/desired.rs, `Memo::begin`) and a
    /// snapshot does not copy a 100,000-entry list.
    shared: Option<std::sync::Arc<MeshTraffic>>,
    /// resourceVersion of the object in force (None: the built-in default).
    version: Option<String>,
    /// The object in the API that was last looked at (spec.traffic as it is there), and whether
    /// it was rejected, so that a rejection is reported once.
    seen: Option<MeshTraffic>,
    rejected: Option<Finding>,
}

/// Why `traffic` cannot be used (bad value at a named field), if it cannot.
pub fn validate_mesh(traffic: &MeshTraffic) -> Result<(), crate::policy::PolicyError> {
    let empty = Annotations::new();
    crate::policy::resolve(&WorkloadInputs {
        mesh: traffic,
        namespace: "",
        namespace_annotations: &empty,
        name: "",
        pod_annotations: &empty,
    })
    .map(|_| ())
}

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
    mesh: MeshInForce,
    /// The source's own findings (a rejected MeshConfig, a pod whose proxy cannot be exempted),
    /// for the Event publisher.
    findings: watch::Sender<BTreeSet<Finding>>,
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
            mesh: MeshInForce::default(),
            findings: watch::Sender::new(BTreeSet::new()),
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

    /// Pods whose network namespace changed (found, replaced, gone): submit even if the paths
    /// look the same.
    pub fn netns_changes(&mut self, pods: &[String], at: Instant) {
        debug!(?pods, "pod netns change");
        self.cgroups_changed = true;
        self.touch(at);
    }

    /// The source's findings, for [`events::publish`].
    pub fn findings(&self) -> watch::Receiver<BTreeSet<Finding>> {
        self.findings.subscribe()
    }

    /// Takes the MeshConfig in the API if it is valid; otherwise keeps the one in force and reports
    /// the bad one once (log, `redirect_meshconfig_rejected`, an Event on the MeshConfig).
    fn update_mesh(&mut self) {
        let object = self
            .stores
            .mesh_configs
            .state()
            .into_iter()
            .find(|m| m.metadata.name.as_deref() == Some(self.opts.mesh_config_name.as_str()));
        let candidate = object
            .as_ref()
            .map(|m| m.spec.traffic.clone())
            .unwrap_or_default();
        if self.mesh.seen.as_ref() == Some(&candidate) {
            return;
        }
        self.mesh.seen = Some(candidate.clone());
        let (ns, name) = (
            self.opts.mesh_config_namespace.clone(),
            self.opts.mesh_config_name.clone(),
        );
        match validate_mesh(&candidate) {
            Ok(()) => {
                if self.mesh.rejected.take().is_some() {
                    info!(meshconfig = %format!("{ns}/{name}"), "MeshConfig valid again; it is in force");
                }
                self.mesh.traffic = candidate;
                self.mesh.shared = None;
                self.mesh.version = object.and_then(|m| m.metadata.resource_version.clone());
                self.metrics.meshconfig_rejected.set(0);
            }
            Err(e) => {
                let instead = match &self.mesh.version {
                    Some(v) => format!("keeping the last valid MeshConfig (resourceVersion {v})"),
                    None if self.mesh.traffic == MeshTraffic::default() => {
                        "using the built-in defaults".to_string()
                    }
                    None => "keeping the last valid MeshConfig".to_string(),
                };
                error!(meshconfig = %format!("{ns}/{name}"), "MeshConfig rejected: {e}; {instead}");
                self.metrics.meshconfig_rejected.set(1);
                self.mesh.rejected = object.and_then(|m| {
                    Some(Finding {
                        regarding: Regarding::MeshConfig {
                            uid: m.metadata.uid.clone()?,
                            resource_version: m.metadata.resource_version.clone()?,
                        },
                        namespace: ns,
                        name,
                        reason: events::REASON_MESHCONFIG_INVALID,
                        note: format!(
                            "{e}; {instead} for every pod on node {}",
                            self.opts.node_name
                        ),
                    })
                });
            }
        }
    }

    /// How the pod's proxy is exempted from its own redirection: the sidecar container's cgroup
    /// (Some) where it is running, and/or a uid (see [`MeshedPod::uid_exempts`]). A pod with no
    /// possible exemption is an error rather than a record whose proxy loops back to itself:
    /// no sidecar container is known (injection key only) or the runtime's cgroup naming is
    /// unknown, and no uid applies. A sidecar that has not started yet (no containerID, or no
    /// cgroup) is not an error: the pod is registered (its app cannot escape meanwhile) and the
    /// cgroup is added by the pass that follows the status update naming the container.
    fn exemption(&self, p: &MeshedPod, pod_cgroup: &Path) -> Result<Option<PathBuf>, String> {
        let node_proxy = self.opts.proxy.mode == ProxyMode::Node;
        let by_uid = node_proxy || p.uid_exempts(self.opts.proxy.uid);
        let lookup = match &p.proxy_container_id {
            Some(id) if !pod_cgroup.as_os_str().is_empty() => {
                discover::container_cgroup(pod_cgroup, id)
            }
            _ => Ok(None),
        };
        match (lookup, &p.by) {
            (Ok(Some(c)), _) => Ok(Some(c)),
            (Ok(None), _) if by_uid => Ok(None),
            (Ok(None), MeshedBy::Sidecar(name)) => {
                debug!(pod = %format!("{}/{}", p.namespace, p.name), container = %name, "proxy container not running yet: registered, its cgroup exemption follows");
                Ok(None)
            }
            (Ok(None), MeshedBy::Injection(kv)) => Err(format!(
                "meshed by {kv} but no container is named like a sidecar (--sidecar-containers) and no proxy uid is known (runAsUser, a uid annotation or --proxy-uid), so the proxy cannot be exempted"
            )),
            (Err(_), _) if by_uid => Ok(None),
            (Err(why), _) => Err(format!(
                "{why}, and no proxy uid applies{}",
                if p.user_namespace {
                    " (hostUsers: false: uids differ on the host)"
                } else {
                    ""
                }
            )),
        }
    }

    pub fn is_synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    /// Submits a snapshot if something changed since the last one and every store is synced.
    pub fn maybe_submit(
        &mut self,
        owner: &Owner,
        cgroups: &mut CgroupWatcher,
        netns: &mut NetnsWatcher,
    ) {
        let Some(since) = self.dirty_since else {
            return;
        };
        if !self.is_synced() {
            return;
        }
        let snapshot = self.snapshot(cgroups, netns);
        let same = self.last.as_ref() == Some(&snapshot);
        if !same || self.cgroups_changed {
            owner.submit(snapshot.clone(), since);
            self.last = Some(snapshot);
        }
        self.dirty_since = None;
        self.cgroups_changed = false;
    }

    /// The whole desired state, from the stores and the cgroup map.
    pub fn snapshot(&mut self, cgroups: &mut CgroupWatcher, netns: &mut NetnsWatcher) -> Snapshot {
        self.update_mesh();
        let (traffic, dns) = (&self.mesh.traffic, &self.opts.dns);
        let mesh = self
            .mesh
            .shared
            .get_or_insert_with(|| {
                std::sync::Arc::new(MeshTraffic {
                    dns: dns.clone(),
                    ..traffic.clone()
                })
            })
            .clone();
        let namespaces: std::collections::BTreeMap<String, Annotations> = self
            .stores
            .namespaces
            .state()
            .into_iter()
            .filter_map(|ns| {
                let name = ns.metadata.name.clone()?;
                Some((name, ns.metadata.annotations.clone().unwrap_or_default()))
            })
            .collect();
        let on_node: Vec<Arc<Pod>> = self
            .stores
            .pods
            .state()
            .into_iter()
            .filter(|p| {
                // The field selector already says so; a pod that moved is not ours.
                p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                    == Some(self.opts.node_name.as_str())
            })
            .collect();
        let mut meshed: Vec<MeshedPod> = on_node
            .iter()
            .filter_map(|p| pods::meshed(p, &self.opts.sidecar_containers))
            .collect();
        // Stable order, so that equal states compare equal.
        meshed.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.metrics.pods_meshed.set(meshed.len() as i64);
        let mut found: BTreeSet<Finding> = self.mesh.rejected.iter().cloned().collect();
        let mut workloads = Vec::with_capacity(meshed.len());
        // The cgroup ids the watcher already knows (and the proxy containers', looked up now), so
        // reconcile never stats a path itself.
        let mut ids = std::collections::BTreeMap::new();
        let mut tracked = BTreeSet::new();
        // Meshed pods registered below, and the proxy uids of those whose cgroup is not there
        // yet (the startup-race guard, guard.rs).
        let mut registered = BTreeSet::new();
        let mut pending = Vec::new();
        let deleting: BTreeSet<String> = on_node
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
            .filter_map(|p| pods::identity(p).map(|(uid, _, _)| uid))
            .collect();
        for p in meshed {
            // A pod whose cgroup is not there yet gets an empty path: reconcile reports it as
            // pending, and the inotify event for its directory triggers the next pass.
            let cgroup = cgroups
                .lookup(&p.uid)
                .map(|c| {
                    ids.insert(c.path.clone(), c.ino);
                    c.path
                })
                .unwrap_or_default();
            let proxy_cgroup = match self.exemption(&p, &cgroup) {
                Ok(c) => c,
                Err(why) => {
                    found.insert(Finding {
                        regarding: Regarding::Pod,
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        reason: events::REASON_NOT_EXEMPT,
                        note: format!("pod {}/{}: {why}; not redirecting it (its proxy's own connects would loop back to itself)", p.namespace, p.name),
                    });
                    continue;
                }
            };
            if let Some(pc) = &proxy_cgroup
                && let Ok(id) = crate::cgroup::cgroup_id(pc)
            {
                ids.insert(pc.clone(), id);
            }
            // Inbound: the pod's netns, read from its own processes (the sandbox's first),
            // and its dialect's inbound port (or --inbound-port).
            let inbound_port = self
                .opts
                .inbound_port
                .or(p.inbound_port)
                .filter(|_| self.opts.inbound);
            let pod_netns = match inbound_port {
                Some(_) if !cgroup.as_os_str().is_empty() => {
                    tracked.insert(p.uid.clone());
                    let label = format!("{}/{}", p.namespace, p.name);
                    netns.track(&p.uid, &label, &cgroup).map(|n| n.path.clone())
                }
                _ => None,
            };
            let proxy_uid = p.proxy_uid.filter(|_| !p.user_namespace);
            // A pod being deleted is not started any more, so it holds no guard.
            if cgroup.as_os_str().is_empty() && !deleting.contains(&p.uid) {
                pending.push(proxy_uid.or(self.opts.proxy.uid));
            }
            registered.insert(p.uid.clone());
            workloads.push(WorkloadSpec {
                cgroup,
                namespace: p.namespace,
                name: p.name,
                proxy_cgroup,
                // In a user namespace the runAsUser is not the host uid the kernel sees.
                proxy_uid,
                netns: pod_netns,
                inbound_port,
                annotations: p.annotations,
            });
        }
        netns.retain(&tracked);
        // Every other known pod with a cgroup gets a disabled record, so that the guard never
        // catches it; the guard goes on the kubepods roots while a meshed pod is pending.
        let mut check = guard::NamespaceCheck::new(&mesh, &namespaces);
        for p in &on_node {
            let Some((uid, ns, name)) = pods::identity(p) else {
                continue;
            };
            if registered.contains(&uid) {
                continue;
            }
            if let Some(c) = cgroups.lookup(&uid) {
                ids.insert(c.path.clone(), c.ino);
                let ok = check.ok(&ns);
                workloads.push(guard::left_alone(&ns, &name, c.path, ok));
            }
        }
        let roots = cgroups.kubepods_roots();
        for g in guard::guards(&roots, &pending) {
            if let Some(r) = roots.iter().find(|r| r.path == g.cgroup) {
                ids.insert(r.path.clone(), r.ino);
            }
            workloads.push(g);
        }
        self.metrics.pods_not_exempt.set(
            found
                .iter()
                .filter(|f| f.reason == events::REASON_NOT_EXEMPT)
                .count() as i64,
        );
        self.findings.send_if_modified(|f| {
            let changed = *f != found;
            *f = found;
            changed
        });
        let mut snapshot = Snapshot {
            mesh,
            proxy: self.opts.proxy.clone(),
            namespaces,
            workloads,
            cgroups: ids,
            netns: Default::default(),
        };
        // Each pod's netns cookie, read once per namespace (cgroup/netns_ids.rs).
        snapshot.resolve_netns(netns.ids());
        snapshot
    }
}
