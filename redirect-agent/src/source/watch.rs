//! Follows the standalone config file and sends a snapshot whenever its content changes, and
//! whenever a registered cgroup path is removed or created again.
//!
//! **When a change is applied.** The file's directory is watched with inotify (the parent, so
//! that an editor's or a ConfigMap's rename-into-place is seen as well as an in-place write).
//! The file is read
//! - [`SETTLE`] after its writer closes it or after it is renamed, created or removed, and
//! - after it has been unchanged for [`STABLE`] while a writer still holds it open;
//!
//! a fallback poll every [`POLL`] applies a change once two reads agree (for filesystems without
//! inotify, or a symlink to a file elsewhere). So a file is never applied in the middle of a
//! write that keeps it open, and a half-written file that does not parse, or that drops the
//! `workloads` key, is refused and changes nothing (see `file.rs`). Replacing the file atomically
//! (write a temporary file, then rename it over the config) is always safe.
//!
//! **Registered cgroups.** A cgroup removed and recreated at the same path gets a new inode,
//! which is its new cgroup id. The parents of every configured cgroup path are watched, and any
//! create, remove or rename of one of those entries resends the last good snapshot, so the new
//! inode is registered and the stale key removed within milliseconds.
use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use nix::sys::inotify::AddWatchFlags;
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tracing::{debug, error, info, warn};

use super::{
    file::{FileConfig, read_config},
    inotify::{Event, Watcher, watch_point},
};
use crate::{cgroup::netns_ids::NetnsIds, reconcile::Snapshot};

/// How long after its writer closed (or renamed) the file it is read: lets a burst of events
/// from one save end first.
pub const SETTLE: Duration = Duration::from_millis(10);
/// A file still open for writing is read once it has not changed for this long.
pub const STABLE: Duration = Duration::from_secs(1);
/// The fallback poll.
pub const POLL: Duration = Duration::from_secs(2);
/// While some workload's cgroup does not exist yet, the last snapshot is resent this often.
pub const RETRY: Duration = Duration::from_secs(1);

const FILE_MASK: AddWatchFlags = AddWatchFlags::IN_MODIFY
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

const CGROUP_MASK: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

pub struct FileSource {
    pub path: PathBuf,
    pub cgroup_mount: PathBuf,
    pub cgroup_root: PathBuf,
    pub tx: mpsc::UnboundedSender<Snapshot>,
    /// Set by the owner while some workload's cgroup does not exist.
    pub pending: Arc<AtomicBool>,
    /// Notified on SIGHUP: read the file now.
    pub reread: Arc<Notify>,
    /// `--inbound`: false drops every workload's `netns`, with a warning naming each
    /// ([`super::file::without_inbound`]).
    pub inbound: bool,
}

/// Where the file stands between reads.
struct Dirty {
    since: Instant,
    /// The last event said the write is over (close, rename, create, remove).
    settled: bool,
}

struct State {
    last_bytes: Option<Vec<u8>>,
    /// The previous fallback poll's read, applied only once a second read agrees.
    polled: Option<Vec<u8>>,
    last_good: Option<Snapshot>,
    dirty: Option<Dirty>,
    /// The last read error logged.
    last_error: Option<String>,
    /// The workloads' netns cookies, read once per namespace (cgroup/netns_ids.rs).
    netns_ids: NetnsIds,
}

