//! cgroup v2 helpers: finding the mount, cgroup ids, and tearing a subtree down.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// One parsed line of /proc/self/mountinfo (only the fields we use).
pub(crate) struct MountEntry {
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
}

/// Undoes the octal escaping (`\040` for space, ...) that the kernel applies to mountinfo paths.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/self/mountinfo. The optional fields before " - " vary in number, so the
/// filesystem type is taken from after the separator rather than by fixed index.
pub(crate) fn mounts() -> Result<Vec<MountEntry>> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let Some(fstype) = post.split(' ').next() else {
            continue;
        };
        if pre.len() < 5 {
            continue;
        }
        out.push(MountEntry {
            root: unescape_mountinfo(pre[3]),
            mount_point: PathBuf::from(unescape_mountinfo(pre[4])),
            fstype: fstype.to_string(),
        });
    }
    Ok(out)
}

/// The cgroup v2 mount point, read from /proc/self/mountinfo (`/sys/fs/cgroup/unified` on hybrid
/// hosts, `/sys/fs/cgroup` on pure v2 hosts). Never hard-coded
/// (docs/architecture.md, "Where the programs attach").
pub fn cgroup2_mount() -> Result<PathBuf> {
    let all = mounts()?;
    // Prefer a mount of the hierarchy root: a bind mount of a sub-cgroup would give paths that do
    // not match /proc/<pid>/cgroup.
    all.iter()
        .filter(|m| m.fstype == "cgroup2")
        .min_by_key(|m| m.root != "/")
        .map(|m| m.mount_point.clone())
        .context("no cgroup2 mount in /proc/self/mountinfo")
}

/// The cgroup id of a cgroup v2 directory: its inode number, which is what
/// `bpf_get_current_cgroup_id` / `bpf_get_current_ancestor_cgroup_id` return.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// Absolute path of the cgroup v2 directory that `pid` is in (from the `0::` line of
/// `/proc/<pid>/cgroup`).
pub fn cgroup_of(pid: u32) -> Result<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .with_context(|| format!("no cgroup v2 line in /proc/{pid}/cgroup"))?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// Moves a whole process into `cgroup`.
pub fn move_pid(pid: u32, cgroup: &Path) -> Result<()> {
    fs::write(cgroup.join("cgroup.procs"), format!("{pid}\n"))
        .with_context(|| format!("moving pid {pid} to {}", cgroup.display()))
}

/// All cgroup directories of a subtree, parents before children.
pub(crate) fn subtree_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// Pids of all processes anywhere in the subtree.
pub(crate) fn subtree_procs(root: &Path) -> Vec<u32> {
    subtree_dirs(root)
        .iter()
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses, so fields are counted after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// This process and its ancestors: processes a teardown must move out rather than kill.
fn self_and_ancestors() -> HashSet<u32> {
    let mut set = HashSet::new();
    let mut pid = std::process::id();
    while pid > 1 && set.insert(pid) {
        match parent_pid(pid) {
            Some(p) => pid = p,
            None => break,
        }
    }
    set
}

fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Tears a cgroup subtree down so that it can be removed.
///
/// The test process itself (or an ancestor, if a test moved one in) is moved to `evacuate_to`
/// (falling back to the cgroup2 root), because killing it would kill the test run. Every other
/// process in the subtree is a test artifact (spawned helpers and whatever they forked, including
/// orphans), so it is killed: moving those out would leak running processes into the host.
/// Then the directories are removed bottom-up.
pub(crate) fn destroy_subtree(root: &Path, evacuate_to: &Path) -> Result<()> {
    if !root.exists() {
        return Ok(());
    }
    let keep = self_and_ancestors();
    let mount = cgroup2_mount().ok();
    for pid in subtree_procs(root) {
        if keep.contains(&pid) {
            let moved = move_pid(pid, evacuate_to);
            if moved.is_err()
                && let Some(m) = &mount
            {
                let _ = move_pid(pid, m);
            }
        }
    }
    kill_subtree(root);
    wait_unpopulated(root, Duration::from_secs(10));
    let mut dirs = subtree_dirs(root);
    dirs.reverse();
    let mut last_err = None;
    for d in dirs {
        if let Err(e) = rmdir_retry(&d) {
            last_err = Some(e);
        }
    }
    match last_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// SIGKILLs everything in the subtree. `cgroup.kill` (Linux 5.14+) is race-free against forks;
/// the per-pid loop is the fallback for older kernels.
fn kill_subtree(root: &Path) {
    if fs::write(root.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for _ in 0..5 {
        let pids = subtree_procs(root);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: plain kill(2) on a pid read from our own test cgroup.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn wait_unpopulated(root: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while populated(root) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
}

/// rmdir with a short retry: right after the last task exits the kernel may briefly still
/// report the cgroup busy.
fn rmdir_retry(dir: &Path) -> Result<()> {
    let mut tries = 0;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(_) if tries < 50 => {
                tries += 1;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => bail!("rmdir {}: {e}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }
}
