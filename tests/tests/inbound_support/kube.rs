//! What the Kubernetes inbound tests (kube_inbound.rs, inbound_escapes_kube.rs) share: the pod as
//! the API has it once its sidecar runs, the pin of a netns's sk_lookup link, and a sandbox-like
//! process in a cgroup and netns.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use serde_json::{Value, json};

/// The pod with its containers running: the sidecar's containerID (`proxy`, containerd's
/// naming) names its cgroup.
pub fn running(mut p: Value, proxy: &str) -> Value {
    p["status"]["containerStatuses"] = json!([
        {"name": "istio-proxy", "ready": true, "restartCount": 0,
         "image": "docker.io/istio/proxyv2:1.22.0", "imageID": "",
         "containerID": format!("containerd://{proxy}"),
         "started": true, "state": {"running": {"startedAt": "2025-01-01T00:00:01Z"}}}
    ]);
    p
}

/// The pin of the sk_lookup link the agent made for `netns` (named by its inode).
pub fn link_pin(pins: &Path, netns: &Path) -> PathBuf {
    let ino = std::fs::metadata(netns).unwrap().ino();
    pins.join(format!("link_sk_lookup_{ino}"))
}

/// A long sleep in cgroup `cg` and `netns`: a sandbox's pause process, or an app's.
pub fn sleeper(cg: &Path, netns: &std::fs::File) -> Child {
    let mut cmd = Command::new("sleep");
    cmd.arg("600").stdin(Stdio::null());
    super::spawn_in_netns(cg, netns, &mut cmd)
}
