//! One agent per pin directory (DESIGN §3). Two agents on one `--bpffs-dir` would adopt each
//! other's maps, delete each other's workloads and hand out colliding policy ids, so `run` takes
//! an exclusive flock(2) on the pin directory itself before it touches a map.
//!
//! flock rather than a pid file: the kernel drops the lock when the holder dies, however it
//! dies, so a restart after `kill -9` adopts at once with no stale file to judge. The lock is on
//! the directory because bpffs holds no regular files. It is on `--bpffs-dir` itself, never on
//! a layout generation's `gen<N>` sub-directory (bpf/generation.rs), so one lock covers every
//! generation: the agent that builds a new one and releases the old ones is their only writer.
//! Readers (`inspect`, `explain`) take no lock: they only read the pinned maps.
use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "pin directory {dir} is owned by another redirect-agent ({holder}); only one agent may \
         run per --bpffs-dir"
    )]
    Held { dir: PathBuf, holder: String },
    #[error("locking pin directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Held for the life of the agent; the kernel releases it when the process exits or dies.
#[derive(Debug)]
pub struct PinDirLock {
    _lock: Flock<File>,
}

/// Creates `dir` if needed and locks it exclusively, without waiting. A held lock names the pid
/// of the holder (read from /proc/locks).
pub fn lock_pin_dir(dir: &Path) -> Result<PinDirLock, LockError> {
    let io = |source| LockError::Io {
        dir: dir.into(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    // std opens with O_CLOEXEC, so children of the agent never inherit the lock.
    let file = File::open(dir).map_err(io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(PinDirLock { _lock: lock }),
        Err((file, Errno::EWOULDBLOCK)) => {
            let holder = match file.metadata().ok().and_then(|m| holder_pid(&m)) {
                Some(pid) => format!("pid {pid}"),
                None => "pid unknown: not listed in /proc/locks".into(),
            };
            Err(LockError::Held {
                dir: dir.into(),
                holder,
            })
        }
        Err((_, e)) => Err(io(std::io::Error::from(e))),
    }
}

fn holder_pid(meta: &std::fs::Metadata) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    parse_holder(&text, major, minor, meta.ino())
}

/// `/proc/locks` lines read `1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF`: the pid, then
/// major:minor (hex) and inode of the locked file. Waiters (`1: -> FLOCK ...`) are skipped.
fn parse_holder(text: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&"FLOCK") {
            return None;
        }
        let pid: u32 = f.get(4)?.parse().ok()?;
        let mut id = f.get(5)?.split(':');
        let maj = u32::from_str_radix(id.next()?, 16).ok()?;
        let min = u32::from_str_radix(id.next()?, 16).ok()?;
        let inode: u64 = id.next()?.parse().ok()?;
        (maj == major && min == minor && inode == ino).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_holder_and_skips_waiters_and_other_files() {
        let text = "1: POSIX  ADVISORY  WRITE 11 00:2a:99 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 22 00:2b:99 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 4242 00:2a:99 0 EOF\n\
                    3: -> FLOCK  ADVISORY  WRITE 77 00:2a:99 0 EOF\n";
        assert_eq!(parse_holder(text, 0, 0x2a, 99), Some(4242));
        assert_eq!(parse_holder(text, 0, 0x2a, 98), None);
    }

    #[test]
    fn a_second_lock_names_the_holder_and_the_first_is_released_on_drop() {
        let dir = std::env::temp_dir().join(format!("redirect-lock-test-{}", std::process::id()));
        let first = lock_pin_dir(&dir).unwrap();
        let err = lock_pin_dir(&dir).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        drop(first);
        let again = lock_pin_dir(&dir).unwrap();
        drop(again);
        std::fs::remove_dir(&dir).unwrap();
    }
}
