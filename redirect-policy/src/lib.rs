//! Pure policy core: inputs (mesh config, namespace and pod annotations) → effective policy →
//! compiled trie entries, plus the reference evaluator that `explain` uses. No kube client, no aya
//! and no I/O in here, so the kube source, the file source, the CLI and the fuzzer all share it.
//!
//! - [`resolve`]: validation and precedence (docs/policy.md has the rules in one table);
//! - [`compile`]: minimal LPM entries for the kernel's tries;
//! - [`evaluate`] / [`evaluate_compiled`]: the decision (docs/architecture.md), from the lists
//!   and from the compiled tables.

/// Declares a module's keys: one `pub const` per key, and `ALL`, every key in the order written
/// (what `is_policy_key` and the unknown-key checks read).
macro_rules! keys {
    ($($(#[$meta:meta])* $name:ident = $key:literal;)+) => {
        $($(#[$meta])* pub const $name: &str = $key;)+
        /// Every key above, in the order written.
        pub const ALL: &[&str] = &[$($name),+];
    };
}

mod additions;
mod compile;
mod dialect;
mod dns;
mod evaluate;
pub mod inbound;
mod layer;
mod mesh;
mod resolve;
mod types;
mod values;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod proptests;

pub use additions::{Additions, additions};
pub use compile::{
    Overlay, compile,
    overlay::Layered,
    overlay_of,
    union::{Lists, added_exclusions, extra_exclusions},
};
pub use dialect::keys;
pub use dns::{DEFAULT_DNS_PORT, DnsDefault, DnsPolicy, keys as dns_keys};
pub use evaluate::{
    Lookups, canonical_ip, evaluate, evaluate_compiled, evaluate_layered, evaluate_lookups,
    evaluate_rules, is_loopback, lookup_ip, lookup_port,
};
pub use mesh::{MeshTraffic, keys as mesh_keys};
pub use resolve::{MeshLayer, resolve, resolve_with};
pub use types::{
    Action, Annotations, Compiled, EffectivePolicy, Mode, Origin, PolicyError, PortPrefix,
    PortRange, Resolved, Source, Sourced, Step, Verdict, WorkloadInputs,
};

/// What the resolution tests share: one workload "demo/app" resolved from pairs of annotations.
#[cfg(test)]
mod test_inputs {
    use crate::{Annotations, MeshTraffic, PolicyError, Resolved, WorkloadInputs};

    pub fn ann(pairs: &[(&str, &str)]) -> Annotations {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A pod's own annotations over the default mesh config and a bare namespace.
    pub fn run_pod(pod: &[(&str, &str)]) -> Result<Resolved, PolicyError> {
        run(&MeshTraffic::default(), &[], pod)
    }

    pub fn run(
        mesh: &MeshTraffic,
        ns: &[(&str, &str)],
        pod: &[(&str, &str)],
    ) -> Result<Resolved, PolicyError> {
        let (ns, pod) = (ann(ns), ann(pod));
        crate::resolve(&WorkloadInputs {
            mesh,
            namespace: "demo",
            namespace_annotations: &ns,
            name: "app",
            pod_annotations: &pod,
        })
    }
}
