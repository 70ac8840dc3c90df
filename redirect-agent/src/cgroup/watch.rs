//! inotify on the kubepods tree: a pod's cgroup directory is seen the moment the kubelet creates
//! it, so a pod already known from the API is registered before any of its processes can run
//! (docs/architecture.md, "Reconcile rules": no startup race).
//!
//! Only the root and the tree directories (kubepods, QoS) are watched, never pod or container
//! directories. A tree directory is scanned right after its watch is added, so children created
//! in between are not missed; duplicates are dropped by comparing inodes.
use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsFd as _, AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor},
};
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use super::{
    CgroupError,
    discover::{self, Kind, MAX_DEPTH, PodCgroup},
};

/// One change to the pod → cgroup map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A pod directory appeared, or was replaced by a new one (new inode).
    Appeared { uid: String, cgroup: PodCgroup },
    /// A pod directory was removed.
    Gone { uid: String, path: PathBuf },
}

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// A watched tree directory: its path, its depth below the root and whether it is in the tree
/// (the root itself is not).
#[derive(Clone, Debug)]
struct Watched {
    path: PathBuf,
    depth: usize,
    in_tree: bool,
}

pub struct CgroupWatcher {
    fd: AsyncFd<Fd>,
    root: PathBuf,
    watched: HashMap<WatchDescriptor, Watched>,
    pods: BTreeMap<String, PodCgroup>,
}

const MASK: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_ONLYDIR);

fn io_err(path: &Path, e: Errno) -> CgroupError {
    CgroupError::Io {
        path: path.into(),
        source: std::io::Error::from(e),
    }
}

