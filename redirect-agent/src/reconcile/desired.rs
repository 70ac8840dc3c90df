//! Snapshot → per-cgroup desired records and entries, with the "last good policy" rule: a workload
//! whose policy fails validation keeps what it has, or gets the mesh default if it has nothing.
use redirect_common::{Policy, flags};

use super::{Built, Desired, Snapshot, WorkloadSpec};
use crate::{
    bpf::PolicyEntries,
    cgroup,
    policy::{self, Annotations, Compiled, EffectivePolicy, PolicyError, WorkloadInputs},
    proxy::ProxyConfig,
};

/// A workload whose new policy was rejected.
#[derive(Clone, Debug)]
pub struct WorkloadIssue {
    pub namespace: String,
    pub name: String,
    /// Names the object, key and bad value.
    pub error: String,
    /// The annotation key or MeshConfig field at fault, and its bad value (empty when the issue
    /// is not a bad value, e.g. a cgroup claimed twice).
    pub key: String,
    pub value: String,
    /// What the workload runs with instead.
    pub fallback: Fallback,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    LastGood,
    MeshDefault,
    Nothing,
}

pub fn build(snapshot: &Snapshot, is_applied: impl Fn(u64) -> bool) -> Built {
    let mut out = Built::default();
    let empty = Annotations::new();
    for w in &snapshot.workloads {
        let Ok(cgroup_id) = cgroup::cgroup_id(&w.cgroup) else {
            out.pending.push(w.id());
            continue;
        };
        let proxy_cgroup = match &w.proxy_cgroup {
            None => None,
            Some(p) => match cgroup::cgroup_id(p) {
                Ok(id) => Some(id),
                // Without its exemption the proxy's own connects would loop back to itself.
                Err(_) => {
                    out.pending.push(w.id());
                    continue;
                }
            },
        };
        if let Some(other) = out.desired.get(&cgroup_id) {
            out.issues.push(WorkloadIssue {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                error: format!(
                    "workload {}: cgroup {} is already used by {}",
                    w.id(),
                    w.cgroup.display(),
                    other.workload
                ),
                key: String::new(),
                value: String::new(),
                fallback: Fallback::Nothing,
            });
            continue;
        }
        let ns_annotations = snapshot.namespaces.get(&w.namespace).unwrap_or(&empty);
        let resolved = resolve(snapshot, w, ns_annotations, &w.annotations);
        let policy = match resolved {
            Ok(r) => {
                out.warnings.extend(r.warnings);
                r.policy
            }
            Err(e) => {
                let fallback = if is_applied(cgroup_id) {
                    out.keep.insert(cgroup_id);
                    None
                } else {
                    // Mesh default: drop the pod's annotations, then the namespace's too.
                    resolve(snapshot, w, ns_annotations, &empty)
                        .or_else(|_| resolve(snapshot, w, &empty, &empty))
                        .ok()
                        .map(|r| r.policy)
                };
                out.issues.push(WorkloadIssue {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    error: e.to_string(),
                    key: e.key.clone(),
                    value: e.value.clone(),
                    fallback: match (&fallback, out.keep.contains(&cgroup_id)) {
                        (_, true) => Fallback::LastGood,
                        (Some(_), _) => Fallback::MeshDefault,
                        (None, _) => Fallback::Nothing,
                    },
                });
                match fallback {
                    Some(p) => p,
                    None => continue,
                }
            }
        };
        out.desired.insert(
            cgroup_id,
            Desired {
                workload: w.id(),
                record: record(&snapshot.proxy, &policy, proxy_cgroup, w.proxy_uid),
                entries: entries(&policy::compile(&policy)),
            },
        );
    }
    out
}

fn resolve(
    snapshot: &Snapshot,
    w: &WorkloadSpec,
    namespace_annotations: &Annotations,
    pod_annotations: &Annotations,
) -> Result<policy::Resolved, PolicyError> {
    policy::resolve(&WorkloadInputs {
        mesh: &snapshot.mesh,
        namespace: &w.namespace,
        namespace_annotations,
        name: &w.name,
        pod_annotations,
    })
}

/// The kernel record: who the proxy is and where redirected connects go.
pub fn record(
    proxy: &ProxyConfig,
    policy: &EffectivePolicy,
    proxy_cgroup: Option<u64>,
    workload_uid: Option<u32>,
) -> Policy {
    let (v4, v6) = proxy.targets();
    let uid = policy
        .proxy_uid
        .as_ref()
        .map(|s| s.value)
        .or(workload_uid)
        .or(proxy.uid);
    let mut f = 0;
    if policy.enabled {
        f |= flags::ENABLED;
    }
    if proxy.mode == crate::proxy::ProxyMode::Node {
        f |= flags::MODE_NODE;
    }
    if uid.is_some() {
        f |= flags::HAS_PROXY_UID;
    }
    if proxy_cgroup.is_some() {
        f |= flags::HAS_PROXY_CGROUP;
    }
    let dns_port = policy.dns.record_port();
    if dns_port != 0 {
        f |= flags::DNS_CAPTURE;
    }
    Policy {
        policy_id: 0,
        flags: f,
        proxy_uid: uid.unwrap_or(0),
        proxy_port: proxy.outbound_port,
        dns_port,
        proxy_cgroup: proxy_cgroup.unwrap_or(0),
        proxy_addr4: v4.octets(),
        proxy_addr6: v6.octets(),
        ..Default::default()
    }
}

/// Compiled prefixes → trie entries (prefix bits are counted after the policy id).
pub fn entries(c: &Compiled) -> PolicyEntries {
    let mut e = PolicyEntries::default();
    for (net, action) in &c.v4 {
        e.v4.insert(
            (u32::from(net.prefix_len()), net.network().octets()),
            action.value(),
        );
    }
    for (net, action) in &c.v6 {
        e.v6.insert(
            (u32::from(net.prefix_len()), net.network().octets()),
            action.value(),
        );
    }
    for (p, action) in &c.ports {
        e.ports.insert((u32::from(p.len), p.port), action.value());
    }
    e
}
