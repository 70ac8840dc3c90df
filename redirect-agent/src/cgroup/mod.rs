//! cgroup v2 helpers: where the hierarchy is mounted and how a directory maps to a cgroup id,
//! plus pod cgroup discovery ([`discover`]: pod UID → directory) and its inotify watch ([`watch`]).
pub mod discover;
pub mod netns;
pub mod netns_ids;
pub mod watch;

use std::{
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 mount found in /proc/self/mountinfo")]
    NoCgroup2Mount,
    #[error("{} is not a directory on the cgroup2 filesystem", .0.display())]
    NotCgroup2(PathBuf),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The cgroup2 mount point, read from /proc/self/mountinfo (never hard-coded: nodes use
/// /sys/fs/cgroup, hybrid hosts /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.into(),
        source,
    })?;
    parse_cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2Mount)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    parse_cgroup2_mounts(mountinfo).into_iter().next()
}

fn parse_cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // Fields: id parent major:minor root mountpoint options [optional...] - fstype ...
            let (pre, post) = line.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mountpoint = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape(mountpoint)))
        })
        .collect()
}

/// The cgroup2 mount that `root` lies on: the longest cgroup2 mount point that is a prefix of it.
/// A DaemonSet sees two (its own at /sys/fs/cgroup and the host's bind-mounted elsewhere), and
/// depths and paths must be counted on the one `--cgroup-root` names. Without a root, the first.
pub fn cgroup2_mount_for(root: Option<&Path>) -> Result<PathBuf, CgroupError> {
    let Some(root) = root else {
        return cgroup2_mount();
    };
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.into(),
        source,
    })?;
    mount_for(&text, root).ok_or(CgroupError::NoCgroup2Mount)
}

fn mount_for(mountinfo: &str, root: &Path) -> Option<PathBuf> {
    parse_cgroup2_mounts(mountinfo)
        .into_iter()
        .filter(|m| root.starts_with(m))
        .max_by_key(|m| m.components().count())
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Resolves a configured cgroup path: absolute paths are taken as they are, relative ones are
/// relative to the cgroup2 mount.
pub fn resolve_path(mount: &Path, configured: &Path) -> PathBuf {
    if configured.is_absolute() {
        configured.to_path_buf()
    } else {
        mount.join(configured)
    }
}

/// cgroup2's statfs magic (CGROUP2_SUPER_MAGIC).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cgroup id the kernel reports (bpf_get_current_cgroup_id) is the inode number of the
/// cgroup's directory in the cgroup2 filesystem. Anything else (a regular file, a directory on
/// another filesystem) has an inode number too, which could collide with a real cgroup's id, so
/// it is refused: the path is opened once and both checks are made on that descriptor.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    open_cgroup(path).map(|(_, id)| id)
}

/// The cgroup directory open, and its id.
fn open_cgroup(path: &Path) -> Result<(fs::File, u64), CgroupError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| CgroupError::Io {
        path: path.into(),
        source,
    };
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(io)?;
    let st = nix::sys::statfs::fstatfs(&dir).map_err(|e| io(e.into()))?;
    if st.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotCgroup2(path.into()));
    }
    let id = dir.metadata().map(|m| m.ino()).map_err(io)?;
    Ok((dir, id))
}

/// Why a configured workload cgroup path is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("is not under --cgroup-root {}", .0.display())]
    OutsideRoot(PathBuf),
    #[error("has a `.` or `..` component")]
    NotNormal,
    #[error(
        "is {depth} levels below the cgroup2 root; the datapath walks {max} levels (MAX_CGROUP_DEPTH), \
         so connects from it would never be intercepted"
    )]
    TooDeep { depth: usize, max: u32 },
    #[error("exists but is not a directory on the cgroup2 filesystem")]
    NotCgroup2,
}

/// Checks resolved workload cgroup paths before they are ever registered: under `cgroup_root`
/// (lexically and, once it exists, after resolving symlinks), within the datapath's ancestor
/// walk, and, if it exists, a cgroup2 directory. A path that does not exist yet passes: the
/// workload waits for it.
///
/// The depth is counted from the cgroup2 mount: bpf_get_current_ancestor_cgroup_id numbers
/// levels from the hierarchy's root (level 0), not from the attach root.
///
/// `--cgroup-root` is resolved once, and each path costs one open and three calls on its
/// descriptor (the file source checks every workload of a config on every change, 1,000 of them
/// at node scale).
pub struct PathCheck<'a> {
    mount: &'a Path,
    root: &'a Path,
    real_root: PathBuf,
}

