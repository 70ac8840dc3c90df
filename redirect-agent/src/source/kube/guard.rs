//! Closing the startup race (docs/kubernetes.md, "The startup race"). A meshed pod known from
//! the API whose cgroup is not there yet is registered by the pass that follows its directory's
//! inotify event, and a process that starts and connects within that pass would escape. So while
//! such a pod is pending, the top kubepods directories carry a record of their own (the mesh
//! default policy, under the pending pods' proxy uid): the datapath's nearest registered
//! ancestor is then the kubepods root until the pod's own record is in, and its first connects
//! go to the proxy. So that the guard never catches a pod that is to be left alone, every other
//! known pod with a cgroup (not meshed, hostNetwork, or meshed but its proxy cannot be exempted)
//! is registered with a disabled record (`sidecar.istio.io/interceptionMode: NONE`, which also
//! turns DNS capture off), always, not only while the guard is up: reconcile writes disabled
//! records before enabled ones (`reconcile::pending`), so a pod and the guard arriving in one
//! pass keep that order too.
use std::{collections::BTreeMap, path::PathBuf};

use crate::{
    cgroup::discover::PodCgroup,
    policy::{Annotations, MeshTraffic, WorkloadInputs},
    reconcile::WorkloadSpec,
};

/// The namespace in the names of the guard records (not a valid Kubernetes namespace name, so
/// it can never be a real one, nor pick up a real namespace's annotations).
pub const GUARD_NAMESPACE: &str = "(pending pods)";

/// The annotation that makes a record disabled.
const OFF_KEY: &str = "sidecar.istio.io/interceptionMode";
const OFF_VALUE: &str = "NONE";

fn off() -> Annotations {
    [(OFF_KEY.to_string(), OFF_VALUE.to_string())].into()
}

/// The disabled record's spec for a known pod that gets no record of its own. `ns_ok`: the
/// namespace's annotations resolve (see [`NamespaceCheck`]); otherwise the spec is given a
/// namespace name that cannot exist (`<ns>.not-meshed`), so that a bad namespace annotation can
/// never turn the record into a fallback that redirects.
pub fn left_alone(namespace: &str, name: &str, cgroup: PathBuf, ns_ok: bool) -> WorkloadSpec {
    WorkloadSpec {
        namespace: if ns_ok {
            namespace.to_string()
        } else {
            format!("{namespace}.not-meshed")
        },
        name: name.to_string(),
        cgroup,
        proxy_cgroup: None,
        proxy_uid: None,
        netns: None,
        inbound_port: None,
        annotations: off(),
    }
}

/// The guard records: one per top kubepods directory while `pending` (the proxy uids of the
/// meshed pods whose cgroup is not there yet) is not empty. The uid is theirs if they agree,
/// else none (then `--proxy-uid`): until its cgroup is registered a pending pod has no running
/// proxy anyway, so the uid only matters for a proxy that starts inside that pass.
pub fn guards(roots: &[PodCgroup], pending: &[Option<u32>]) -> Vec<WorkloadSpec> {
    if pending.is_empty() {
        return Vec::new();
    }
    let uid = pending[0].filter(|u| pending.iter().all(|p| *p == Some(*u)));
    roots
        .iter()
        .map(|r| WorkloadSpec {
            namespace: GUARD_NAMESPACE.to_string(),
            name: r.path.display().to_string(),
            cgroup: r.path.clone(),
            proxy_cgroup: None,
            proxy_uid: uid,
            netns: None,
            inbound_port: None,
            annotations: Annotations::new(),
        })
        .collect()
}

/// Whether a namespace's annotations resolve under the mesh in force, with the disabling pod
/// annotation: checked once per namespace and snapshot.
pub struct NamespaceCheck<'a> {
    mesh: &'a MeshTraffic,
    namespaces: &'a BTreeMap<String, Annotations>,
    seen: BTreeMap<String, bool>,
}

impl<'a> NamespaceCheck<'a> {
    pub fn new(mesh: &'a MeshTraffic, namespaces: &'a BTreeMap<String, Annotations>) -> Self {
        Self {
            mesh,
            namespaces,
            seen: BTreeMap::new(),
        }
    }

    pub fn ok(&mut self, namespace: &str) -> bool {
        if let Some(ok) = self.seen.get(namespace) {
            return *ok;
        }
        let empty = Annotations::new();
        let ok = crate::policy::resolve(&WorkloadInputs {
            mesh: self.mesh,
            namespace,
            namespace_annotations: self.namespaces.get(namespace).unwrap_or(&empty),
            name: "",
            pod_annotations: &off(),
        })
        .is_ok_and(|r| !r.policy.enabled);
        self.seen.insert(namespace.to_string(), ok);
        ok
    }
}

/// Before the agent talks to the API: removes any enabled record on the agent's own cgroup or
/// its ancestors. A guard left pinned by an earlier run (it stopped while a pod was pending)
/// would otherwise catch a new agent pod too, refuse its connects to the API server, and so
/// never be lifted. The pending pods it guarded are registered by the first pass as usual.
/// Returns the cgroup ids freed.
pub fn free_own_cgroup(maps: &mut crate::bpf::PinnedMaps, mount: &std::path::Path) -> Vec<u64> {
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    let Some(rel) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Vec::new();
    };
    let mut freed = Vec::new();
    let mut dir = mount.join(rel.trim_start_matches('/'));
    while dir.starts_with(mount) && dir != mount {
        if let Some(id) = crate::cgroup::discover::inode(&dir)
            && maps
                .policy(id)
                .is_some_and(|p| p.flags & redirect_common::flags::ENABLED != 0)
        {
            tracing::warn!(cgroup = %dir.display(), "removing an enabled record above the agent's own cgroup (a startup-race guard left by an earlier run)");
            maps.remove_policy(id);
            freed.push(id);
        }
        if !dir.pop() {
            break;
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_alone_records_resolve_disabled_and_guards_need_pending_pods() {
        let mesh = MeshTraffic::default();
        let bad: BTreeMap<String, Annotations> = [(
            "bad".to_string(),
            [(
                "traffic.sidecar.istio.io/excludeOutboundIPRanges".to_string(),
                "10.0.0.0/33".to_string(),
            )]
            .into(),
        )]
        .into();
        let mut check = NamespaceCheck::new(&mesh, &bad);
        assert!(check.ok("demo"));
        assert!(!check.ok("bad"));
        let s = left_alone("bad", "p", PathBuf::from("/x"), false);
        assert_eq!(s.namespace, "bad.not-meshed");
        let root = PodCgroup {
            path: PathBuf::from("/sys/fs/cgroup/kubepods.slice"),
            ino: 7,
        };
        assert!(guards(std::slice::from_ref(&root), &[]).is_empty());
        let g = guards(std::slice::from_ref(&root), &[Some(1337), Some(1337)]);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].proxy_uid, Some(1337));
        let g = guards(std::slice::from_ref(&root), &[Some(1337), None]);
        assert_eq!(g[0].proxy_uid, None);
    }
}
