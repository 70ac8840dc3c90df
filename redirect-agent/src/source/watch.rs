//! Follows the standalone config file and sends a snapshot whenever its content changes.
//!
//! Polling the bytes (every 200 ms) rather than inotify keeps this correct for editors that
//! replace the file and for Kubernetes ConfigMap mounts, whose symlink swap inotify on the file
//! would miss; it is far inside the one-second budget and costs one small read per tick.
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tracing::{error, info};

use super::file::FileConfig;
use crate::reconcile::Snapshot;

pub const POLL: Duration = Duration::from_millis(200);
/// While some workload's cgroup does not exist yet, the last snapshot is resent this often.
pub const RETRY: Duration = Duration::from_secs(1);

pub async fn follow_file(
    path: PathBuf,
    cgroup_mount: PathBuf,
    tx: mpsc::UnboundedSender<Snapshot>,
    pending: Arc<AtomicBool>,
) {
    let mut last_bytes: Option<Vec<u8>> = None;
    let mut last_good: Option<Snapshot> = None;
    let mut since_retry = Duration::ZERO;
    loop {
        match tokio::fs::read(&path).await {
            Ok(bytes) if last_bytes.as_ref() != Some(&bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                match FileConfig::parse(&path, &text) {
                    Ok(config) => {
                        info!(path = %path.display(), workloads = config.workloads.len(), "config loaded");
                        let snap = config.snapshot(&cgroup_mount);
                        if tx.send(snap.clone()).is_err() {
                            return;
                        }
                        last_good = Some(snap);
                    }
                    Err(e) => error!("{e}; keeping the applied state"),
                }
                last_bytes = Some(bytes);
                since_retry = Duration::ZERO;
            }
            Ok(_) => {}
            Err(e) => {
                if last_bytes.is_some() {
                    error!(path = %path.display(), "reading config: {e}; keeping the applied state");
                    last_bytes = None;
                }
            }
        }
        tokio::time::sleep(POLL).await;
        since_retry += POLL;
        if since_retry >= RETRY && pending.load(Ordering::Relaxed) {
            since_retry = Duration::ZERO;
            if let Some(snap) = &mut last_good {
                // The cgroups may have appeared since: look their ids up again.
                snap.resolve_cgroups();
                if tx.send(snap.clone()).is_err() {
                    return;
                }
            }
        }
    }
}
