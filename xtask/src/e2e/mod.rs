//! The end-to-end scenarios: the demos users know from the FSM, Istio and ASM docs
//! (/work/shared/seeds), with redirect underneath and no pod restart, plus a bad annotation and an
//! agent rollout. One definition per scenario (`scenarios/*.yaml`), two runners:
//! - `cargo xtask e2e-kind` ([`kind`]): a kind cluster, the real images and deploy/;
//! - `cargo xtask e2e-local` ([`local`]): this machine, real netns/cgroups/proxy, the real agent
//!   with the kubernetes source against a stand-in API server serving the same objects.
//!
//! Both run the same steps and the same checks ([`engine`]).
mod engine;
pub mod kind;
mod local;
mod objects;
mod scenario;

pub use kind::KindArgs;

pub fn local(filter: Option<&str>) -> anyhow::Result<()> {
    local::run(filter)
}

pub fn kind(args: &KindArgs) -> anyhow::Result<()> {
    kind::run(args)
}
