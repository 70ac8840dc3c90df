//! Snapshot → per-cgroup desired records and entries. Pure: cgroup ids come resolved in the
//! snapshot. Resolution and compilation are memoized by content across passes, so a pass costs a
//! lookup per unchanged workload and identical policies share one [`Rules`] (and so one id).
use std::{collections::HashMap, sync::Arc};

use redirect_common::{Policy, flags};

mod pass;
pub use pass::build;

use super::{
    Rules, Snapshot, WorkloadSpec,
    layering::{Base, exclusions_overlay, layer, layer_exclusions},
};
use crate::{
    bpf::PolicyEntries,
    policy::{
        self, Annotations, Compiled, EffectivePolicy, Lists, MeshLayer, MeshTraffic, PolicyError,
        WorkloadInputs,
    },
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
    /// What the workload runs with instead (decided when the pass is applied).
    pub fallback: Fallback,
    /// The workload's cgroup, when known.
    pub cgroup_id: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Its own last good policy, as applied before.
    LastGood,
    /// The current mesh default (the mesh config and namespace annotations, without the pod's).
    MeshDefault,
    /// A record that redirects every destination but loopback: the last resort.
    RedirectAll,
    Nothing,
    /// Only an inbound key was bad: the outbound policy is applied as written, and inbound keeps
    /// its last good inbound policy (the mesh default's inbound lists if it has none).
    InboundLastGood,
}

impl Fallback {
    /// For Events, logs and metric labels.
    pub fn describe(self) -> &'static str {
        match self {
            Fallback::LastGood => "keeping its last good policy",
            Fallback::MeshDefault => "using the mesh default policy",
            Fallback::RedirectAll => {
                "redirecting every destination (the mesh default does not fit either)"
            }
            Fallback::Nothing => "not redirecting it",
            Fallback::InboundLastGood => {
                "applying its outbound policy; its inbound interception keeps its last good inbound policy (the mesh default if it has none)"
            }
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Fallback::LastGood => "last_good",
            Fallback::MeshDefault => "mesh_default",
            Fallback::RedirectAll => "redirect_all",
            Fallback::Nothing => "none",
            Fallback::InboundLastGood => "inbound_last_good",
        }
    }
}

/// What resolves the same: the pod's name matters only when the pod has annotations of its own
/// (it then appears in sources and messages).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Key {
    namespace: String,
    name: String,
    namespace_annotations: Annotations,
    pub pod_annotations: Annotations,
}

/// Keys are shared by the memo and the kept results that hold them: at node scale a pod's
/// annotations (100 CIDRs each, say) are kept once, not once per holder.
pub(super) type SharedKey = Arc<Key>;

/// What a workload's record needs from its resolved policy. The policy itself is not kept: at
/// node scale its sourced lists (100,000 CIDRs, each with its source) were most of the agent's
/// memory, once per distinct policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordInputs {
    pub enabled: bool,
    pub proxy_uid: Option<u32>,
    pub dns_port: u16,
}

impl RecordInputs {
    pub fn of(p: &EffectivePolicy) -> Self {
        Self {
            enabled: p.enabled,
            proxy_uid: p.proxy_uid.as_ref().map(|s| s.value),
            dns_port: p.dns.record_port(),
        }
    }
}

/// A resolved and compiled policy.
#[derive(Clone, Debug)]
struct Resolution {
    inputs: RecordInputs,
    /// Its entries: the whole table, or an overlay over `base` (layering.rs).
    rules: Arc<Rules>,
    base: Option<Arc<Rules>>,
    /// The compiled table and the lists of a policy that can be a base (one without pod
    /// annotations).
    compiled: Option<Arc<(Compiled, Lists)>>,
    warnings: Vec<String>,
    /// The inbound-only error (`Resolved::inbound_error`).
    inbound_error: Option<PolicyError>,
}

#[derive(Clone, Debug)]
struct Entry {
    resolved: Result<Resolution, PolicyError>,
}

/// A memo entry and how many workloads' last results (slots.rs) came from it.
#[derive(Debug)]
struct Held {
    entry: Entry,
    refs: usize,
}

