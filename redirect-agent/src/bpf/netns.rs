//! The sk_lookup program's links, one per meshed network namespace (docs/architecture.md, "Inbound").
//!
//! Pins live next to the cgroup links: `prog_redirect_sk_lookup` is the program, and
//! `link_sk_lookup_<netns inode>` links it into one netns. Like the cgroup links they survive the
//! agent (kill -9 included) and a restart adopts them; `cleanup` removes them with every other
//! `link_` pin. A netns link holds no reference on its netns: when the netns goes away the link
//! goes defunct, and the reconcile releases its pin.
use std::{
    fs,
    os::{
        fd::{AsFd as _, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramInfo, SkLookup, links::FdLink},
};
use redirect_common::inbound::SK_LOOKUP_PROGRAM;
use tracing::{debug, info};

use super::BpfError;
use crate::cgroup::netns_ids;

const LINK_PREFIX: &str = "link_sk_lookup_";

fn prog_pin(dir: &Path) -> PathBuf {
    dir.join(format!("prog_{SK_LOOKUP_PROGRAM}"))
}

fn link_pin(dir: &Path, inode: u64) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{inode}"))
}

fn prog_err(source: aya::programs::ProgramError) -> BpfError {
    BpfError::Program {
        program: SK_LOOKUP_PROGRAM,
        source,
    }
}

/// Loads the sk_lookup program (called by the loader with the other programs, so a verifier
/// rejection stops the start before anything is attached) and pins this instance as the
/// reference of this build's program: a netns link whose program has its tag is adopted. The
/// instance itself is never linked (its netns cookie global is 0).
pub fn load_program(ebpf: &mut Ebpf, dir: &Path) -> Result<(), BpfError> {
    let prog: &mut SkLookup = ebpf
        .program_mut(SK_LOOKUP_PROGRAM)
        .ok_or(prog_err(aya::programs::ProgramError::NotLoaded))?
        .try_into()
        .map_err(prog_err)?;
    prog.load().map_err(prog_err)?;
    let tag = prog.info().map_err(prog_err)?.tag();
    let pin = prog_pin(dir);
    if ProgramInfo::from_pin(&pin).is_ok_and(|p| p.tag() == tag) {
        return Ok(());
    }
    let tmp = dir.join(format!("prog_{SK_LOOKUP_PROGRAM}_new"));
    let _ = fs::remove_file(&tmp);
    prog.pin(&tmp)
        .map_err(|e| BpfError::io("pinning program", &tmp, std::io::Error::other(e)))?;
    fs::rename(&tmp, &pin).map_err(|e| BpfError::io("renaming program pin", &pin, e))
}

/// The inode of a netns file: what names its link.
pub fn netns_inode(netns: &Path) -> Result<u64, BpfError> {
    netns_ids::inode_of(netns).map_err(|e| BpfError::io("opening netns", netns, e))
}

/// True when the pinned link is alive in this very netns (a dead netns's inode may be reused)
/// and runs this build's program (same tag as the pinned reference instance).
fn adoptable(link: &Path, dir: &Path, inode: u64) -> bool {
    let Ok(info) = raw::obj_get(link).and_then(|fd| raw::link_info(&fd)) else {
        return false;
    };
    if u64::from(info.netns_ino) != inode {
        return false;
    }
    let reference = raw::obj_get(&prog_pin(dir)).and_then(|fd| raw::prog_tag(&fd));
    let running = raw::prog_fd_by_id(info.prog_id).and_then(|fd| raw::prog_tag(&fd));
    matches!((reference, running), (Ok(a), Ok(b)) if a == b)
}

/// Links an instance of the program into `netns` (whose inode is `inode`, as the source found
/// it), or adopts the pinned link that already does. The instance carries the netns's cookie as
/// a global (sk_lookup programs cannot ask for it); the maps are the pinned ones. An upgrade
/// links the new instance first and releases the old link after (rename over its pin), so the
/// netns is never without one.
pub fn attach(dir: &Path, netns: &Path, inode: u64, cookie: u64) -> Result<(), BpfError> {
    let pin = link_pin(dir, inode);
    if adoptable(&pin, dir, inode) {
        return Ok(());
    }
    let file = fs::File::open(netns).map_err(|e| BpfError::io("opening netns", netns, e))?;
    // The path may name another namespace by now: never link one under another's pin name.
    if file.metadata().map(|m| m.ino()).ok() != Some(inode) {
        return Err(BpfError::io(
            "linking",
            netns,
            std::io::Error::other(format!("the netns is no longer inode {inode}")),
        ));
    }
    let mut loader = EbpfLoader::new();
    let names: Vec<&str> = super::loader::all_map_names().collect();
    for name in &names {
        loader.map_pin_path(name, dir.join(name));
    }
    loader.override_global("INBOUND_NETNS_COOKIE", &cookie, true);
    let mut ebpf = loader.load(super::loader::OBJECT)?;
    let prog: &mut SkLookup = ebpf
        .program_mut(SK_LOOKUP_PROGRAM)
        .ok_or(prog_err(aya::programs::ProgramError::NotLoaded))?
        .try_into()
        .map_err(prog_err)?;
    prog.load().map_err(prog_err)?;
    let id = prog.attach(&file).map_err(prog_err)?;
    let link: FdLink = prog.take_link(id).map_err(prog_err)?.into();
    let mut tmp = pin.as_os_str().to_owned();
    tmp.push("_new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    link.pin(&tmp)
        .map_err(|e| BpfError::io("pinning link", &tmp, std::io::Error::other(e)))?;
    fs::rename(&tmp, &pin).map_err(|e| BpfError::io("renaming link pin", &pin, e))?;
    info!(netns = %netns.display(), cookie, pin = %pin.display(), "sk_lookup linked");
    Ok(())
}

/// Releases a netns's link (its pin is the last reference).
pub fn release(dir: &Path, inode: u64) {
    let _ = fs::remove_file(link_pin(dir, inode));
}

/// The netns inodes that have a pinned link.
pub fn linked(dir: &Path) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(LINK_PREFIX)?
                .parse()
                .ok()
        })
        .collect()
}