pub async fn follow_file(src: FileSource) {
    let mut files = match Watcher::new(FILE_MASK) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!("inotify unavailable ({e}); polling the config every {POLL:?}");
            None
        }
    };
    let mut cgroups = Watcher::new(CGROUP_MASK)
        .map_err(|e| {
            warn!("inotify unavailable ({e}); recreated cgroups are seen on file changes only")
        })
        .ok();
    let mut st = State {
        last_bytes: None,
        polled: None,
        last_good: None,
        dirty: None,
        last_error: None,
        netns_ids: NetnsIds::default(),
    };
    if let Some(w) = files.as_mut() {
        w.set(config_dirs(&src.path));
    }
    if !src.read_and_send(&mut st, cgroups.as_mut(), true).await {
        return;
    }
    let mut next_poll = Instant::now() + POLL;
    let mut next_retry = Instant::now() + RETRY;
    loop {
        let read_at = st
            .dirty
            .as_ref()
            .map(|d| d.since + if d.settled { SETTLE } else { STABLE });
        let wake = [Some(next_poll), Some(next_retry), read_at]
            .into_iter()
            .flatten()
            .min()
            .expect("poll is always set");
        tokio::select! {
            events = next_events(&mut files) => {
                for (_, ev) in events {
                    let settled = ev != Event::Modified;
                    st.dirty = Some(Dirty { since: Instant::now(), settled });
                }
            }
            events = next_events(&mut cgroups) => {
                if !events.is_empty() {
                    debug!(?events, "a registered cgroup path changed; resending the snapshot");
                    if !src.resend(&mut st, cgroups.as_mut()) {
                        return;
                    }
                }
            }
            _ = src.reread.notified() => {
                info!(path = %src.path.display(), "SIGHUP: re-reading the config");
                st.last_bytes = None;
                st.dirty = Some(Dirty { since: Instant::now() - SETTLE, settled: true });
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if read_at.is_some_and(|t| t <= now) {
                    st.dirty = None;
                    if let Some(w) = files.as_mut() {
                        // A ConfigMap swap replaces the directories a symlink points through.
                        w.set(config_dirs(&src.path));
                    }
                    if !src.read_and_send(&mut st, cgroups.as_mut(), true).await {
                        return;
                    }
                }
                if next_poll <= now {
                    next_poll = now + POLL;
                    if !src.read_and_send(&mut st, cgroups.as_mut(), false).await {
                        return;
                    }
                }
                if next_retry <= now {
                    next_retry = now + RETRY;
                    if src.pending.load(Ordering::Relaxed) && !src.resend(&mut st, cgroups.as_mut()) {
                        return;
                    }
                }
            }
        }
    }
}

