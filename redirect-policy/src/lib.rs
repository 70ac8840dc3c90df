//! Pure policy core: inputs (mesh config, namespace and pod annotations) → effective policy →
//! compiled trie entries, plus the reference evaluator that `explain` uses. No kube client, no aya
//! and no I/O in here, so the kube source, the file source, the CLI and the fuzzer all share it.
//!
//! - [`resolve`]: validation and precedence (docs/policy.md has the rules in one table);
//! - [`compile`]: minimal LPM entries for the kernel's tries;
//! - [`evaluate`] / [`evaluate_compiled`]: the decision (docs/architecture.md), from the lists
//!   and from the compiled tables.

mod compile;
mod dialect;
mod evaluate;
pub mod inbound;
mod layer;
mod mesh;
mod resolve;
mod types;
mod values;

#[cfg(test)]
mod proptests;

pub use compile::compile;
pub use dialect::keys;
pub use evaluate::{
    canonical_ip, evaluate, evaluate_compiled, evaluate_lookups, is_loopback, lookup_ip,
    lookup_port,
};
pub use mesh::{MeshTraffic, keys as mesh_keys};
pub use resolve::resolve;
pub use types::{
    Action, Annotations, Compiled, EffectivePolicy, Mode, Origin, PolicyError, PortPrefix,
    PortRange, Resolved, Source, Sourced, Step, Verdict, WorkloadInputs,
};