/// The cookie the kernel programs key the netns by (bpf_get_netns_cookie), read now
/// (cgroup/netns_ids.rs; the sources cache it, this is for `explain`).
pub fn netns_cookie(netns: &Path) -> Result<u64, BpfError> {
    let file = fs::File::open(netns).map_err(|e| BpfError::io("opening netns", netns, e))?;
    netns_ids::cookie_of(&file).map_err(|e| BpfError::io("reading the netns cookie of", netns, e))
}

/// Backfills `IN_LISTEN` with the proxy's inbound listener when it was already listening before
/// the sockops program was attached (a proxy started before the agent's first install): such a
/// listener never passed `TCP_LISTEN_CB`, so without this its pod's inbound connections are
/// refused until the proxy listens again. `pids` are the processes to search (the proxy's
/// container cgroup, or the pod's). The listening sockets on `port` in the netns are read from
/// `/proc/PID/net/tcp{,6}`, found among each process's descriptors, taken with pidfd_getfd(2),
/// checked to be in the netns of `cookie`, and inserted under the key the sockops program uses,
/// only where no entry exists (a live entry is the kernel's own, and newer). Returns how many
/// were inserted. Needs CAP_SYS_PTRACE for another user's processes (pidfd_getfd is a ptrace
/// attach-mode access check).
pub fn backfill(dir: &Path, pids: &[u32], cookie: u64, port: u16) -> Result<usize, BpfError> {
    use redirect_common::inbound::{LISTEN_V4, LISTEN_V6, ListenerKey, map_names::IN_LISTEN};
    let Some(listeners) = pids.iter().find_map(|p| listening_inodes(*p, port)) else {
        debug!(?pids, "backfill: no readable TCP tables");
        return Ok(0);
    };
    debug!(?pids, ?listeners, port, "backfill: listeners in the netns");
    if listeners.is_empty() {
        return Ok(0);
    }
    let map_path = dir.join(IN_LISTEN);
    let map = raw::obj_get(&map_path).map_err(|e| BpfError::io("opening", &map_path, e))?;
    let value_size =
        raw::map_value_size(&map).map_err(|e| BpfError::io("reading", &map_path, e))?;
    let mut inserted = 0;
    for pid in pids {
        // The process's descriptors are taken by number with pidfd_getfd and recognised by
        // their inode: listing /proc/PID/fd of another user would need CAP_DAC_READ_SEARCH as
        // well (the directory is mode 0500). Listeners are opened early, so the walk stops
        // once every one is found; FDSize bounds it.
        let Ok(pidfd) = raw::pidfd_open(*pid) else {
            continue;
        };
        let mut left: Vec<(u64, bool)> = listeners.clone();
        for num in 0..fd_table_size(*pid) {
            if left.is_empty() {
                break;
            }
            let sock = match raw::pidfd_getfd(&pidfd, num) {
                Ok(s) => s,
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    return Err(BpfError::io(
                        "taking the listener (pidfd_getfd needs CAP_SYS_PTRACE) of",
                        Path::new(&format!("/proc/{pid}")),
                        e,
                    ));
                }
                // Not open, or the process is gone.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => break,
                Err(_) => continue,
            };
            let Ok(st) = nix::sys::stat::fstat(sock.as_raw_fd()) else {
                continue;
            };
            let Some(at) = left.iter().position(|(i, _)| *i == st.st_ino) else {
                continue;
            };
            let (_, v6) = left.swap_remove(at);
            let theirs = netns_ids::socket_cookie(sock.as_fd());
            if theirs.as_ref().ok() != Some(&cookie) {
                debug!(
                    pid,
                    ?theirs,
                    cookie,
                    "backfill: a listener of another netns"
                );
                continue;
            }
            let key = ListenerKey {
                netns: cookie,
                port,
                family: if v6 { LISTEN_V6 } else { LISTEN_V4 },
                _pad: 0,
            };
            match raw::map_insert_new(&map, &key, sock.as_raw_fd(), value_size) {
                Ok(()) => {
                    info!(
                        pid,
                        port, cookie, v6, "backfilled a listener that predates the agent"
                    );
                    inserted += 1;
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(BpfError::io("inserting the listener into", &map_path, e)),
            }
        }
    }
    Ok(inserted)
}

