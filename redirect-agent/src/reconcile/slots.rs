//! The dirty set: what each workload's last pass produced, kept by `namespace/name` with the
//! inputs it was produced from. A pass recomputes a workload only when something it depends on
//! changed: its spec (annotations, cgroup and proxy paths, proxy uid), the cgroup ids the
//! source found for those paths, its namespace's annotations, or, for every workload at once,
//! the mesh config or the proxy config. Every other workload costs one comparison and reuses
//! its last result, so a one-workload edit at 1,000 workloads resolves and compiles one policy.
//!
//! What a reused workload contributes is exactly what it contributed last time (the same
//! desired record, issues and warnings), so the applier sees the same desired state as a full
//! recompute would give; the applier still runs every pass, so a fallback is retried each pass
//! exactly as before.
use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Desired, Snapshot, WorkloadIssue, WorkloadSpec, desired::SharedKey};
use crate::{policy::Annotations, proxy::ProxyConfig};

/// One workload's last result and what it was computed from.
#[derive(Debug)]
pub(super) struct Slot {
    /// The spec, without its annotations: those are the `pod_annotations` of the last key,
    /// which the memo shares (they can be most of a node's config).
    spec: WorkloadSpec,
    annotated: bool,
    cgroup_id: u64,
    proxy_cgroup: Option<u64>,
    pub desired: Desired,
    pub issues: Vec<WorkloadIssue>,
    pub warnings: Vec<String>,
    /// The memo entries the result came from, the workload's own last: held (reference-counted)
    /// while the slot lives.
    keys: Vec<SharedKey>,
    /// The pass that last produced or reused it.
    seen: u64,
}

impl Slot {
    /// `keys`: the memo entries `desired` came from; the pod's own resolution last when the pod
    /// has annotations (its key then holds them).
    pub fn new(
        spec: &WorkloadSpec,
        cgroup_id: u64,
        proxy_cgroup: Option<u64>,
        desired: Desired,
        keys: Vec<SharedKey>,
    ) -> Self {
        debug_assert!(
            spec.annotations.is_empty()
                || keys
                    .last()
                    .is_some_and(|k| k.pod_annotations == spec.annotations)
        );
        Self {
            spec: WorkloadSpec {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                cgroup: spec.cgroup.clone(),
                proxy_cgroup: spec.proxy_cgroup.clone(),
                proxy_uid: spec.proxy_uid,
                netns: spec.netns.clone(),
                inbound_port: spec.inbound_port,
                annotations: Annotations::new(),
            },
            annotated: !spec.annotations.is_empty(),
            cgroup_id,
            proxy_cgroup,
            desired,
            issues: Vec::new(),
            warnings: Vec::new(),
            keys,
            seen: 0,
        }
    }

    /// Whether `w` is the spec this result was computed from.
    fn is_for(&self, w: &WorkloadSpec) -> bool {
        let annotations = match self.keys.last() {
            Some(k) if self.annotated => &k.pod_annotations,
            _ => &self.spec.annotations,
        };
        *annotations == w.annotations
            && self.spec.namespace == w.namespace
            && self.spec.name == w.name
            && self.spec.cgroup == w.cgroup
            && self.spec.proxy_cgroup == w.proxy_cgroup
            && self.spec.proxy_uid == w.proxy_uid
            && self.spec.netns == w.netns
            && self.spec.inbound_port == w.inbound_port
    }
}

#[derive(Debug, Default)]
pub(super) struct Slots {
    slots: HashMap<(String, String), Slot>,
    /// The proxy config and namespace annotations the slots were computed with.
    proxy: Option<ProxyConfig>,
    namespaces: BTreeMap<String, Annotations>,
    /// Namespaces whose annotations changed in this pass.
    changed: HashSet<String>,
    /// The proxy config changed in this pass: no slot is reused.
    all_stale: bool,
    /// Never reuse (tests: the full recompute that the dirty set must agree with).
    #[cfg(test)]
    pub never: bool,
    pass: u64,
}

impl Slots {
    /// Starts a pass. `reset`: the mesh config changed (every resolution is stale). Returns the
    /// memo keys of the slots dropped.
    pub fn begin(&mut self, reset: bool, snapshot: &Snapshot) -> Vec<SharedKey> {
        self.pass += 1;
        let mut released = Vec::new();
        if reset {
            released.extend(self.slots.drain().flat_map(|(_, s)| s.keys));
        }
        // A proxy change touches every record but no resolution: every workload is recomputed
        // from the memo, and its slot replaced (so the memo entries stay held).
        self.all_stale = self.proxy.as_ref() != Some(&snapshot.proxy);
        if self.all_stale {
            self.proxy = Some(snapshot.proxy.clone());
        }
        self.changed.clear();
        if self.namespaces != snapshot.namespaces {
            let names = self.namespaces.keys().chain(snapshot.namespaces.keys());
            for ns in names {
                if self.namespaces.get(ns) != snapshot.namespaces.get(ns) {
                    self.changed.insert(ns.clone());
                }
            }
            self.namespaces = snapshot.namespaces.clone();
        }
        released
    }

    /// The last result of `w`, if nothing it depends on changed.
    pub fn reuse(
        &mut self,
        w: &WorkloadSpec,
        cgroup_id: u64,
        proxy_cgroup: Option<u64>,
    ) -> Option<&Slot> {
        #[cfg(test)]
        if self.never {
            return None;
        }
        if self.all_stale || self.changed.contains(&w.namespace) {
            return None;
        }
        let slot = self.slots.get_mut(&(w.namespace.clone(), w.name.clone()))?;
        if slot.cgroup_id != cgroup_id || slot.proxy_cgroup != proxy_cgroup || !slot.is_for(w) {
            return None;
        }
        slot.seen = self.pass;
        Some(slot)
    }

    /// Stores a workload's new result; returns the memo keys of the one it replaces.
    pub fn store(&mut self, mut slot: Slot) -> Vec<SharedKey> {
        slot.seen = self.pass;
        let id = (slot.spec.namespace.clone(), slot.spec.name.clone());
        self.slots
            .insert(id, slot)
            .map(|old| old.keys)
            .unwrap_or_default()
    }

    /// Ends a pass: drops the slots of workloads not in it (removed, pending, or refused), and
    /// returns their memo keys.
    pub fn end(&mut self) -> Vec<SharedKey> {
        let pass = self.pass;
        let mut released = Vec::new();
        self.slots.retain(|_, s| {
            let keep = s.seen == pass;
            if !keep {
                released.append(&mut s.keys);
            }
            keep
        });
        released
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.len()
    }
}
