//! Which pods are in the mesh, and what the agent needs to know about each (docs/kubernetes.md
//! has the rule in prose). Pure functions over `k8s_openapi` types.
use k8s_openapi::api::core::v1::{Container, Pod};

use crate::policy::{
    Annotations,
    inbound::{LINKERD_INBOUND_PORT, OSM_INBOUND_PORT},
};

/// Sidecar container names recognised by default: Istio, FSM, Linkerd, Kuma.
pub const DEFAULT_SIDECARS: [&str; 4] = ["istio-proxy", "sidecar", "linkerd-proxy", "kuma-sidecar"];

/// Injection keys (annotation or label) and the values that mean "in" and "out" for each mesh.
const INJECTION: [(&str, &[&str], &[&str]); 5] = [
    ("sidecar.istio.io/inject", &["true"], &["false"]),
    (
        "flomesh.io/sidecar-injection",
        &["enabled", "true"],
        &["disabled", "false"],
    ),
    (
        "openservicemesh.io/sidecar-injection",
        &["enabled", "true"],
        &["disabled", "false"],
    ),
    ("linkerd.io/inject", &["enabled", "ingress"], &["disabled"]),
    (
        "kuma.io/sidecar-injection",
        &["enabled", "true"],
        &["disabled", "false"],
    ),
];

/// On a mirror pod (the API's copy of a static pod): the static pod's config hash, which is the UID
/// the kubelet runs it under, and so the name of its cgroup.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Why a pod is in the mesh (for logs and `explain`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshedBy {
    /// A container or native-sidecar init container with this name.
    Sidecar(String),
    /// An injection annotation or label: key=value.
    Injection(String),
}

/// A pod in the mesh, reduced to what the reconcile needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshedPod {
    /// The UID the kubelet names the pod's cgroup after: the API UID, or for a static pod's mirror
    /// the config hash (annotation `kubernetes.io/config.mirror`), which is the UID the kubelet
    /// runs the static pod under.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub annotations: Annotations,
    /// The sidecar's runAsUser (container, else pod security context): its connects bypass.
    pub proxy_uid: Option<u32>,
    /// The sidecar container's `containerID` (`containerd://…`, `cri-o://…`) from the pod status,
    /// once the runtime has created it: where its cgroup is found.
    pub proxy_container_id: Option<String>,
    /// `hostUsers: false`: the pod runs in a user namespace, so its uids differ on the host and
    /// only the proxy's cgroup can exempt it.
    pub user_namespace: bool,
    pub by: MeshedBy,
    /// The proxy's inbound listener port by the pod's dialect ([`dialect_inbound_port`]); None
    /// (a sidecar name of no known mesh) means no inbound interception unless `--inbound-port`
    /// names one.
    pub inbound_port: Option<u16>,
}

impl MeshedPod {
    /// Whether a uid can exempt the proxy: a uid of its own (runAsUser, or a Linkerd/Kuma uid
    /// annotation) or the agent's `--proxy-uid`, and no user namespace.
    pub fn uid_exempts(&self, agent_uid: Option<u32>) -> bool {
        use crate::policy::keys::{kuma, linkerd};
        let annotated = [linkerd::PROXY_UID, kuma::SIDECAR_UID]
            .iter()
            .any(|k| self.annotations.contains_key(*k));
        !self.user_namespace && (self.proxy_uid.is_some() || annotated || agent_uid.is_some())
    }
}

/// The UID the kubelet names the pod's cgroup after (a mirror pod's config hash, else its
/// UID), its namespace and its name.
pub fn identity(pod: &Pod) -> Option<(String, String, String)> {
    let meta = &pod.metadata;
    let uid = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(MIRROR_ANNOTATION))
        .filter(|h| !h.is_empty())
        .or(meta.uid.as_ref())?
        .clone();
    Some((uid, meta.namespace.clone()?, meta.name.clone()?))
}

