//! Small helpers shared by the xtask commands.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::setup::Env;

pub fn step(msg: &str) {
    eprintln!("\x1b[1m==> {msg}\x1b[0m");
}

pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{what} needs root (it loads eBPF programs and creates cgroups and network namespaces); run it with sudo"
        );
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs cargo in the workspace with the eBPF toolchain choice exported for build.rs.
pub fn cargo(env: &Env, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(workspace_root());
    env.apply(&mut cmd);
    run(&mut cmd)
}

pub fn build(env: &Env, release: bool) -> anyhow::Result<()> {
    step("building redirect-agent (with its eBPF object) and the test helpers");
    let mut args = vec![
        "build",
        "-p",
        "redirect-agent",
        "-p",
        "redirect-tests",
        "--bins",
    ];
    if release {
        args.push("--release");
    }
    cargo(env, &args)
}

/// Builds every binary and every test target of the workspace's default members in one cargo
/// run: what `cargo test` and the debug bench then find fresh. One run with the test targets
/// resolves dependency features as `cargo test` does (dev-dependencies included), so nothing is
/// compiled a second time with another feature set.
pub fn build_tests(env: &Env) -> anyhow::Result<()> {
    step("building the agent (with its eBPF object), the helpers, the bench and every test");
    cargo(env, &["build", "--bins", "--tests"])
}

pub fn target_bin(name: &str, release: bool) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target
        .join(if release { "release" } else { "debug" })
        .join(name)
}
