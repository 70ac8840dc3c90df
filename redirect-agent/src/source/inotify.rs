//! A small async inotify: directories watched for events about some of their entries. The file
//! source uses one for the config file's directory and one for the parents of the registered
//! cgroup paths.
use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    os::fd::{AsFd as _, AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor},
};
use tokio::io::unix::AsyncFd;

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// What happened to a watched entry, reduced to what the sources act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The entry was written to and is maybe still open for writing.
    Modified,
    /// The entry was closed after writing, created, renamed, removed or changed its attributes:
    /// its content is what its writer meant, as far as the kernel can tell.
    Settled,
    /// A watched directory went away, or events were lost: everything may have changed.
    Lost,
}

pub struct Watcher {
    fd: AsyncFd<Fd>,
    mask: AddWatchFlags,
    /// Watched directory → the entry names of interest (empty: every entry).
    dirs: HashMap<WatchDescriptor, (PathBuf, HashSet<OsString>)>,
}

impl Watcher {
    /// Must be called inside a tokio runtime.
    pub fn new(mask: AddWatchFlags) -> std::io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: `Fd` owns the inotify descriptor and always returns that same descriptor,
        // which stays open until the AsyncFd (and with it the `Fd`) is dropped.
        let fd = unsafe { AsyncFd::register(Fd(inotify)) }.map_err(|e| e.into_parts().1)?;
        Ok(Self {
            fd,
            mask,
            dirs: HashMap::new(),
        })
    }

    /// Replaces the watched set: each directory with the entry names of interest (no names:
    /// any entry). Directories that cannot be watched (gone) are skipped. True if a directory is
    /// watched now that was not before (what changed in it before now was not seen).
    pub fn set(&mut self, wanted: HashMap<PathBuf, HashSet<OsString>>) -> bool {
        let ino = self.fd.get_ref();
        let mut next = HashMap::new();
        for (dir, names) in wanted {
            // Watching a directory twice returns the same descriptor (and replaces the mask).
            if let Ok(wd) = ino.0.add_watch(&dir, self.mask) {
                next.insert(wd, (dir, names));
            }
        }
        for wd in self.dirs.keys() {
            if !next.contains_key(wd) {
                let _ = ino.0.rm_watch(*wd);
            }
        }
        let added = next.keys().any(|wd| !self.dirs.contains_key(wd));
        self.dirs = next;
        added
    }

    /// Waits for the next batch of events and returns those of interest (maybe none).
    pub async fn next(&mut self) -> std::io::Result<Vec<(PathBuf, Event)>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.get_inner().0.read_events() {
                Ok(events) => return Ok(self.classify(events)),
                Err(Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn classify(&mut self, events: Vec<InotifyEvent>) -> Vec<(PathBuf, Event)> {
        let mut out = Vec::new();
        for ev in events {
            if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                out.push((PathBuf::new(), Event::Lost));
                continue;
            }
            let Some((dir, names)) = self.dirs.get(&ev.wd) else {
                continue;
            };
            if ev
                .mask
                .intersects(AddWatchFlags::IN_IGNORED | AddWatchFlags::IN_DELETE_SELF)
            {
                out.push((dir.clone(), Event::Lost));
                self.dirs.remove(&ev.wd);
                continue;
            }
            let Some(name) = ev.name else { continue };
            if !names.is_empty() && !names.contains(&name) {
                continue;
            }
            let kind = if ev.mask.contains(AddWatchFlags::IN_MODIFY) {
                Event::Modified
            } else {
                Event::Settled
            };
            out.push((dir.join(name), kind));
        }
        out
    }
}

/// The directory to watch for `path` to appear or change: its parent, or the nearest ancestor
/// that exists if the parent does not (yet).
pub fn watch_point(path: &Path) -> Option<(PathBuf, OsString)> {
    let mut child = path;
    let mut dir = path.parent()?;
    loop {
        if dir.is_dir() {
            return Some((dir.to_path_buf(), child.file_name()?.to_os_string()));
        }
        child = dir;
        dir = dir.parent()?;
    }
}
