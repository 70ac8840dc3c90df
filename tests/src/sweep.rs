//! Naming of fixture resources, and removal of leftovers from test runs that crashed before
//! their `Drop` could run (SIGKILL, abort, power loss).

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;

use crate::bpffs::{BPFFS, remove_pin_dir};
use crate::cgroup::{cgroup2_mount, destroy_subtree};
use crate::netns::{NETNS_DIR, delete};

/// Every fixture resource (cgroup dir, netns, pin dir) is named `redirect-test-<name>-<pid>-<n>`.
pub const PREFIX: &str = "redirect-test-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh resource name for this process. The test name is sanitised and shortened so that the
/// result is a valid file, cgroup and netns name.
pub(crate) fn make_name(test_name: &str) -> String {
    let clean: String = test_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{clean}-{}-{n}", std::process::id())
}

/// The pid that created a resource, parsed from the end of its name (test names may themselves
/// contain '-').
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.rsplitn(3, '-');
    let counter = parts.next()?;
    let pid = parts.next()?;
    parts.next()?;
    counter.parse::<u64>().ok()?;
    pid.parse().ok()
}

fn is_stale(name: &str) -> bool {
    match owner_pid(name) {
        Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
        // Named like ours but unparsable: not something we can judge, leave it.
        None => false,
    }
}

fn stale_entries(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX) && is_stale(n))
        .collect()
}

/// Removes cgroup subtrees, netns and pin dirs named `redirect-test-*` whose creating process is
/// gone. Resources of live processes (for example another test binary running concurrently) are
/// left alone. Returns what was removed; errors on individual items are reported, not fatal.
pub fn sweep_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    let cg_root = cgroup2_mount()?;
    for name in stale_entries(&cg_root) {
        let dir = cg_root.join(&name);
        match destroy_subtree(&dir, &cg_root) {
            Ok(()) => removed.push(dir.display().to_string()),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    for name in stale_entries(Path::new(NETNS_DIR)) {
        match delete(&name) {
            Ok(()) => removed.push(format!("netns {name}")),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    for name in stale_entries(Path::new(BPFFS)) {
        let dir = Path::new(BPFFS).join(&name);
        match remove_pin_dir(&dir) {
            Ok(()) => removed.push(dir.display().to_string()),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    for e in &errors {
        eprintln!("redirect-tests: sweep_stale: {e}");
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let n = make_name("two words/and-dash");
        assert!(n.starts_with("redirect-test-two_words_and-dash-"));
        assert_eq!(owner_pid(&n), Some(std::process::id()));
        assert_eq!(owner_pid("redirect-test-x-123-7"), Some(123));
        assert_eq!(owner_pid("redirect-test-123-7"), None);
        assert_eq!(owner_pid("redirect-test-x-abc-7"), None);
        assert_eq!(owner_pid("other-x-1-2"), None);
    }
}
