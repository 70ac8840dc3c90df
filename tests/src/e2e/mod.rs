//! The end-to-end scenarios: the demos users know from the FSM, Istio and ASM docs, with redirect
//! underneath and no pod restart, plus a bad annotation and an agent rollout. One definition per
//! scenario (`scenarios/*.yaml`), two runners:
//! - tests/tests/e2e_local.rs (part of `cargo test`): this machine, real netns, cgroups, proxy and
//!   the real agent binary with the kubernetes source, against the fake API server of
//!   tests/tests/kube_support served over a socket;
//! - [`kind`] (`cargo xtask e2e-kind`): a kind cluster, the real images and deploy/.
//!
//! Both run the same steps and the same checks ([`engine`]).
pub mod engine;
pub mod kind;
pub mod objects;
pub mod scenario;