/// The rule, first match wins:
/// 1. hostNetwork pods are never touched (their connects are the node's);
/// 2. finished pods (Succeeded, Failed) have no processes left;
/// 3. an injection key set to its "out" value (e.g. `sidecar.istio.io/inject: "false"`) keeps the
///    pod out;
/// 4. a container, or an init container (native sidecars), named like a known sidecar brings it in;
/// 5. an injection key set to its "in" value brings it in;
/// 6. otherwise the pod is not in the mesh.
pub fn meshed(pod: &Pod, sidecars: &[String]) -> Option<MeshedPod> {
    let (uid, namespace, name) = identity(pod)?;
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let injection = injection(pod);
    let by_key = injection
        .as_ref()
        .and_then(|(kv, _)| dialect_inbound_port(kv));
    if let Some((_, false)) = injection {
        return None;
    }
    let sidecar = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| sidecars.contains(&c.name));
    let (by, proxy_uid) = match (sidecar, injection) {
        (Some(c), _) => (MeshedBy::Sidecar(c.name.clone()), run_as_user(pod, c)),
        (None, Some((kv, true))) => (MeshedBy::Injection(kv), None),
        _ => return None,
    };
    let proxy_container_id = sidecar.and_then(|c| container_id(pod, &c.name));
    let inbound_port = match &by {
        MeshedBy::Sidecar(name) => dialect_inbound_port(name).or(by_key),
        MeshedBy::Injection(_) => by_key,
    };
    Some(MeshedPod {
        inbound_port,
        uid,
        namespace,
        name,
        annotations: pod.metadata.annotations.clone().unwrap_or_default(),
        proxy_uid,
        proxy_container_id,
        user_namespace: spec.host_users == Some(false),
        by,
    })
}

/// Each mesh's inbound listener port, by its sidecar container name or injection key: Istio
/// 15006 (istio-iptables `-z`), OSM/FSM 15003 (their init container's `PROXY_INBOUND_PORT`),
/// Linkerd 4143 (proxy-init `--incoming-proxy-port`), Kuma 15006 (kuma-init's default).
pub const DIALECT_INBOUND_PORTS: [(&str, u16); 8] = [
    ("istio-proxy", 15006),
    ("sidecar.istio.io/", 15006),
    ("sidecar", OSM_INBOUND_PORT),
    ("flomesh.io/", OSM_INBOUND_PORT),
    ("openservicemesh.io/", OSM_INBOUND_PORT),
    ("linkerd-proxy", LINKERD_INBOUND_PORT),
    ("linkerd.io/", LINKERD_INBOUND_PORT),
    ("kuma", 15006),
];

/// The inbound port of the dialect a sidecar container name (exact) or an injection
/// `key=value` (by its key's prefix) belongs to.
pub fn dialect_inbound_port(name_or_key: &str) -> Option<u16> {
    DIALECT_INBOUND_PORTS
        .iter()
        .find(|(n, _)| {
            if n.ends_with('/') {
                name_or_key.starts_with(n)
            } else if *n == "kuma" {
                name_or_key == "kuma-sidecar" || name_or_key.starts_with("kuma.io/")
            } else {
                name_or_key == *n
            }
        })
        .map(|(_, p)| *p)
}

/// The `containerID` of the container `name` (regular or init) in the pod status.
fn container_id(pod: &Pod, name: &str) -> Option<String> {
    let status = pod.status.as_ref()?;
    status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|s| s.name == name)
        .and_then(|s| s.container_id.clone())
        .filter(|id| !id.is_empty())
}

/// The first injection key found (annotations before labels): ("key=value", in?). Values that
/// are neither in nor out are ignored.
fn injection(pod: &Pod) -> Option<(String, bool)> {
    let maps = [&pod.metadata.annotations, &pod.metadata.labels];
    for (key, on, off) in INJECTION {
        for map in maps.iter().copied().flatten() {
            let Some(value) = map.get(key) else { continue };
            let v = value.trim().to_ascii_lowercase();
            if on.contains(&v.as_str()) {
                return Some((format!("{key}={value}"), true));
            }
            if off.contains(&v.as_str()) {
                return Some((format!("{key}={value}"), false));
            }
        }
    }
    None
}

