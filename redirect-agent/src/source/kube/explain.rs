//! `explain --pod NAMESPACE/NAME`: the pod, its namespace's annotations and the MeshConfig, read
//! from the API, and its cgroup found on this node, as the one-workload config that `explain`
//! evaluates (and checks against the pinned maps).
use std::{collections::BTreeMap, path::Path};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{Api, Client};

use super::{KubeOptions, crd::MeshConfig, pods};
use crate::{
    cgroup::discover,
    source::file::{FileConfig, NamespaceConfig, WorkloadConfig},
};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    // The kube error is in the message rather than the source chain, so that it shows once.
    #[error("reading {what} from the API: {error}")]
    Api {
        what: String,
        error: Box<kube::Error>,
    },
    #[error(
        "pod {0} is not in the mesh: it runs no sidecar named {1:?} and sets no injection annotation or label (or it uses hostNetwork, or has finished)"
    )]
    NotMeshed(String, Vec<String>),
    #[error("--pod {0:?}: expected NAMESPACE/NAME")]
    BadName(String),
    #[error("connecting to the Kubernetes API (in-cluster config or kubeconfig): {0}")]
    Client(Box<kube::Error>),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

/// [`pod_config`] for the CLI: `pod` is `NAMESPACE/NAME`; the client comes from the
/// environment; the cgroup is searched under `cgroup_root` (default: the cgroup2 mount).
pub fn pod_config_from_env(
    pod: &str,
    cgroup_root: Option<&Path>,
) -> Result<FileConfig, ExplainError> {
    let (namespace, name) = pod
        .split_once('/')
        .ok_or_else(|| ExplainError::BadName(pod.to_string()))?;
    let root = match cgroup_root {
        Some(r) => r.to_path_buf(),
        None => crate::cgroup::cgroup2_mount()?,
    };
    let opts = KubeOptions::new(String::new(), root);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ExplainError::Runtime)?
        .block_on(async {
            let client = Client::try_default()
                .await
                .map_err(|e| ExplainError::Client(Box::new(e)))?;
            pod_config(client, namespace, name, &opts).await
        })
}

fn api_err(what: String) -> impl FnOnce(kube::Error) -> ExplainError {
    move |error| ExplainError::Api {
        what,
        error: Box::new(error),
    }
}

/// The pod as a [`FileConfig`] with one workload. Its cgroup is the pod's directory under
/// `opts.cgroup_root`, or, if the pod has none on this node, a path that names the problem (the
/// policy can still be explained; the kernel check then fails on it).
pub async fn pod_config(
    client: Client,
    namespace: &str,
    name: &str,
    opts: &KubeOptions,
) -> Result<FileConfig, ExplainError> {
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(api_err(format!("pod {namespace}/{name}")))?;
    let meshed = pods::meshed(&pod, &opts.sidecar_containers).ok_or_else(|| {
        ExplainError::NotMeshed(
            format!("{namespace}/{name}"),
            opts.sidecar_containers.clone(),
        )
    })?;
    let ns = Api::<Namespace>::all(client.clone())
        .get_metadata(namespace)
        .await
        .map_err(api_err(format!("namespace {namespace}")))?;
    let mesh_api: Api<MeshConfig> = Api::namespaced(client, &opts.mesh_config_namespace);
    let mesh = match mesh_api.get_opt(&opts.mesh_config_name).await {
        Ok(m) => m.map(|m| m.spec.traffic).unwrap_or_default(),
        // No MeshConfig CRD: mesh defaults, as the agent does.
        Err(kube::Error::Api(s)) if s.code == 404 => Default::default(),
        Err(e) => {
            return Err(api_err(format!(
                "MeshConfig {}/{}",
                opts.mesh_config_namespace, opts.mesh_config_name
            ))(e));
        }
    };
    let cgroup = discover::scan(&opts.cgroup_root)
        .pods
        .remove(&meshed.uid)
        .map(|c| c.path)
        .unwrap_or_else(|| {
            format!(
                "(pod {namespace}/{name} uid {} has no cgroup under {})",
                meshed.uid,
                opts.cgroup_root.display()
            )
            .into()
        });
    let mut proxy = opts.proxy.clone();
    proxy.uid = meshed.proxy_uid.or(proxy.uid);
    Ok(FileConfig {
        mesh,
        proxy,
        namespaces: BTreeMap::from([(
            namespace.to_string(),
            NamespaceConfig {
                annotations: ns.metadata.annotations.unwrap_or_default(),
            },
        )]),
        workloads: vec![WorkloadConfig {
            name: name.to_string(),
            namespace: namespace.to_string(),
            cgroup,
            proxy_cgroup: None,
            netns: None,
            annotations: meshed.annotations,
        }],
    })
}
