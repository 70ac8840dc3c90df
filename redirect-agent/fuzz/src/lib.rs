//! The policy core, compiled on its own for fuzzing. Mounted at `crate::policy` so that its
//! internal `crate::policy::…` paths resolve exactly as inside redirect-agent.
#![allow(dead_code)]

#[path = "../../src/policy/mod.rs"]
pub mod policy;
