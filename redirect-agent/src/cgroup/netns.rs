//! A pod's network namespace, found from the pod itself (docs/kubernetes.md, "Inbound"): the
//! oldest process in its cgroup subtree (the sandbox's pause process, which the runtime starts
//! before any app or proxy container) → `/proc/<pid>/ns/net`.
//!
//! Event driven, never polled: the pod cgroup's `cgroup.events` is watched with inotify (its
//! `populated` line changes when the first process enters the subtree and when the last one
//! leaves, and each change raises IN_MODIFY), and the chosen process is watched with a pidfd
//! (readable once it exits), so the netns is re-resolved the moment that process goes away.
//!
//! What this needs from the host (proved in tests/tests/capabilities.rs): the host's PID
//! namespace (`hostPID`; from another PID namespace `cgroup.procs` lists every pod process as 0)
//! and CAP_SYS_PTRACE (opening another user's `/proc/<pid>/ns/net` is a ptrace read-access check).
//! The host's own network namespace is never returned: a process there is skipped.
use std::{
    collections::{BTreeSet, HashMap},
    fs,
    os::{
        fd::{AsFd as _, AsRawFd, FromRawFd as _, OwnedFd, RawFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor},
};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::AbortHandle};
use tracing::{debug, error, info};

/// The netns of one pod, as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetns {
    /// The process it was read from.
    pub pid: u32,
    /// `/proc/<pid>/ns/net`.
    pub path: PathBuf,
    /// The netns inode (names its sk_lookup link).
    pub inode: u64,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum NetnsError {
    #[error(
        "{path}: {why} (opening another user's /proc/PID/ns/net needs CAP_SYS_PTRACE)",
        path = .path.display()
    )]
    Access { path: PathBuf, why: String },
    #[error(
        "{} lists processes that are not in this PID namespace (pid 0): the agent needs the host's PID namespace (hostPID: true)",
        .0.display()
    )]
    PidNamespace(PathBuf),
}

/// A process enters its cgroup before it joins the pod's netns (runc's parent writes the pid
/// to cgroup.procs while the child is still in nsexec), and no event follows the setns. So
/// while the subtree holds processes but none of them is in a pod netns yet, the subtree is read
/// again after 5 ms, doubling up to 1 s, for at most [`RETRIES`] times; the next
/// `cgroup.events` change starts over.
const FIRST_RETRY: Duration = Duration::from_millis(5);
const MAX_RETRY: Duration = Duration::from_secs(1);
const RETRIES: u32 = 16;

/// How deep below the pod cgroup processes are looked for (pod/container, and a runtime's
/// sub-cgroup or two).
const MAX_DEPTH: usize = 4;

/// The host's network namespace inodes: pid 1's and the agent's own. A pod process found in one
/// of them is skipped, so an sk_lookup program is never linked into the node's namespace.
pub fn host_netns() -> BTreeSet<u64> {
    ["/proc/1/ns/net", "/proc/self/ns/net"]
        .iter()
        .filter_map(|p| fs::metadata(p).ok().map(|m| m.ino()))
        .collect()
}

/// The pids in `cgroup` and below (cgroup.procs of each directory, depth-limited).
pub fn subtree_pids(cgroup: &Path) -> Result<Vec<u32>, NetnsError> {
    let mut pids = Vec::new();
    let mut dirs = vec![(cgroup.to_path_buf(), 0)];
    let mut invisible = false;
    while let Some((dir, depth)) = dirs.pop() {
        if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
            for p in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if p == 0 {
                    invisible = true;
                } else {
                    pids.push(p);
                }
            }
        }
        if depth < MAX_DEPTH
            && let Ok(entries) = fs::read_dir(&dir)
        {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push((e.path(), depth + 1));
                }
            }
        }
    }
    if pids.is_empty() && invisible {
        return Err(NetnsError::PidNamespace(cgroup.join("cgroup.procs")));
    }
    Ok(pids)
}

