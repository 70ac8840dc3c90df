//! redirect-agent: fills the redirect-ebpf maps from a policy source.
//!
//! Layers read from the top down: `cli` → `reconcile` → {`policy`, `source`, `cgroup`, `bpf`}.
pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod policy;
pub mod proxy;
pub mod reconcile;
pub mod source;
