//! `cargo xtask …`: set-up, build, demo and tests for redirect. Every command installs what it
//! is missing first (see `setup`), so a fresh machine needs nothing else.
mod demo;
mod fuzz;
mod kernels;
mod setup;
mod testrun;
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
    /// Boot the Debian and Ubuntu kernels of xtask/src/kernels/kernels.txt under qemu and run the
    /// datapath checks inside each, one VM per core; prints a kernel × check table (needs root;
    /// one to two minutes per kernel).
    TestKernels,
    /// Set up, build, then show a real process being redirected in its own cgroup and netns.
    Demo,
    /// Benchmark eBPF redirection against iptables REDIRECT side by side (needs root): builds and
    /// runs the bench/ crate (redirect-bench), which writes REPORT.md, CSVs and PNGs.
    Bench {
        /// Smoke run (under 3 minutes): checks that the bench works, figures not meaningful.
        #[arg(long)]
        quick: bool,
        /// Results directory (default: target/bench/<timestamp>/; a full run without --out also
        /// refreshes docs/bench/).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// The e2e scenarios (FSM 000, ASM 003, Istio 001, bad annotation, agent rollout) on this
    /// machine: real netns, cgroups, proxy and agent; the fake Kubernetes API of the kube tests
    /// (needs root). The same test runs in `cargo xtask test`.
    E2eLocal {
        /// Run only the scenarios whose test name contains this (e.g. `agent_rollout`).
        filter: Option<String>,
    },
    /// The same scenarios in a kind cluster built from deploy/ and the Dockerfile (needs Docker
    /// and kind).
    E2eKind(redirect_tests::e2e::kind::KindArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::setup(setup::Needs::default()).map(|_| ()),
        Command::Build { release } => {
            let env = setup::setup(setup::Needs::default())?;
            util::build(&env, release)
        }
        Command::Test => test(),
        Command::TestKernels => kernels::test_kernels(),
        Command::Demo => demo::demo(),
        Command::Bench { quick, out } => bench(quick, out),
        Command::E2eLocal { filter } => e2e_local(filter.as_deref()),
        Command::E2eKind(args) => redirect_tests::e2e::kind::run(&args),
    }
}

fn test() -> anyhow::Result<()> {
    util::require_root("cargo xtask test")?;
    let env = setup::setup(setup::Needs { test_tools: true })?;
    util::build_tests(&env)?;
    // The upgrade test's "new release" (tests/tests/upgrade.rs): the agent with another Policy
    // layout. Same packages as the build above, so it shares every dependency with it.
    util::cargo(
        &env,
        &[
            "build",
            "-p",
            "redirect-agent",
            "-p",
            "redirect-tests",
            "--bin",
            "redirect-agent-layout-test",
            "--features",
            "redirect-agent/test-policy-pad",
        ],
    )?;
    util::step("running the test suite (unit, property and real-kernel tests)");
    // Every test binary `cargo test` would run, two at a time with two test threads each
    // (testrun.rs), then the doc tests. This includes the e2e scenarios (tests/tests/e2e_local.rs)
    // and the offline check of deploy/ (tests/tests/deploy_validate.rs).
    testrun::run_all(&env, 2)?;
    util::step("test-kernels: the datapath on Debian's and Ubuntu's kernels under qemu");
    kernels::test_kernels()?;
    util::step("bench --quick: the benchmark still works (figures not meaningful)");
    bench(true, None)?;
    fuzz::smoke()
}

/// The e2e scenarios are a test of their own (tests/tests/e2e_local.rs); this runs only that one.
fn e2e_local(filter: Option<&str>) -> anyhow::Result<()> {
    util::require_root("cargo xtask e2e-local")?;
    let env = setup::setup(setup::Needs::default())?;
    util::build(&env, false)?;
    let mut args = vec!["test", "-p", "redirect-tests", "--test", "e2e_local", "--"];
    args.extend(filter);
    args.push("--test-threads=2");
    util::cargo(&env, &args)
}

/// Builds redirect-bench with the agent and the test proxy it runs, then runs it. The smoke run
/// (`--quick`) checks that the bench works, so it takes the debug build that `build`/`test`
/// already made; a full run measures release builds.
fn bench(quick: bool, out: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    util::require_root("cargo xtask bench")?;
    let env = setup::setup(setup::Needs { test_tools: true })?;
    if quick {
        // The smoke run takes the debug build `cargo xtask test` has just made (same command).
        util::build_tests(&env)?;
    } else {
        util::step("building the agent and the bench processes (release)");
        util::cargo(
            &env,
            &[
                "build",
                "-p",
                "redirect-agent",
                "-p",
                "redirect-tests",
                "-p",
                "redirect-bench",
                "--bins",
                "--release",
            ],
        )?;
    }
    let mut cmd = std::process::Command::new(util::target_bin("redirect-bench", !quick));
    if quick {
        cmd.arg("--quick");
    }
    if let Some(out) = out {
        cmd.arg("--out").arg(out);
    }
    util::run(&mut cmd)
}
