//! Network namespace helpers built on iproute2 (`ip netns add` gives the same `/run/netns/<name>`
//! bind mount every other tool understands) and setns(2).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Path of a named netns handle.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Runs `ip ARGS...` and turns a non-zero exit into an error carrying ip's stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates a named netns with `lo` up, so that loopback and addresses put on `lo` work at once.
pub(crate) fn create(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Deletes a named netns. The namespace itself lives on while sockets or processes still hold it,
/// but it is no longer reachable by name.
pub(crate) fn delete(name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "delete", name])
}

/// Adds an address (CIDR) to `lo` in the netns. IPv6 needs `nodad`: otherwise the address stays
/// "tentative" for about a second and binds to it fail with EADDRNOTAVAIL.
pub(crate) fn add_addr(name: &str, cidr: &str) -> Result<()> {
    let mut args = vec!["-n", name, "addr", "add", cidr, "dev", "lo"];
    if cidr.contains(':') {
        args.push("nodad");
    }
    ip(&args)
}

/// Moves the calling thread into the netns. The network namespace is per-thread, so this only
/// affects the thread it runs on; sockets created afterwards belong to the netns for good.
pub fn enter_current_thread(netns: &File) -> Result<()> {
    setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")
}
