//! Command line: `run`, `inspect`, `explain`, `cleanup`.
mod explain;
mod explain_dns;
mod explain_inbound;
mod inspect;
mod inspect_inbound;
mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/redirect";

#[derive(Debug, Parser)]
#[command(
    name = "redirect-agent",
    version,
    about = "eBPF transparent redirection of pod traffic to the mesh proxy",
    long_about = "Decides at connect() time, in the kernel, whether a workload's outbound TCP \
connection goes to its proxy or straight to its destination, following the mesh's exclusion \
and inclusion lists. State lives in maps and links pinned under --bpffs-dir, so interception \
continues while the agent is down; only `cleanup` detaches."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach (or adopt) the programs and keep the maps in line with the source.
    Run(run::RunArgs),
    /// Print the pinned state: workloads, their CIDR and port entries, and decision counters.
    /// Reads the pinned maps, so it works with no agent running.
    Inspect(inspect::InspectArgs),
    /// Which rule decides a workload's connect to a destination, and why. Evaluates the policy
    /// alone, or with --bpffs-dir the kernel's pinned maps (and checks that the two agree).
    Explain(explain::ExplainArgs),
    /// Detach every program and unpin every map under --bpffs-dir, in every layout generation
    /// (gen<N> sub-directories included). The only command that stops interception. Refused
    /// while an agent runs on that directory (stop it first).
    Cleanup(BpffsArg),
    /// Print the MeshConfig CustomResourceDefinition (config.flomesh.io/v1alpha3) that the
    /// kubernetes source reads (deploy/crds/meshconfig.yaml is this output).
    Crd,
}

#[derive(Debug, clap::Args)]
pub struct BpffsArg {
    /// bpffs directory holding the pinned maps and links. After an upgrade that changed the map
    /// layout they live in its newest gen<N> sub-directory; every command finds it.
    #[arg(long, env = "REDIRECT_BPFFS_DIR", default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    #[default]
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REDIRECT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// glibc gives each thread that allocates under contention a heap ("arena") of its own, up to
/// eight per core, and returns little of an arena's freed memory. The agent's threads (tokio's
/// workers and blocking pool, the reconcile owner) parse and build node-sized states in turn, so
/// at 1,000 workloads its RSS wandered between 45 and 59 MiB from run to run for the same live
/// heap: 43-47 MiB with two arenas, 35 MiB with one (the bench's agent at scale). The agent is
/// not on the datapath and its threads rarely allocate at the same moment, so one arena it is.
/// A no-op outside glibc.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            limit_malloc_arenas();
            init_logging(args.log_format);
            run::run(args)
        }
        Command::Inspect(args) => inspect::inspect(args),
        Command::Explain(args) => explain::explain(args),
        Command::Crd => {
            print!("{}", crate::source::kube::crd::crd_yaml());
            Ok(())
        }
        Command::Cleanup(args) => {
            // A running agent would go on maintaining what cleanup removes (and its restart
            // would attach it all again): the same lock as `run`, so cleanup waits for no one
            // and names the agent that holds the directory.
            let _lock =
                match args.bpffs_dir.exists() {
                    true => Some(crate::lock::lock_pin_dir(&args.bpffs_dir).map_err(|e| {
                        anyhow::anyhow!("cleanup refused: {e}; stop that agent first")
                    })?),
                    false => None,
                };
            let report = crate::bpf::cleanup(&args.bpffs_dir)?;
            let removed = if report.left.is_empty() {
                format!("removed {}", args.bpffs_dir.display())
            } else {
                format!(
                    "left {} other entr(y/ies) in {} untouched",
                    report.left.len(),
                    args.bpffs_dir.display()
                )
            };
            println!(
                "detached {} link(s), unpinned {} program(s) and {} map(s), {removed}",
                report.links.len(),
                report.programs.len(),
                report.maps.len(),
            );
            Ok(())
        }
    }
}
