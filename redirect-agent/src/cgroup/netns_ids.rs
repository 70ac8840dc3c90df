//! What the kernel programs key a workload's network namespace by (its cookie) and what names
//! its sk_lookup link (its inode), resolved by the sources once per namespace instead of by the
//! reconcile on every pass (docs/architecture.md, "Inbound").
//!
//! Reading a cookie means joining the namespace (SO_NETNS_COOKIE on a socket made inside it,
//! from a short-lived thread: setns affects only the calling thread, and needs CAP_SYS_ADMIN),
//! so it is cached by inode. A cache by inode alone would be wrong: once a namespace is freed the
//! kernel may give its inode number to the next one, which would then inherit a dead cookie and
//! its inbound connections would never be steered. So each cached namespace is *held open*
//! while it is cached: as long as the descriptor is open the namespace cannot be freed, and no
//! other namespace can have its inode. A path that stats to a cached inode therefore is that
//! namespace, and its cached cookie is right. [`NetnsIds::retain`] closes the ones no workload
//! names any more, after every snapshot, so a namespace is held only while a workload names it
//! (the Kubernetes source re-resolves a pod's netns when its process exits, cgroup/netns.rs;
//! the file source when a netns file is removed or made, source/watch.rs).
use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
};

/// A network namespace as the kernel programs know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetnsId {
    /// The inode of the namespace (names its sk_lookup link pin).
    pub inode: u64,
    /// bpf_get_netns_cookie's value for it (keys its inbound record and its listeners).
    pub cookie: u64,
}

/// The cache: netns inode → the open namespace, its device (nsfs; a path on another
/// filesystem can have the same inode number) and its cookie.
#[derive(Debug, Default)]
pub struct NetnsIds {
    held: HashMap<u64, (File, u64, u64)>,
    /// Cookies read (setns) since the cache was made: what the cache saves, for tests and logs.
    pub cookie_reads: u64,
}

impl NetnsIds {
    /// The inode and cookie of the namespace at `path`: one stat when it is cached, else an
    /// open and a cookie read. The error says what failed on which path, and which capability
    /// it needs where that is the reason.
    pub fn resolve(&mut self, path: &Path) -> Result<NetnsId, String> {
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("opening netns {}: {}", path.display(), access(e)))?;
        let inode = meta.ino();
        if let Some((_, dev, cookie)) = self.held.get(&inode)
            && *dev == meta.dev()
        {
            return Ok(NetnsId {
                inode,
                cookie: *cookie,
            });
        }
        let file = File::open(path)
            .map_err(|e| format!("opening netns {}: {}", path.display(), access(e)))?;
        // The inode of what was opened, not of what the path named a moment before.
        let meta = file
            .metadata()
            .map_err(|e| format!("opening netns {}: {e}", path.display()))?;
        let cookie = cookie_of(&file)
            .map_err(|e| format!("reading the netns cookie of {}: {e}", path.display()))?;
        self.cookie_reads += 1;
        let inode = meta.ino();
        self.held.insert(inode, (file, meta.dev(), cookie));
        Ok(NetnsId { inode, cookie })
    }

    /// Closes every held namespace whose inode is not in `keep`.
    pub fn retain(&mut self, keep: &BTreeSet<u64>) {
        self.held.retain(|inode, _| keep.contains(inode));
    }

    /// How many namespaces are held open.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// EACCES on another user's /proc/PID/ns/net is a ptrace read-access check.
fn access(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        std::io::Error::other(format!(
            "{e} (another user's /proc/PID/ns/net needs CAP_SYS_PTRACE)"
        ))
    } else {
        e
    }
}

/// The inode of a netns file.
pub fn inode_of(path: &Path) -> std::io::Result<u64> {
    std::fs::metadata(path).map(|m| m.ino()).map_err(access)
}

const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the namespace `netns` (an open netns file), read with SO_NETNS_COOKIE on a
/// socket made inside it by a short-lived thread that joins it.
pub fn cookie_of(netns: &File) -> std::io::Result<u64> {
    let joined = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<u64> {
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                if e == nix::errno::Errno::EPERM {
                    std::io::Error::other("setns: Operation not permitted (joining a network namespace needs CAP_SYS_ADMIN)")
                } else {
                    std::io::Error::from(e)
                }
            })?;
            let sock = std::net::UdpSocket::bind("127.0.0.1:0")
                .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
            // SAFETY: the socket outlives the borrow.
            socket_cookie(unsafe { BorrowedFd::borrow_raw(sock.as_raw_fd()) })
        })
        .join()
    });
    joined.unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
}

/// SO_NETNS_COOKIE of a socket: the cookie of the namespace it was made in.
pub fn socket_cookie(sock: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own namespace: the cookie is read once and then served from the cache, and the
    /// namespace is let go once no snapshot names it.
    #[test]
    fn a_namespace_is_read_once_and_released_when_unnamed() {
        let mut ids = NetnsIds::default();
        let path = Path::new("/proc/self/ns/net");
        let a = ids.resolve(path).unwrap();
        let b = ids.resolve(path).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.cookie, 0);
        assert_eq!(ids.cookie_reads, 1);
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // SAFETY: the socket outlives the borrow.
        let own = socket_cookie(unsafe { BorrowedFd::borrow_raw(sock.as_raw_fd()) }).unwrap();
        assert_eq!(a.cookie, own);
        ids.retain(&BTreeSet::from([a.inode]));
        assert_eq!(ids.len(), 1);
        ids.retain(&BTreeSet::new());
        assert!(ids.is_empty());
    }

    #[test]
    fn a_missing_netns_names_its_path() {
        let e = NetnsIds::default()
            .resolve(Path::new("/run/netns/redirect-test-none"))
            .unwrap_err();
        assert!(
            e.starts_with("opening netns /run/netns/redirect-test-none: "),
            "{e}"
        );
    }
}