impl<'a> PathCheck<'a> {
    pub fn new(mount: &'a Path, root: &'a Path) -> Self {
        Self {
            mount,
            root,
            real_root: fs::canonicalize(root).unwrap_or_else(|_| root.into()),
        }
    }

    /// The cgroup id of `path` if it exists now; `Ok(None)` if it does not (yet).
    pub fn check(&self, path: &Path) -> Result<Option<u64>, PathError> {
        use std::path::Component;
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(PathError::NotNormal);
        }
        if !path.starts_with(self.root) {
            return Err(PathError::OutsideRoot(self.root.into()));
        }
        let depth = path
            .strip_prefix(self.mount)
            .map(|rel| rel.components().count())
            .map_err(|_| PathError::OutsideRoot(self.root.into()))?;
        if depth > redirect_common::MAX_CGROUP_DEPTH as usize {
            return Err(PathError::TooDeep {
                depth,
                max: redirect_common::MAX_CGROUP_DEPTH,
            });
        }
        match open_cgroup(path) {
            Ok((dir, id)) => {
                // Where the kernel resolved it, symlinks in its parents followed: the
                // descriptor's own path, which is what a canonicalize would find.
                let real = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))
                    .or_else(|_| fs::canonicalize(path))
                    .map_err(|_| PathError::NotCgroup2)?;
                if !real.starts_with(&self.real_root) {
                    return Err(PathError::OutsideRoot(self.root.into()));
                }
                Ok(Some(id))
            }
            Err(CgroupError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(_) => match fs::canonicalize(path) {
                // Not a cgroup2 directory (a file, a symlink, another filesystem); a path that
                // leads out of the root says so first.
                Ok(real) if !real.starts_with(&self.real_root) => {
                    Err(PathError::OutsideRoot(self.root.into()))
                }
                _ => Err(PathError::NotCgroup2),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn picks_the_cgroup2_mount_that_holds_the_root() {
        // A DaemonSet: its own cgroup2 first, the host's bind-mounted below /host.
        let text = "41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                    52 31 0:38 / /host/sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_for(text, Path::new("/host/sys/fs/cgroup/kubepods.slice")),
            Some(PathBuf::from("/host/sys/fs/cgroup"))
        );
        assert_eq!(
            mount_for(text, Path::new("/sys/fs/cgroup/x")),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(mount_for(text, Path::new("/tmp")), None);
    }

    #[test]
    fn finds_cgroup2_with_optional_fields_and_escapes() {
        let text =
            "29 23 0:26 / /sys/fs/my\\040cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/my cgroup"))
        );
    }

    #[test]
    fn paths_outside_the_root_with_dots_or_too_deep_are_refused() {
        let (m, root) = (Path::new("/cg"), Path::new("/cg/kube"));
        let paths = PathCheck::new(m, root);
        let check = |p: &str| paths.check(Path::new(p));
        assert_eq!(check("/cg/kube/a/b"), Ok(None));
        assert_eq!(check("/cg/kube/../../tmp/x"), Err(PathError::NotNormal));
        assert_eq!(check("/cg/other"), Err(PathError::OutsideRoot(root.into())));
        let deep = format!("/cg/kube{}", "/d".repeat(15));
        assert_eq!(check(&deep), Ok(None));
        let deeper = format!("{deep}/d");
        assert_eq!(
            check(&deeper),
            Err(PathError::TooDeep { depth: 17, max: 16 })
        );
    }

    #[test]
    fn a_regular_file_or_a_non_cgroup_directory_has_no_cgroup_id() {
        let file = std::env::temp_dir().join(format!("redirect-cg-{}", std::process::id()));
        fs::write(&file, "x").unwrap();
        assert!(cgroup_id(&file).is_err());
        fs::remove_file(&file).unwrap();
        let err = cgroup_id(&std::env::temp_dir()).unwrap_err();
        assert!(matches!(err, CgroupError::NotCgroup2(_)), "{err}");
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
