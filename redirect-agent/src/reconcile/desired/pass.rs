//! One pass of [`build`]: the snapshot's workloads, in order, each either reused from its last
//! result (slots.rs: nothing it depends on changed) or resolved through the memo.
use std::collections::HashMap;

use redirect_common::flags;

use super::{Entry, Fallback, Memo, RecordInputs, Resolution, SharedKey, WorkloadIssue, record};
use crate::{
    policy::{Annotations, EffectivePolicy, PolicyError},
    reconcile::{Built, Candidate, Desired, Snapshot, slots::Slot},
};

/// A namespace's mesh default (and whether it was resolved with the namespace's annotations, not
/// as the fallback without them), the resolution of its pods without annotations of their own,
/// and the memo keys of both.
type NamespaceDefault = (Option<(bool, Resolution)>, Entry, Vec<SharedKey>);

pub fn build(snapshot: &Snapshot, memo: &mut Memo, is_applied: impl Fn(u64) -> bool) -> Built {
    let mut out = Built::default();
    let empty = Annotations::new();
    memo.begin(snapshot);
    let mut defaults: HashMap<&str, NamespaceDefault> = HashMap::new();
    for w in &snapshot.workloads {
        let Some(&cgroup_id) = snapshot.cgroups.get(&w.cgroup) else {
            out.pending.push(w.id());
            continue;
        };
        let proxy_cgroup = match &w.proxy_cgroup {
            None => None,
            Some(p) => match snapshot.cgroups.get(p) {
                Some(&id) => Some(id),
                // Without its exemption the proxy's own connects would loop back to itself, so
                // nothing new is installed; what is applied stays (not removed).
                None => {
                    if is_applied(cgroup_id) {
                        out.keep.insert(cgroup_id);
                    }
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
                cgroup_id: None,
            });
            continue;
        }
        if let Some(slot) = memo.slots.reuse(w, cgroup_id, proxy_cgroup) {
            out.desired.insert(cgroup_id, slot.desired.clone());
            out.issues.extend(slot.issues.iter().cloned());
            out.warnings.extend(slot.warnings.iter().cloned());
            continue;
        }
        memo.recomputed += 1;
        let ns_annotations = snapshot.namespaces.get(&w.namespace).unwrap_or(&empty);
        let candidate = |r: &Resolution| Candidate {
            record: record(&snapshot.proxy, &r.inputs, proxy_cgroup, w.proxy_uid),
            rules: r.rules.clone(),
            base: r.base.clone(),
        };
        let issue = |e: &PolicyError, fallback, cgroup_id| WorkloadIssue {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            error: e.to_string(),
            key: e.key.clone(),
            value: e.value.clone(),
            fallback,
            cgroup_id,
        };
        // Mesh default: drop the pod's annotations, then the namespace's too. Resolved first:
        // it is the base the workload's own table may overlay.
        // Once per namespace and pass: a pod without annotations of its own resolves as its
        // mesh default, so most workloads cost no memo lookup at all.
        let (mesh_default, bare, mut keys) = defaults
            .entry(w.namespace.as_str())
            .or_insert_with(|| {
                let (bare_key, bare) = memo.resolve(w, ns_annotations, &empty, None, false);
                let mut keys = vec![bare_key];
                let mesh_default = match &bare.resolved {
                    Ok(r) => Some((true, r.clone())),
                    Err(_) => {
                        let (key, e) = memo.resolve(w, &empty, &empty, None, false);
                        keys.push(key);
                        e.resolved.ok().map(|r| (false, r))
                    }
                };
                (mesh_default, bare, keys)
            })
            .clone();
        let (same_namespace, mesh_default) = mesh_default.unzip();
        let own = if w.annotations.is_empty() {
            bare
        } else {
            let (key, e) = memo.resolve(
                w,
                ns_annotations,
                &w.annotations,
                mesh_default.as_ref(),
                same_namespace == Some(true),
            );
            keys.push(key);
            e
        };
        let (mut issues, mut warnings) = (Vec::new(), Vec::new());
        let own = match own.resolved {
            Ok(r) => {
                warnings.extend(r.warnings.iter().cloned());
                if let Some(e) = &r.inbound_error {
                    // Not the outbound fallback's: the outbound policy itself is applied.
                    issues.push(issue(e, Fallback::InboundLastGood, None));
                }
                Some(candidate(&r))
            }
            Err(e) => {
                issues.push(issue(&e, Fallback::Nothing, Some(cgroup_id)));
                None
            }
        };
        let mesh_default = mesh_default.as_ref().map(candidate);
        let mut redirect_all = record(
            &snapshot.proxy,
            &RecordInputs::of(&EffectivePolicy::default()),
            proxy_cgroup,
            w.proxy_uid,
        );
        redirect_all.flags |= flags::ENABLED;
        let desired = Desired {
            workload: w.id(),
            own,
            mesh_default,
            redirect_all,
        };
        out.desired.insert(cgroup_id, desired.clone());
        out.issues.extend(issues.iter().cloned());
        out.warnings.extend(warnings.iter().cloned());
        // The new result holds its entries before the old one lets go of its own: an entry
        // both use is never dropped in between.
        memo.hold(&keys);
        let mut slot = Slot::new(w, cgroup_id, proxy_cgroup, desired, keys);
        (slot.issues, slot.warnings) = (issues, warnings);
        let old = memo.slots.store(slot);
        memo.release(old);
    }
    memo.end();
    out
}
