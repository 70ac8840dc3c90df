//! `cargo xtask …`: set-up, build, demo and tests for redirect. Every command installs what it
//! is missing first (see `setup`), so a fresh machine needs nothing else.
mod demo;
mod setup;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the eBPF toolchain (nightly+rust-src, or Debian's rustc-web linked as a rustup
    /// toolchain), bpf-linker for LLVM 22, bpftool, and mount bpffs. Idempotent.
    Setup,
    /// Set up, then build the agent (with its embedded eBPF object) and the test binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, then run the whole test suite (unit, property, and real-kernel tests;
    /// needs root).
    Test,
    /// Set up, build, then show a real process being redirected in its own cgroup and netns.
    Demo,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::setup(setup::Needs::default()).map(|_| ()),
        Command::Build { release } => {
            let env = setup::setup(setup::Needs::default())?;
            util::build(&env, release)
        }
        Command::Test => test(),
        Command::Demo => demo::demo(),
    }
}

fn test() -> anyhow::Result<()> {
    util::require_root("cargo xtask test")?;
    let env = setup::setup(setup::Needs {
        test_tools: true,
        ..Default::default()
    })?;
    util::build(&env, false)?;
    util::step("running the test suite (unit, property and real-kernel tests)");
    // One test thread per binary keeps the kernel tests' counters and timings unambiguous; the
    // binaries themselves still run one after another.
    util::cargo(&env, &["test", "--", "--test-threads=2"])
}