/// The memo of resolution and compilation, and the dirty set of workload results (slots.rs),
/// kept across passes. An entry lives while a workload's result refers to it.
#[derive(Debug, Default)]
pub struct Memo {
    /// The mesh config of the memo's resolutions: a pass whose snapshot shares this `Arc` skips
    /// comparing its (at node scale, 100,000-entry) content.
    mesh: Arc<MeshTraffic>,
    /// `mesh` parsed, once per content (None until the first pass).
    mesh_layer: Option<Result<Arc<MeshLayer>, PolicyError>>,
    entries: HashMap<SharedKey, Held>,
    rules: HashMap<u64, Arc<Rules>>,
    slots: super::slots::Slots,
    /// Some entry was dropped in this pass: the interned sets are pruned at its end.
    prune: bool,
    /// Resolutions computed (not memo hits) in the last pass.
    pub computed: usize,
    /// Workloads recomputed (their last result not reused) in the last pass.
    pub recomputed: usize,
}

impl Memo {
    /// Starts a pass; true if the mesh config changed (every resolution is recomputed).
    fn begin(&mut self, snapshot: &Snapshot) -> bool {
        let mesh = &snapshot.mesh;
        let same = Arc::ptr_eq(&self.mesh, mesh) || *self.mesh == **mesh;
        let reset = self.mesh_layer.is_none() || !same;
        if reset {
            self.mesh = mesh.clone();
            self.mesh_layer = Some(MeshLayer::parse(mesh).map(Arc::new));
        }
        let released = self.slots.begin(reset, snapshot);
        self.release(released);
        if reset {
            // The interned sets stay until the pass ends: a recomputed policy that compiles to
            // the same entries gets the very set the applier holds (compared by pointer).
            self.entries.clear();
            self.prune = true;
        }
        self.computed = 0;
        self.recomputed = 0;
        reset
    }

    fn end(&mut self) {
        let released = self.slots.end();
        self.prune |= !released.is_empty();
        self.release(released);
        // Entries computed in this pass that no result kept (none today; cheap to make sure).
        let before = self.entries.len();
        self.entries.retain(|_, h| h.refs > 0);
        if std::mem::take(&mut self.prune) || self.entries.len() != before {
            let live: std::collections::HashSet<u64> = self
                .entries
                .values()
                .filter_map(|h| h.entry.resolved.as_ref().ok())
                .flat_map(|r| {
                    std::iter::once(r.rules.digest()).chain(r.base.as_ref().map(|b| b.digest()))
                })
                .collect();
            self.rules.retain(|d, _| live.contains(d));
        }
    }

    fn hold(&mut self, keys: &[SharedKey]) {
        for k in keys {
            if let Some(h) = self.entries.get_mut(k) {
                h.refs += 1;
            }
        }
    }

    fn release(&mut self, keys: Vec<SharedKey>) {
        for k in keys {
            if let Some(h) = self.entries.get_mut(&k) {
                h.refs = h.refs.saturating_sub(1);
                if h.refs == 0 {
                    self.entries.remove(&k);
                    self.prune = true;
                }
            }
        }
    }

    /// Workloads with a kept result (tests).
    #[cfg(test)]
    pub(super) fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Turns the dirty set off: every pass recomputes every workload (tests).
    #[cfg(test)]
    pub(super) fn never_reuse(&mut self) {
        self.slots.never = true;
    }

    /// Memo entries (tests).
    #[cfg(test)]
    pub(super) fn entries(&self) -> usize {
        self.entries.len()
    }

    /// The shared copy of `e`'s set.
    fn intern(&mut self, e: PolicyEntries) -> Arc<Rules> {
        let fresh = Rules::new(e);
        self.rules.entry(fresh.digest()).or_insert(fresh).clone()
    }