/// The size of `pid`'s descriptor table (FDSize in /proc/PID/status, readable by anyone).
fn fd_table_size(pid: u32) -> i32 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("FDSize:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(1024)
}

/// The inodes of the TCP sockets listening on `port` in `pid`'s netns, with true for AF_INET6
/// (`/proc/PID/net/tcp6`); None if the tables cannot be read (the process is gone).
fn listening_inodes(pid: u32, port: u16) -> Option<Vec<(u64, bool)>> {
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{file}")).ok()?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let lport = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A"
                && lport == Some(port)
                && let Ok(ino) = inode.parse()
            {
                out.push((ino, v6));
            }
        }
    }
    Some(out)
}

/// The bpf(2) commands for link and program introspection that aya 0.14 does not expose (the
/// netns inode of a netns link, a program's tag by id).
mod raw {
    use std::{
        ffi::CString,
        io,
        os::{
            fd::{AsRawFd, FromRawFd, OwnedFd},
            unix::ffi::OsStrExt as _,
        },
        path::Path,
    };

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a zeroed bpf_attr large enough for every command used here.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr().cast::<libc::c_void>(),
                std::mem::size_of::<[u64; 16]>(),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    fn owned(fd: libc::c_long) -> OwnedFd {
        // SAFETY: the kernel just returned this fd and nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut attr = [0u64; 16];
        attr[0] = c.as_ptr() as u64;
        bpf(BPF_OBJ_GET, &mut attr).map(owned)
    }

    pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(id);
        bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(owned)
    }

    fn info(fd: &OwnedFd, buf: &mut [u8; 256]) -> io::Result<()> {
        // info_by_fd: bpf_fd u32, info_len u32, info u64.
        let mut attr = [0u64; 16];
        attr[0] = (fd.as_raw_fd() as u32 as u64) | ((buf.len() as u64) << 32);
        attr[1] = buf.as_mut_ptr() as u64;
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
    }

    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_NOEXIST: u64 = 1;

    /// struct bpf_map_info: type, id, key_size, value_size (u32 each).
    pub fn map_value_size(fd: &OwnedFd) -> io::Result<u32> {
        let mut buf = [0u8; 256];
        info(fd, &mut buf)?;
        Ok(u32::from_ne_bytes([buf[12], buf[13], buf[14], buf[15]]))
    }

    /// BPF_MAP_UPDATE_ELEM with BPF_NOEXIST of a socket into a SOCKHASH (the value is the fd, as
    /// a u32 or a u64 per the map's value size).
    pub fn map_insert_new<K>(map: &OwnedFd, key: &K, sock: i32, value_size: u32) -> io::Result<()> {
        let value = u64::from(sock as u32);
        let v32 = sock as u32;
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u32 as u64;
        attr[1] = (key as *const K) as u64;
        attr[2] = if value_size == 8 {
            (&value as *const u64) as u64
        } else {
            (&v32 as *const u32) as u64
        };
        attr[3] = BPF_NOEXIST;
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }

    pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open(2) takes a pid and flags; returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(owned(fd))
    }

    /// A duplicate of descriptor `num` of the process behind `pidfd`.
    pub fn pidfd_getfd(pidfd: &OwnedFd, num: i32) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_getfd(2) takes a pidfd, a descriptor number and flags.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), num, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(owned(fd))
    }

    pub struct LinkInfo {
        pub prog_id: u32,
        /// 0 once the netns is gone (the link is defunct).
        pub netns_ino: u32,
    }

    /// struct bpf_link_info: type, id, prog_id (u32 each), then the union at offset 16, whose
    /// netns member starts with netns_ino.
    pub fn link_info(fd: &OwnedFd) -> io::Result<LinkInfo> {
        let mut buf = [0u8; 256];
        info(fd, &mut buf)?;
        let u = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        Ok(LinkInfo {
            prog_id: u(8),
            netns_ino: u(16),
        })
    }

    /// struct bpf_prog_info: type, id (u32 each), then tag[8].
    pub fn prog_tag(fd: &OwnedFd) -> io::Result<[u8; 8]> {
        let mut buf = [0u8; 256];
        info(fd, &mut buf)?;
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&buf[8..16]);
        Ok(tag)
    }
}