/// Events of a watcher, or never if there is none.
async fn next_events(w: &mut Option<Watcher>) -> Vec<(PathBuf, Event)> {
    match w {
        Some(w) => match w.next().await {
            Ok(events) => events,
            Err(e) => {
                error!("reading inotify events: {e}");
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// The config's directory, and the directory of the file it resolves to if it is a symlink.
fn config_dirs(path: &Path) -> HashMap<PathBuf, HashSet<OsString>> {
    let mut dirs: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
    if let Some((dir, name)) = watch_point(path) {
        // A ConfigMap mount renames `..data` rather than the file itself: the directory's own
        // entries matter too, so no name filter when the config is a symlink.
        let names = if path.is_symlink() {
            HashSet::new()
        } else {
            HashSet::from([name])
        };
        dirs.insert(dir, names);
    }
    if let Ok(real) = std::fs::canonicalize(path)
        && real != path
        && let Some((dir, name)) = watch_point(&real)
    {
        dirs.entry(dir).or_default().insert(name);
    }
    dirs
}

impl FileSource {
    /// Reads the file and, if its bytes changed, parses, checks and sends it. `settled` is false
    /// for the fallback poll, which applies a change only once two polls read the same bytes.
    /// False when the receiver is gone.
    async fn read_and_send(
        &self,
        st: &mut State,
        cgroups: Option<&mut Watcher>,
        settled: bool,
    ) -> bool {
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || read_config(&path))
            .await
            .expect("reading the config does not panic");
        let bytes = match read {
            Ok(b) => b,
            Err(e) => {
                // Once per distinct error, not on every poll.
                let msg = e.to_string();
                if st.last_error.as_ref() != Some(&msg) {
                    error!("{msg}; keeping the applied state");
                    st.last_error = Some(msg);
                }
                st.last_bytes = None;
                return true;
            }
        };
        st.last_error = None;
        if st.last_bytes.as_ref() == Some(&bytes) {
            st.polled = None;
            return true;
        }
        if !settled && st.polled.as_ref() != Some(&bytes) {
            st.polled = Some(bytes);
            return true;
        }
        st.polled = None;
        let (path, mount, root) = (
            self.path.clone(),
            self.cgroup_mount.clone(),
            self.cgroup_root.clone(),
        );
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let parsed = tokio::task::spawn_blocking(move || {
            let config = FileConfig::parse(&path, &text)?;
            let ids = config.check_paths(&path, &mount, &root)?;
            Ok::<_, super::file::ConfigError>((config, ids))
        })
        .await
        .expect("parsing the config does not panic");
        st.last_bytes = Some(bytes);
        match parsed {
            Ok((config, ids)) => {
                info!(path = %self.path.display(), workloads = config.workloads.len(), "config loaded");
                // Built here, not on the blocking thread that parsed: what is kept is then not
                // allocated among the parse's garbage (which pinned that thread's heap pages).
                let mut snapshot = config.snapshot_with(&self.cgroup_mount, ids);
                drop(config);
                if !self.inbound {
                    for w in super::file::without_inbound(&mut snapshot) {
                        warn!("{w}");
                    }
                }
                // An unchanged mesh config keeps its `Arc`: the reconcile then sees it unchanged
                // by pointer, without comparing it (reconcile/desired.rs, `Memo::begin`).
                if let Some(last) = &st.last_good
                    && last.mesh == snapshot.mesh
                {
                    snapshot.mesh = last.mesh.clone();
                }
                // The ids were looked up just now (check_paths): sent as they are, unless a
                // directory was not watched before (`send`).
                self.send(st, cgroups, snapshot)
            }
            Err(e) => {
                error!("{e}; keeping the applied state");
                true
            }
        }
    }

    /// Sends the last good snapshot again, its cgroup ids looked up again: a cgroup may have
    /// appeared, or been recreated with a new inode, since.
    fn resend(&self, st: &mut State, cgroups: Option<&mut Watcher>) -> bool {
        let Some(snap) = &st.last_good else {
            return true;
        };
        let mut snap = snap.clone();
        snap.resolve_cgroups();
        self.send(st, cgroups, snap)
    }

    /// Sends `snap` (its cgroup ids resolved) as the last good snapshot, and re-arms the cgroup
    /// watches on its paths. A parent directory watched only from now on may have seen a cgroup
    /// recreated after the ids were read, with no event: its ids are read again, after the watch.
    fn send(&self, st: &mut State, cgroups: Option<&mut Watcher>, mut snap: Snapshot) -> bool {
        if let Some(w) = cgroups
            && w.set(cgroup_dirs(&snap))
        {
            snap.resolve_cgroups();
        }
        snap.resolve_netns(&mut st.netns_ids);
        st.last_good = Some(snap.clone());
        self.tx.send(snap).is_ok()
    }
}

/// The parents of every workload and proxy cgroup path, each with the entries of interest, and
/// of every netns file (`ip netns del` and `add` remove and make it, so a namespace replaced
/// under the same name is resolved again at once; /proc has no inotify).
fn cgroup_dirs(snap: &Snapshot) -> HashMap<PathBuf, HashSet<OsString>> {
    let mut dirs: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
    let netns = snap
        .workloads
        .iter()
        .filter_map(|w| w.netns.as_ref())
        .filter(|p| !p.starts_with("/proc"));
    let paths = snap
        .workloads
        .iter()
        .flat_map(|w| std::iter::once(&w.cgroup).chain(w.proxy_cgroup.as_ref()))
        .chain(netns);
    for p in paths {
        if let Some((dir, name)) = watch_point(p) {
            dirs.entry(dir).or_default().insert(name);
        }
    }
    dirs
}
