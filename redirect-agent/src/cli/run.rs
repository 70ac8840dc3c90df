//! `redirect-agent run`: the daemon.
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{BpffsArg, LogFormat};
use crate::{
    bpf::{self, AttachOptions},
    cgroup,
    reconcile::{self, Applier, Snapshot},
    source,
};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Standalone YAML config (mesh, proxy, namespaces, workloads); re-applied within a second
    /// of any change.
    #[arg(long, env = "REDIRECT_CONFIG")]
    pub config: PathBuf,
    #[command(flatten)]
    pub bpffs: BpffsArg,
    /// cgroup v2 directory the programs attach to. Default: the root of the cgroup2 mount, read
    /// from /proc/self/mountinfo.
    #[arg(long, env = "REDIRECT_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let mount = cgroup::cgroup2_mount()?;
    let cgroup_root = args.cgroup_root.clone().unwrap_or_else(|| mount.clone());
    let maps = bpf::load_and_attach(&AttachOptions {
        bpffs_dir: args.bpffs.bpffs_dir.clone(),
        cgroup_root: cgroup_root.clone(),
    })
    .context("attaching the datapath")?;
    let applier = Applier::adopt(maps).context("adopting pinned state")?;
    info!(
        cgroup_root = %cgroup_root.display(),
        adopted = applier.applied_count(),
        "datapath ready"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicBool::new(false));
        let owner = std::thread::Builder::new()
            .name("reconcile".into())
            .spawn({
                let pending = pending.clone();
                move || own_maps(applier, rx, pending)
            })?;
        let follower = tokio::spawn(source::watch::follow_file(
            args.config.clone(),
            mount,
            tx,
            pending,
        ));
        shutdown_signal().await;
        // Leaving the links and maps pinned is the point: interception continues while the
        // agent is away, and the next start adopts them.
        info!("shutting down; pinned programs stay attached");
        follower.abort();
        let _ = follower.await;
        let _ = owner.join();
        Ok(())
    })
}

/// The one owner of the maps: applies snapshots in order, coalescing a backlog into the newest.
fn own_maps(
    mut applier: Applier,
    mut rx: mpsc::UnboundedReceiver<Snapshot>,
    pending: Arc<AtomicBool>,
) {
    let mut generation = 0u64;
    while let Some(mut snapshot) = rx.blocking_recv() {
        while let Ok(newer) = rx.try_recv() {
            snapshot = newer;
        }
        generation += 1;
        let started = std::time::Instant::now();
        let outcome = reconcile::reconcile(&mut applier, &snapshot);
        for w in &outcome.warnings {
            warn!("{w}");
        }
        for issue in &outcome.issues {
            error!(
                workload = %format!("{}/{}", issue.namespace, issue.name),
                fallback = ?issue.fallback,
                "policy rejected: {}",
                issue.error
            );
        }
        for e in &outcome.report.errors {
            error!(workload = %e.workload, cgroup_id = e.cgroup_id, "applying policy failed, keeping the last good one: {}", e.error);
        }
        if !outcome.pending.is_empty() {
            info!(workloads = ?outcome.pending, "waiting for cgroups to appear");
        }
        pending.store(!outcome.pending.is_empty(), Ordering::Relaxed);
        let r = &outcome.report;
        info!(
            generation,
            added = r.added,
            updated = r.updated,
            removed = r.removed,
            unchanged = r.unchanged,
            errors = r.errors.len() + outcome.issues.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "applied"
        );
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!("installing SIGTERM handler: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