impl CgroupWatcher {
    /// Watches `root` and the kubepods tree below it, and scans what exists already. Must be
    /// called inside a tokio runtime.
    pub fn new(root: &Path) -> Result<Self, CgroupError> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| io_err(root, e))?;
        // SAFETY: `Fd` owns the inotify descriptor and always returns that same descriptor,
        // which stays open until the AsyncFd (and with it the `Fd`) is dropped.
        let fd = unsafe { AsyncFd::register(Fd(inotify)) }.map_err(|e| CgroupError::Io {
            path: root.into(),
            source: e.into_parts().1,
        })?;
        let mut w = Self {
            fd,
            root: root.to_path_buf(),
            watched: HashMap::new(),
            pods: BTreeMap::new(),
        };
        let root_dir = Watched {
            path: root.to_path_buf(),
            depth: 0,
            in_tree: false,
        };
        w.add_watch(&root_dir).map_err(|e| io_err(root, e))?;
        let mut changes = Vec::new();
        w.watch_and_scan(root_dir, &mut changes);
        Ok(w)
    }

    /// The current pod UID → cgroup map.
    pub fn pods(&self) -> &BTreeMap<String, PodCgroup> {
        &self.pods
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The top directories of the kubepods tree (`kubepods.slice`, `kubepods`, kind's
    /// `kubelet-kubepods.slice`), each with its cgroup id: every pod cgroup lies below one. A QoS
    /// directory inside one is not listed (the root covers it).
    pub fn kubepods_roots(&self) -> Vec<PodCgroup> {
        let tops: Vec<&Path> = self
            .watched
            .values()
            .filter(|w| w.in_tree)
            .filter(|w| {
                w.path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.contains("kubepods"))
            })
            .map(|w| w.path.as_path())
            .collect();
        let mut out: Vec<PodCgroup> = tops
            .iter()
            .filter(|p| !tops.iter().any(|q| q != *p && p.starts_with(q)))
            .filter_map(|p| {
                discover::inode(p).map(|ino| PodCgroup {
                    path: p.to_path_buf(),
                    ino,
                })
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// The cgroup of `uid`, probing the tree directly if no inotify event has been read for it
    /// yet (the pod event can overtake the directory's inotify event).
    pub fn lookup(&mut self, uid: &str) -> Option<PodCgroup> {
        if let Some(p) = self.pods.get(uid)
            && discover::inode(&p.path) == Some(p.ino)
        {
            return Some(p.clone());
        }
        let tree: Vec<PathBuf> = self
            .watched
            .values()
            .filter(|w| w.in_tree)
            .map(|w| w.path.clone())
            .collect();
        let found = discover::probe(&tree, uid)?;
        self.pods.insert(uid.to_string(), found.clone());
        Some(found)
    }

    /// Waits for inotify events and returns the resulting changes (never empty).
    pub async fn next(&mut self) -> Result<Vec<Change>, CgroupError> {
        loop {
            let events = {
                let mut guard = self.fd.readable().await.map_err(|source| CgroupError::Io {
                    path: self.root.clone(),
                    source,
                })?;
                match guard.get_inner().0.read_events() {
                    Ok(events) => events,
                    Err(Errno::EAGAIN) => {
                        guard.clear_ready();
                        continue;
                    }
                    Err(e) => return Err(io_err(&self.root, e)),
                }
            };
            let mut changes = Vec::new();
            for ev in events {
                self.handle(ev, &mut changes);
            }
            if !changes.is_empty() {
                return Ok(changes);
            }
        }
    }

    fn handle(&mut self, ev: InotifyEvent, changes: &mut Vec<Change>) {
        if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            warn!(root = %self.root.display(), "inotify queue overflowed; rescanning the cgroup tree");
            self.rescan(changes);
            return;
        }
        if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
            // The watched directory is gone (its pods went with it: rmdir needs it empty).
            self.watched.remove(&ev.wd);
            return;
        }
        if !ev.mask.contains(AddWatchFlags::IN_ISDIR) {
            return;
        }
        let (Some(parent), Some(name)) = (self.watched.get(&ev.wd).cloned(), ev.name) else {
            return;
        };
        let Some(name) = name.to_str().map(str::to_string) else {
            return;
        };
        let created = ev
            .mask
            .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO);
        self.child(&parent, &name, created, changes);
    }

    /// A child directory of a watched directory was created or removed.
    fn child(&mut self, parent: &Watched, name: &str, created: bool, changes: &mut Vec<Change>) {
        let path = parent.path.join(name);
        match discover::classify(name, parent.depth + 1, parent.in_tree) {
            Kind::Pod(uid) if created => {
                if let Some(ino) = discover::inode(&path) {
                    self.found(uid, PodCgroup { path, ino }, changes);
                }
            }
            Kind::Pod(uid) if self.pods.get(&uid).is_some_and(|p| p.path == path) => {
                self.pods.remove(&uid);
                changes.push(Change::Gone { uid, path });
            }
            Kind::Tree if created && parent.depth + 1 < MAX_DEPTH => {
                let dir = Watched {
                    path,
                    depth: parent.depth + 1,
                    in_tree: true,
                };
                if let Err(e) = self.add_watch(&dir) {
                    // Raced with its removal, most likely.
                    debug!(path = %dir.path.display(), "inotify_add_watch: {e}");
                    return;
                }
                self.watch_and_scan(dir, changes);
            }
            _ => {}
        }
    }

    fn found(&mut self, uid: String, cgroup: PodCgroup, changes: &mut Vec<Change>) {
        if self.pods.get(&uid) != Some(&cgroup) {
            self.pods.insert(uid.clone(), cgroup.clone());
            changes.push(Change::Appeared { uid, cgroup });
        }
    }

    fn add_watch(&mut self, dir: &Watched) -> Result<(), Errno> {
        let wd = self.fd.get_ref().0.add_watch(&dir.path, MASK)?;
        self.watched.insert(wd, dir.clone());
        Ok(())
    }

    /// Reads the children of a directory whose watch was just added.
    fn watch_and_scan(&mut self, dir: Watched, changes: &mut Vec<Change>) {
        let Ok(entries) = std::fs::read_dir(&dir.path) else {
            return;
        };
        let names: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        for name in names {
            self.child(&dir, &name, true, changes);
        }
    }

    /// After an overflow: walk the whole tree again and report the difference.
    fn rescan(&mut self, changes: &mut Vec<Change>) {
        let scan = discover::scan(&self.root);
        let gone: Vec<(String, PathBuf)> = self
            .pods
            .iter()
            .filter(|(uid, p)| scan.pods.get(*uid) != Some(p))
            .map(|(uid, p)| (uid.clone(), p.path.clone()))
            .collect();
        for (uid, path) in gone {
            self.pods.remove(&uid);
            changes.push(Change::Gone { uid, path });
        }
        for path in scan.tree {
            let depth = path
                .strip_prefix(&self.root)
                .map(|p| p.components().count())
                .unwrap_or(1);
            let dir = Watched {
                path,
                depth,
                in_tree: true,
            };
            // The same directory gives the same descriptor: re-adding is harmless.
            let _ = self.add_watch(&dir);
        }
        for (uid, cgroup) in scan.pods {
            self.found(uid, cgroup, changes);
        }
    }
}