    /// `base`: the workload's mesh default, which a policy with pod annotations may overlay;
    /// `same_namespace`: it was resolved with `namespace_annotations` (not without them, as a
    /// fallback), so a pod that only adds exclusions is resolved as its additions to it.
    /// Also returns the entry's key: the caller's result holds it ([`Memo::hold`]).
    fn resolve(
        &mut self,
        w: &WorkloadSpec,
        namespace_annotations: &Annotations,
        pod_annotations: &Annotations,
        base: Option<&Resolution>,
        same_namespace: bool,
    ) -> (SharedKey, Entry) {
        let key = Key {
            namespace: w.namespace.clone(),
            name: if pod_annotations.is_empty() {
                String::new()
            } else {
                w.name.clone()
            },
            namespace_annotations: namespace_annotations.clone(),
            pod_annotations: pod_annotations.clone(),
        };
        if let Some((k, h)) = self.entries.get_key_value(&key) {
            return (k.clone(), h.entry.clone());
        }
        self.computed += 1;
        let resolved = match self.mesh_layer.clone().expect("begin parsed the mesh") {
            Ok(layer) => {
                // A handle of its own on the mesh config, so that the inputs (which borrow it)
                // are built once and live beside `&mut self`.
                let traffic = self.mesh.clone();
                let inputs = WorkloadInputs {
                    mesh: &traffic,
                    namespace: &w.namespace,
                    namespace_annotations,
                    name: &w.name,
                    pod_annotations,
                };
                self.compute(&layer, &inputs, base, same_namespace)
            }
            Err(e) => Err(e),
        };
        let e = Entry { resolved };
        let key = Arc::new(key);
        self.entries.insert(
            key.clone(),
            Held {
                entry: e.clone(),
                refs: 0,
            },
        );
        (key, e)
    }

    /// One workload's resolution: as its additions to `base` where it can be, else whole.
    fn compute(
        &mut self,
        mesh: &MeshLayer,
        inputs: &WorkloadInputs,
        base: Option<&Resolution>,
        same_namespace: bool,
    ) -> Result<Resolution, PolicyError> {
        if let Some(b) = base.filter(|_| same_namespace && !inputs.pod_annotations.is_empty()) {
            // `Err(())`: not additions, or their overlay would not pay: the whole table.
            if let Some(a) = policy::additions(mesh, inputs)?
                && let Ok(r) = self.additions(a, b)
            {
                return Ok(r);
            }
        }
        self.whole(mesh, inputs, base)
    }

    /// A pod that only adds exclusions to its mesh default `b`: the overlay of its additions,
    /// from `b`'s lists, without resolving or compiling its whole policy (what the whole policy
    /// would give: redirect-policy's additions.rs and compile/union.rs). `Err` where the overlay
    /// would not pay.
    fn additions(&mut self, a: policy::Additions, b: &Resolution) -> Result<Resolution, ()> {
        let (table, lists) = b.compiled.as_deref().ok_or(())?;
        let o = policy::added_exclusions(&a.exclude_cidrs, &a.exclude_ports, lists);
        let (rules, base) = if o.is_empty() {
            // Nothing new: the whole table is the mesh default's.
            (b.rules.clone(), None)
        } else {
            let base = Base {
                table,
                lists,
                rules: &b.rules,
            };
            let (e, base) = exclusions_overlay(&o, &base).ok_or(())?;
            (self.intern(e), Some(base))
        };
        Ok(Resolution {
            inputs: RecordInputs {
                dns_port: a.dns.record_port(),
                ..b.inputs
            },
            rules,
            base,
            compiled: None,
            warnings: a.warnings,
            inbound_error: a.inbound_error,
        })
    }

    /// The whole resolution and compilation.
    fn whole(
        &mut self,
        mesh: &MeshLayer,
        inputs: &WorkloadInputs,
        base: Option<&Resolution>,
    ) -> Result<Resolution, PolicyError> {
        let r = policy::resolve_with(mesh, inputs)?;
        let base = base.and_then(|b| {
            let (table, lists) = b.compiled.as_deref()?;
            Some(Base {
                table,
                lists,
                rules: &b.rules,
            })
        });
        let mut compiled = None;
        let (e, base) = match base.as_ref().and_then(|b| layer_exclusions(&r.policy, b)) {
            Some((e, b)) => (e, Some(b)),
            None => {
                let c = policy::compile(&r.policy);
                let layered = layer(&c, base.as_ref());
                if inputs.pod_annotations.is_empty() {
                    compiled = Some(Arc::new((c, Lists::of(&r.policy))));
                }
                layered
            }
        };
        Ok(Resolution {
            inputs: RecordInputs::of(&r.policy),
            rules: self.intern(e),
            base,
            compiled,
            warnings: r.warnings,
            inbound_error: r.inbound_error,
        })
    }
}

/// The kernel record: who the proxy is and where redirected connects go.
pub fn record(
    proxy: &ProxyConfig,
    policy: &RecordInputs,
    proxy_cgroup: Option<u64>,
    workload_uid: Option<u32>,
) -> Policy {
    let (v4, v6) = proxy.targets();
    let uid = policy.proxy_uid.or(workload_uid).or(proxy.uid);
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
    let dns_port = policy.dns_port;
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
