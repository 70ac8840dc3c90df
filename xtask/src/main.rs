//! `cargo xtask …`: set-up, build, demo and tests for redirect. Every command installs what it
//! is missing first (see `setup`), so a fresh machine needs nothing else.
mod bench;
mod demo;
mod e2e;
mod fuzz;
mod kernels;
mod setup;
mod util;
mod validate;

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
    /// Boot Debian's kernels (xtask/src/kernels/kernels.txt) under qemu and run the datapath
    /// checks inside each; prints a kernel × check table (needs root; about 1 minute per kernel).
    TestKernels,
    /// Set up, build, then show a real process being redirected in its own cgroup and netns.
    Demo,
    /// Benchmark eBPF redirection against iptables REDIRECT side by side (needs root); writes
    /// REPORT.md, CSVs and PNGs.
    Bench {
        /// Smoke run (under 3 minutes): checks that the bench works, figures not meaningful.
        #[arg(long)]
        quick: bool,
        /// Results directory (default: target/bench/<timestamp>/; a full run without --out also
        /// refreshes docs/bench/).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Check deploy/ offline: kustomize build (when kubectl has kustomize), kubernetes-validate,
    /// the MeshConfig CRD against an example instance, and the DaemonSet's least-privilege rules.
    ValidateDeploy,
    /// The e2e scenarios (FSM 000, ASM 003, Istio 001, bad annotation, agent rollout) on this
    /// machine: real netns, cgroups, proxy and agent; a stand-in Kubernetes API (needs root).
    E2eLocal {
        /// Run only the scenarios whose name contains this.
        filter: Option<String>,
    },
    /// The same scenarios in a kind cluster built from deploy/ and the Dockerfile (needs Docker
    /// and kind).
    E2eKind(e2e::KindArgs),
    /// (internal) A process of the benchmark: proxy, server or load client.
    #[command(hide = true)]
    BenchWorker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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
        Command::Bench { quick, out } => bench::bench(quick, out),
        Command::BenchWorker { args } => bench::worker(args),
        Command::ValidateDeploy => validate::validate_deploy(),
        Command::E2eLocal { filter } => e2e::local(filter.as_deref()),
        Command::E2eKind(args) => e2e::kind(&args),
    }
}

fn test() -> anyhow::Result<()> {
    util::require_root("cargo xtask test")?;
    let env = setup::setup(setup::Needs { test_tools: true })?;
    util::build(&env, false)?;
    validate::validate_deploy()?;
    util::step("running the test suite (unit, property and real-kernel tests)");
    // Two test threads per binary, one per core here; the binaries run one after another. Each
    // kernel test owns its fixture, so tests of one binary never share kernel state.
    util::cargo(&env, &["test", "--", "--test-threads=2"])?;
    util::step("test-kernels: the datapath on Debian's kernels under qemu");
    kernels::test_kernels()?;
    util::step("e2e-local: the seed scenarios against a mocked Kubernetes API, real kernel");
    e2e::local(None)?;
    util::step("bench --quick: the benchmark still works (figures not meaningful)");
    bench::bench(true, None)?;
    fuzz::smoke()
}
