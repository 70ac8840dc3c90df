//! The Kubernetes source: pods on this node, namespace metadata and the FSM MeshConfig, watched
//! with kube-runtime, plus the pod cgroups seen by inotify, feeding the reconcile owner.
//! docs/kubernetes.md describes the behaviour; [`run`] wires it together.
pub mod crd;
pub mod events;
pub mod explain;
pub mod guard;
pub mod pods;
pub mod state;
pub mod watch;

use std::{path::PathBuf, sync::Arc, time::Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{reflector, watcher},
};
use tokio::{sync::mpsc, task::JoinSet};
use tracing::info;

use crate::{
    cgroup::{CgroupError, netns::NetnsWatcher, watch::CgroupWatcher},
    metrics::Metrics,
    proxy::ProxyConfig,
    reconcile::Owner,
};
use state::{Aggregator, Stores};
use watch::{Signal, Watched, follow};

pub const DEFAULT_MESH_CONFIG_NAME: &str = "fsm-mesh-config";
pub const DEFAULT_MESH_CONFIG_NAMESPACE: &str = "fsm-system";

#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// This node: only its pods are watched (field selector `spec.nodeName`).
    pub node_name: String,
    pub mesh_config_name: String,
    pub mesh_config_namespace: String,
    /// Container names that mark a pod as meshed ([`pods::DEFAULT_SIDECARS`]).
    pub sidecar_containers: Vec<String>,
    pub proxy: ProxyConfig,
    /// Where the kubepods tree is searched for and watched.
    pub cgroup_root: PathBuf,
    /// Mesh-wide DNS capture default (`--dns-capture`, `--dns-port`); annotations override it.
    pub dns: crate::policy::DnsDefault,
    /// Inbound interception (`--inbound`): each meshed pod's netns is found from its processes
    /// and gets the sk_lookup program. Off, no pod gets it and no extra privilege is needed.
    pub inbound: bool,
    /// `--inbound-port`: the proxy's inbound port for every pod; None: by the pod's dialect
    /// ([`pods::dialect_inbound_port`]), and a pod of no known dialect gets no inbound.
    pub inbound_port: Option<u16>,
}

impl KubeOptions {
    pub fn new(node_name: impl Into<String>, cgroup_root: impl Into<PathBuf>) -> Self {
        Self {
            node_name: node_name.into(),
            mesh_config_name: DEFAULT_MESH_CONFIG_NAME.into(),
            mesh_config_namespace: DEFAULT_MESH_CONFIG_NAMESPACE.into(),
            sidecar_containers: pods::DEFAULT_SIDECARS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            proxy: ProxyConfig::default(),
            cgroup_root: cgroup_root.into(),
            dns: crate::policy::DnsDefault::default(),
            inbound: true,
            inbound_port: None,
        }
    }

    /// The field selector of the pod watch.
    pub fn pod_selector(&self) -> String {
        format!("spec.nodeName={}", self.node_name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("--node-name (env NODE_NAME) is required for the kubernetes source")]
    NoNodeName,
    #[error("watching pod cgroups under {path}: {source}", path = .root.display())]
    Cgroups { root: PathBuf, source: CgroupError },
    #[error("the reconcile owner stopped")]
    OwnerStopped,
    #[error("the watch tasks stopped")]
    WatchesStopped,
}

/// Runs the source until the cgroup watch fails or the owner stops. The watch tasks are
/// aborted when this returns or is dropped.
pub async fn run(
    client: Client,
    opts: KubeOptions,
    owner: Owner,
    metrics: Arc<Metrics>,
) -> Result<(), KubeSourceError> {
    if opts.node_name.is_empty() {
        return Err(KubeSourceError::NoNodeName);
    }
    let cgroup_err = |source| KubeSourceError::Cgroups {
        root: opts.cgroup_root.clone(),
        source,
    };
    // The scan of what exists already happens here, before any snapshot.
    let mut cgroups = CgroupWatcher::new(&opts.cgroup_root).map_err(cgroup_err)?;
    let mut netns = NetnsWatcher::new().map_err(|e| {
        cgroup_err(CgroupError::Io {
            path: "inotify".into(),
            source: e,
        })
    })?;
    info!(
        node = %opts.node_name,
        cgroup_root = %opts.cgroup_root.display(),
        pod_cgroups = cgroups.pods().len(),
        "kubernetes source starting"
    );

    let (tx, mut rx) = mpsc::unbounded_channel::<Signal>();
    let mut tasks = JoinSet::new();

    let (pods, pods_w) = reflector::store::<Pod>();
    let pod_api: Api<Pod> = Api::all(client.clone());
    let pod_cfg = watcher::Config::default().fields(&opts.pod_selector());
    tasks.spawn(follow(
        Watched::Pods,
        move || watcher(pod_api.clone(), pod_cfg.clone()).boxed(),
        pods_w,
        tx.clone(),
        metrics.clone(),
        false,
    ));

    // Metadata only: `Api<PartialObjectMeta<_>>` makes metadata-only lists and watches.
    let (namespaces, ns_w) = reflector::store();
    let ns_api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
    tasks.spawn(follow(
        Watched::Namespaces,
        move || watcher(ns_api.clone(), watcher::Config::default()).boxed(),
        ns_w,
        tx.clone(),
        metrics.clone(),
        false,
    ));

    let (mesh_configs, mc_w) = reflector::store::<crd::MeshConfig>();
    let mc_api: Api<crd::MeshConfig> = Api::namespaced(client.clone(), &opts.mesh_config_namespace);
    let mc_cfg =
        watcher::Config::default().fields(&format!("metadata.name={}", opts.mesh_config_name));
    tasks.spawn(follow(
        Watched::MeshConfig,
        move || watcher(mc_api.clone(), mc_cfg.clone()).boxed(),
        mc_w,
        tx.clone(),
        metrics.clone(),
        true,
    ));
    drop(tx);

    let node = opts.node_name.clone();
    let stores = Stores {
        pods: pods.clone(),
        namespaces,
        mesh_configs,
    };
    let mut agg = Aggregator::new(opts, stores, metrics.clone());
    tasks.spawn(events::publish(
        client,
        owner.reports(),
        agg.findings(),
        pods,
        node,
        metrics,
    ));
    loop {
        tokio::select! {
            signal = rx.recv() => match signal {
                Some(s) => agg.signal(s),
                None => return Err(KubeSourceError::WatchesStopped),
            },
            changes = cgroups.next() => {
                let changes = changes.map_err(|source| KubeSourceError::Cgroups {
                    root: cgroups.root().to_path_buf(),
                    source,
                })?;
                agg.cgroup_changes(&changes, Instant::now());
            }
            pods = netns.next() => agg.netns_changes(&pods, Instant::now()),
        }
        // Take whatever else is already queued, so a burst becomes one snapshot.
        while let Ok(s) = rx.try_recv() {
            agg.signal(s);
        }
        agg.maybe_submit(&owner, &mut cgroups, &mut netns);
        if !owner.health().live() {
            return Err(KubeSourceError::OwnerStopped);
        }
    }
}