/// A process's start time (clock ticks after boot, field 22 of /proc/PID/stat).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The pod's netns from the oldest process of its cgroup subtree that is not in a host netns.
/// Ok(None): no process yet (the sandbox has not started) or only host-netns processes.
pub fn find(cgroup: &Path, host: &BTreeSet<u64>) -> Result<Option<PodNetns>, NetnsError> {
    let mut pids: Vec<(u64, u32)> = subtree_pids(cgroup)?
        .into_iter()
        .filter_map(|p| Some((start_time(p)?, p)))
        .collect();
    pids.sort_unstable();
    let mut denied = None;
    for (_, pid) in pids {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        match fs::metadata(&path) {
            Ok(m) if host.contains(&m.ino()) => {
                debug!(pid, cgroup = %cgroup.display(), "process in the host netns: skipped");
            }
            Ok(m) => {
                return Ok(Some(PodNetns {
                    pid,
                    path,
                    inode: m.ino(),
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                denied.get_or_insert(NetnsError::Access {
                    path,
                    why: e.to_string(),
                });
            }
            // Gone in the meantime.
            Err(_) => {}
        }
    }
    denied.map_or(Ok(None), Err)
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

struct Tracked {
    label: String,
    cgroup: PathBuf,
    wd: Option<WatchDescriptor>,
    found: Result<Option<PodNetns>, NetnsError>,
    /// The pidfd wait on the process the netns was read from, or a pending retry.
    exit: Option<AbortHandle>,
    /// Retries made while the subtree has processes but none in a pod netns yet.
    retries: u32,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(a) = self.exit.take() {
            a.abort();
        }
    }
}

/// The netns of each tracked pod, kept current by inotify on `cgroup.events` and a pidfd on the
/// process it was read from.
pub struct NetnsWatcher {
    fd: AsyncFd<InotifyFd>,
    by_wd: HashMap<WatchDescriptor, String>,
    pods: HashMap<String, Tracked>,
    exits: (
        mpsc::UnboundedSender<String>,
        mpsc::UnboundedReceiver<String>,
    ),
    host: BTreeSet<u64>,
    /// The found namespaces' cookies, read once per namespace (the snapshot resolves through
    /// it, [`crate::reconcile::Snapshot::resolve_netns`]).
    ids: super::netns_ids::NetnsIds,
}

impl NetnsWatcher {
    /// The cookie cache of the tracked pods' namespaces.
    pub fn ids(&mut self) -> &mut super::netns_ids::NetnsIds {
        &mut self.ids
    }

    /// Must be called inside a tokio runtime.
    pub fn new() -> std::io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: `InotifyFd` owns the descriptor and returns that same one until it is dropped
        // with the AsyncFd.
        let fd = unsafe { AsyncFd::register(InotifyFd(inotify)) }.map_err(|e| e.into_parts().1)?;
        Ok(Self {
            fd,
            by_wd: HashMap::new(),
            pods: HashMap::new(),
            exits: mpsc::unbounded_channel(),
            host: host_netns(),
            ids: Default::default(),
        })
    }

    /// Starts tracking pod `uid` (named `label` in logs) in `cgroup`, or follows it to a new
    /// cgroup path, and returns its netns as currently known. The watch is added before the
    /// subtree is read, so a process that starts in between is not missed.
    pub fn track(&mut self, uid: &str, label: &str, cgroup: &Path) -> Option<&PodNetns> {
        let same = self.pods.get(uid).is_some_and(|t| t.cgroup == cgroup);
        if !same {
            self.untrack(uid);
            let wd = self
                .fd
                .get_ref()
                .0
                .add_watch(&cgroup.join("cgroup.events"), AddWatchFlags::IN_MODIFY)
                .map_err(|e| debug!(cgroup = %cgroup.display(), "inotify on cgroup.events: {e}"))
                .ok();
            if let Some(wd) = wd {
                self.by_wd.insert(wd, uid.to_string());
            }
            self.pods.insert(
                uid.to_string(),
                Tracked {
                    label: label.to_string(),
                    cgroup: cgroup.to_path_buf(),
                    wd,
                    found: Ok(None),
                    exit: None,
                    retries: 0,
                },
            );
            self.resolve(uid);
        }
        self.pods.get(uid)?.found.as_ref().ok()?.as_ref()
    }

    /// Stops tracking every pod not in `keep`.
    pub fn retain(&mut self, keep: &BTreeSet<String>) {
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|u| !keep.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            self.untrack(&uid);
        }
    }

    fn untrack(&mut self, uid: &str) {
        if let Some(t) = self.pods.remove(uid)
            && let Some(wd) = t.wd
        {
            self.by_wd.remove(&wd);
            let _ = self.fd.get_ref().0.rm_watch(wd);
        }
    }

    /// Reads the pod's netns again; true if it changed.
    fn resolve(&mut self, uid: &str) -> bool {
        let host = self.host.clone();
        let tx = self.exits.0.clone();
        let Some(t) = self.pods.get_mut(uid) else {
            return false;
        };
        let found = find(&t.cgroup, &host);
        let waiting =
            matches!(found, Ok(None)) && subtree_pids(&t.cgroup).is_ok_and(|p| !p.is_empty());
        if waiting && t.retries < RETRIES {
            // Processes, but none in a pod netns yet: look again shortly (see FIRST_RETRY).
            let delay = FIRST_RETRY
                .saturating_mul(1 << t.retries.min(16))
                .min(MAX_RETRY);
            let uid = uid.to_string();
            t.retries += 1;
            if let Some(a) = t.exit.take() {
                a.abort();
            }
            let task = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(uid);
            });
            t.exit = Some(task.abort_handle());
            return false;
        }
        if found == t.found {
            return false;
        }
        t.retries = 0;
        match &found {
            Ok(Some(n)) => {
                info!(pod = %t.label, pid = n.pid, netns = n.inode, "pod network namespace found")
            }
            Ok(None) => debug!(pod = %t.label, "no process in the pod's cgroup (yet)"),
            Err(e) => {
                error!(pod = %t.label, "pod network namespace not readable, so no inbound interception for it: {e}")
            }
        }
        if let Some(a) = t.exit.take() {
            a.abort();
        }
        if let Ok(Some(n)) = &found {
            let (pid, uid) = (n.pid, uid.to_string());
            let task = tokio::spawn(async move {
                // Readable once the process has exited; a failed open (already gone) re-resolves
                // at once.
                if let Ok(fd) = pidfd_open(pid)
                    // SAFETY: the OwnedFd is moved into the AsyncFd and closed with it.
                    && let Ok(afd) = unsafe {
                        AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
                    }
                {
                    let _ = afd.readable().await;
                }
                let _ = tx.send(uid);
            });
            t.exit = Some(task.abort_handle());
        }
        t.found = found;
        true
    }

    /// Waits until some tracked pod's netns may have changed, re-reads it, and returns the pods
    /// whose netns did change (never empty).
    pub async fn next(&mut self) -> Vec<String> {
        loop {
            let mut uids = BTreeSet::new();
            tokio::select! {
                guard = self.fd.readable() => {
                    let Ok(mut guard) = guard else { continue };
                    match guard.get_inner().0.read_events() {
                        Ok(events) => {
                            for ev in events {
                                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                                    uids.extend(self.pods.keys().cloned());
                                } else if let Some(uid) = self.by_wd.get(&ev.wd) {
                                    uids.insert(uid.clone());
                                    // A populated change: retries start over.
                                    if let Some(t) = self.pods.get_mut(uid) {
                                        t.retries = 0;
                                    }
                                }
                                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                                    self.by_wd.remove(&ev.wd);
                                }
                            }
                        }
                        Err(Errno::EAGAIN) => guard.clear_ready(),
                        Err(e) => debug!("reading cgroup.events inotify: {e}"),
                    }
                }
                Some(uid) = self.exits.1.recv() => { uids.insert(uid); }
            }
            let changed: Vec<String> = uids.into_iter().filter(|u| self.resolve(u)).collect();
            if !changed.is_empty() {
                return changed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_parses() {
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn the_host_netns_is_never_a_pod_netns() {
        let me = std::process::id();
        let host = host_netns();
        let path = PathBuf::from(format!("/proc/{me}/ns/net"));
        let ino = fs::metadata(&path).unwrap().ino();
        assert!(host.contains(&ino));
    }
}
