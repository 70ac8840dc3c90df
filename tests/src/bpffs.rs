//! bpffs helpers: make sure /sys/fs/bpf is a bpf filesystem, and remove pin directories.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::{MsFlags, mount};

use crate::cgroup::mounts;

/// Where bpffs is (or gets) mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

fn bpffs_mounted() -> Result<bool> {
    Ok(mounts()?
        .iter()
        .any(|m| m.mount_point == Path::new(BPFFS) && m.fstype == "bpf"))
}

/// Mounts bpffs at /sys/fs/bpf unless it already is. Returns the mount point.
///
/// Several test binaries may run at once; two unsynchronised mounts would stack, and the upper
/// one would hide pins the first binary already made. So check-and-mount runs under an flock.
pub fn ensure_bpffs() -> Result<PathBuf> {
    if bpffs_mounted()? {
        return Ok(PathBuf::from(BPFFS));
    }
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/redirect-tests-bpffs.lock")
        .context("opening bpffs lock file")?;
    // SAFETY: flock(2) on an fd we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error()).context("flock bpffs lock");
    }
    if !bpffs_mounted()? {
        fs::create_dir_all(BPFFS).with_context(|| format!("mkdir {BPFFS}"))?;
        mount(
            Some("bpffs"),
            BPFFS,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting bpffs at {BPFFS}"))?;
    }
    Ok(PathBuf::from(BPFFS))
}

/// Removes a pin directory and everything pinned below it. bpffs supports unlink and rmdir;
/// unlinking a pin only drops that reference (a link/program still attached elsewhere is
/// released when its last reference goes).
pub(crate) fn remove_pin_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing pin dir {}", dir.display())),
    }
}
