//! redirect-agent: fills the redirect-ebpf maps from a policy source.
//!
//! Layers read from the top down: `cli` → `reconcile` → {`policy`, `source`, `cgroup`, `bpf`}.
pub mod admin;
pub mod bpf;
pub mod caps;
pub mod cgroup;
pub mod cli;
pub mod lock;
pub mod metrics;
/// The pure policy core lives in its own crate (no kube, no aya, no tokio); re-exported so the
/// layers keep one path to it.
pub use redirect_policy as policy;
pub mod proxy;
pub mod reconcile;
pub mod source;
