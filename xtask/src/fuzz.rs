//! The short fuzz smoke run of `cargo xtask test`: the policy parsers under libFuzzer for 30 s.
//! The long runs (≥ 1M iterations) are done by hand with the same target.
use std::process::Command;

use crate::util::{run, step, workspace_root};

pub const SMOKE_SECONDS: u32 = 30;

pub fn smoke() -> anyhow::Result<()> {
    if which::which("cargo-fuzz").is_err() {
        step("installing cargo-fuzz (libFuzzer runner)");
        run(Command::new("cargo")
            .args(["install", "--locked", "cargo-fuzz"])
            .env("RUSTUP_TOOLCHAIN", "stable"))?;
    }
    step(&format!(
        "fuzz smoke run: policy_parsers for {SMOKE_SECONDS} s (cargo +nightly fuzz)"
    ));
    run(Command::new("cargo")
        .args(["+nightly", "fuzz", "run", "policy_parsers", "--"])
        .arg(format!("-max_total_time={SMOKE_SECONDS}"))
        .current_dir(workspace_root().join("redirect-agent/fuzz")))
}
