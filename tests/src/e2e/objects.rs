//! The Kubernetes objects of a scenario, built once for both runners: `e2e-kind` applies them to
//! the cluster, `e2e-local` serves them from its stand-in API server (adding what the API server
//! and the scheduler would: uid, nodeName, status).
use serde_json::{Value, json};

use super::scenario::{AnnotationPatch, Scenario};

/// The client pod: named after the FSM demo's curl client.
pub const CLIENT_POD: &str = "curl";
/// The application container, which runs the client.
pub const APP_CONTAINER: &str = "curl";
/// The stand-in sidecar. Its name is one the agent recognises (Istio's), which is what puts the
/// pod in the mesh.
pub const PROXY_CONTAINER: &str = "istio-proxy";
/// The sidecar's uid (runAsUser): its own connects bypass, as istio-proxy's 1337 does.
pub const PROXY_UID: u32 = 1337;
pub const PROXY_PORT: u16 = 15001;
/// The sidecar's inbound listener (Istio's inbound port).
pub const INBOUND_PORT: u16 = 15006;
/// Every destination server listens on all of these.
pub const SERVER_PORTS: [u16; 5] = [80, 5432, 7001, 7002, 7005];

pub const MESH_CONFIG_NAME: &str = "fsm-mesh-config";
pub const MESH_CONFIG_NAMESPACE: &str = "fsm-system";

/// The label that marks everything the e2e creates (for cleanup).
pub const E2E_LABEL: &str = "redirect.flomesh.io/e2e";

pub fn namespace(name: &str, annotations: &std::collections::BTreeMap<String, String>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {E2E_LABEL: "true"}, "annotations": annotations},
    })
}

/// The client pod: an app container (the runner execs the client in it) that answers inbound
/// connections on every [`SERVER_PORTS`] port (redirect-testproxy in tag mode), and the stand-in
/// proxy sidecar, redirect-testproxy in forward mode on the outbound and inbound ports: it reads
/// SO_ORIGINAL_DST, forwards there, and logs `orig=<dst> peer=<client>` for every connection it
/// gets. (e2e-local runs its own processes and uses only the metadata and the proxy's uid.)
pub fn client_pod(s: &Scenario, image: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": CLIENT_POD,
            "namespace": s.namespace.name,
            "labels": {"app": CLIENT_POD, E2E_LABEL: "true"},
            "annotations": s.pod.annotations,
        },
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": APP_CONTAINER,
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": app_command(),
                },
                {
                    "name": PROXY_CONTAINER,
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["redirect-testproxy", "--mode", "forward",
                                "--listen", format!("127.0.0.1:{PROXY_PORT}"),
                                "--listen", format!("0.0.0.0:{INBOUND_PORT}")],
                    "securityContext": {"runAsUser": PROXY_UID, "runAsNonRoot": true},
                },
            ],
        },
    })
}

/// The app container's listeners: the inbound steps' app.
fn app_command() -> Vec<String> {
    let mut cmd = vec![
        "redirect-testproxy".to_string(),
        "--mode".into(),
        "tag".into(),
    ];
    for port in SERVER_PORTS {
        cmd.extend(["--listen".to_string(), format!("0.0.0.0:{port}")]);
    }
    cmd
}

pub fn mesh_config(traffic: &Value) -> Value {
    json!({
        "apiVersion": "config.flomesh.io/v1alpha3",
        "kind": "MeshConfig",
        "metadata": {"name": MESH_CONFIG_NAME, "namespace": MESH_CONFIG_NAMESPACE,
                     "labels": {E2E_LABEL: "true"}},
        "spec": {"traffic": traffic},
    })
}

/// The last line of [`loop_script`]'s output.
pub const LOOP_DONE: &str = "loop-done";

/// A shell loop of client connects (one JSON line each) that runs until `stop_file` exists: the
/// client loop of the rollout scenario, run in the app container by both runners.
pub fn loop_script(client: &str, to: std::net::SocketAddr, stop_file: &str) -> String {
    format!(
        "while [ ! -e {stop_file} ]; do {client} connect {to} --json --timeout-ms 3000; done; echo {LOOP_DONE}"
    )
}

/// Applies an annotation patch to an object's metadata.annotations.
pub fn patch_annotations(obj: &mut Value, patch: &AnnotationPatch) {
    let meta = &mut obj["metadata"];
    if !meta["annotations"].is_object() {
        meta["annotations"] = json!({});
    }
    let ann = meta["annotations"]
        .as_object_mut()
        .expect("made an object above");
    for (k, v) in patch {
        match v {
            Some(v) => {
                ann.insert(k.clone(), Value::String(v.clone()));
            }
            None => {
                ann.remove(k);
            }
        }
    }
}

/// The JSON merge patch (`kubectl patch --type merge`) of an annotation patch.
pub fn annotation_merge_patch(patch: &AnnotationPatch) -> Value {
    json!({"metadata": {"annotations": patch}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_patches_set_and_remove() {
        let mut ns = namespace("n", &[("a".into(), "1".into())].into_iter().collect());
        let patch: AnnotationPatch = [("a".to_string(), None), ("b".to_string(), Some("2".into()))]
            .into_iter()
            .collect();
        patch_annotations(&mut ns, &patch);
        assert_eq!(ns["metadata"]["annotations"], json!({"b": "2"}));
        assert_eq!(
            annotation_merge_patch(&patch),
            json!({"metadata": {"annotations": {"a": null, "b": "2"}}})
        );
    }
}
