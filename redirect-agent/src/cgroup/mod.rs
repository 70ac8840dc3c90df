//! cgroup v2 helpers: where the hierarchy is mounted and how a directory maps to a cgroup id,
//! plus pod cgroup discovery ([`discover`]: pod UID → directory) and its inotify watch ([`watch`]).
pub mod discover;
pub mod watch;

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 mount found in /proc/self/mountinfo")]
    NoCgroup2Mount,
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
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint options [optional...] - fstype source opts
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        let mountpoint = pre.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mountpoint)))
    })
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

/// The cgroup id the kernel reports (bpf_get_current_cgroup_id) is the inode number of the
/// cgroup's directory in the cgroup2 filesystem.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Io {
            path: path.into(),
            source,
        })
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
    fn finds_cgroup2_with_optional_fields_and_escapes() {
        let text =
            "29 23 0:26 / /sys/fs/my\\040cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/my cgroup"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