fn run_as_user(pod: &Pod, c: &Container) -> Option<u32> {
    let container = c.security_context.as_ref().and_then(|s| s.run_as_user);
    let pod_level = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.run_as_user);
    container.or(pod_level).and_then(|u| u32::try_from(u).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecars() -> Vec<String> {
        DEFAULT_SIDECARS.iter().map(|s| s.to_string()).collect()
    }

    /// An Istio-injected pod as the API server returns it (abridged).
    fn istio_pod() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "app-7d9c", "namespace": "demo", "uid": "0f9d5b8e-6c1a-4d2b-9e3f-7a8b9c0d1e2f",
                "resourceVersion": "5001",
                "annotations": {"traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
                                "sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"},
                "labels": {"app": "app", "security.istio.io/tlsMode": "istio"}
            },
            "spec": {
                "nodeName": "node-1",
                "containers": [
                    {"name": "app", "image": "app:1"},
                    {"name": "istio-proxy", "image": "proxyv2:1.22",
                     "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}
                ],
                "initContainers": [{"name": "istio-init", "image": "proxyv2:1.22"}]
            },
            "status": {"phase": "Running", "podIP": "10.244.1.7"}
        })
    }

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn sidecar_container_brings_a_pod_in_with_its_uid() {
        let m = meshed(&pod(istio_pod()), &sidecars()).unwrap();
        assert_eq!(m.by, MeshedBy::Sidecar("istio-proxy".into()));
        assert_eq!(m.proxy_uid, Some(1337));
        assert_eq!(m.namespace, "demo");
        assert_eq!(
            m.annotations["traffic.sidecar.istio.io/excludeOutboundPorts"],
            "5432"
        );
    }

    #[test]
    fn native_sidecar_in_init_containers_counts() {
        let mut v = istio_pod();
        let proxy = v["spec"]["containers"][1].take();
        v["spec"]["containers"] = serde_json::json!([{"name": "app"}]);
        let mut proxy = proxy;
        proxy["name"] = "linkerd-proxy".into();
        proxy["restartPolicy"] = "Always".into();
        proxy["securityContext"] = serde_json::json!({});
        v["spec"]["initContainers"] = serde_json::json!([proxy]);
        v["spec"]["securityContext"] = serde_json::json!({"runAsUser": 2102});
        let m = meshed(&pod(v), &sidecars()).unwrap();
        assert_eq!(m.by, MeshedBy::Sidecar("linkerd-proxy".into()));
        assert_eq!(
            m.proxy_uid,
            Some(2102),
            "pod-level runAsUser is the fallback"
        );
    }

    #[test]
    fn host_network_and_finished_pods_are_never_touched() {
        let mut v = istio_pod();
        v["spec"]["hostNetwork"] = true.into();
        assert_eq!(meshed(&pod(v), &sidecars()), None);
        let mut v = istio_pod();
        v["status"]["phase"] = "Succeeded".into();
        assert_eq!(meshed(&pod(v), &sidecars()), None);
    }

    #[test]
    fn injection_keys_opt_in_and_out() {
        let mut v = istio_pod();
        v["spec"]["containers"] = serde_json::json!([{"name": "app"}]);
        assert_eq!(meshed(&pod(v.clone()), &sidecars()), None);
        v["metadata"]["labels"]["sidecar.istio.io/inject"] = "true".into();
        let m = meshed(&pod(v.clone()), &sidecars()).unwrap();
        assert_eq!(
            m.by,
            MeshedBy::Injection("sidecar.istio.io/inject=true".into())
        );
        assert_eq!(m.proxy_uid, None);
        // An explicit "out" wins even over a container that happens to be called "sidecar".
        let mut v = istio_pod();
        v["spec"]["containers"][1]["name"] = "sidecar".into();
        v["metadata"]["annotations"]["flomesh.io/sidecar-injection"] = "disabled".into();
        assert_eq!(meshed(&pod(v), &sidecars()), None);
    }

    #[test]
    fn the_sidecar_list_is_configurable() {
        let only = vec!["envoy".to_string()];
        assert_eq!(meshed(&pod(istio_pod()), &only), None);
    }

    #[test]
    fn each_dialect_has_its_inbound_port() {
        let port = |name: &str| {
            let mut v = istio_pod();
            v["spec"]["containers"][1]["name"] = name.into();
            meshed(&pod(v), &[name.to_string()]).unwrap().inbound_port
        };
        assert_eq!(port("istio-proxy"), Some(15006));
        assert_eq!(port("sidecar"), Some(15003));
        assert_eq!(port("linkerd-proxy"), Some(4143));
        assert_eq!(port("kuma-sidecar"), Some(15006));
        assert_eq!(port("envoy"), None);
        // An injection key names the dialect of a pod meshed by it alone.
        let mut v = istio_pod();
        v["spec"]["containers"] = serde_json::json!([{"name": "app"}]);
        v["metadata"]["annotations"]["linkerd.io/inject"] = "enabled".into();
        assert_eq!(
            meshed(&pod(v), &sidecars()).unwrap().inbound_port,
            Some(4143)
        );
    }
}
