//! The sk_lookup program's links, one per meshed network namespace (docs/architecture.md, "Inbound").
//!
//! Pins live next to the cgroup links: `prog_redirect_sk_lookup` is the program, and
//! `link_sk_lookup_<netns inode>` links it into one netns. Like the cgroup links they survive the
//! agent (kill -9 included) and a restart adopts them; `cleanup` removes them with every other
//! `link_` pin. A netns link holds no reference on its netns: when the netns goes away the link
//! goes defunct, and the reconcile releases its pin.
use std::{
    fs,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramInfo, SkLookup, links::FdLink},
};
use redirect_common::inbound::SK_LOOKUP_PROGRAM;
use tracing::info;

use super::BpfError;

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
    fs::metadata(netns)
        .map(|m| m.ino())
        .map_err(|e| BpfError::io("opening netns", netns, e))
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

/// Links an instance of the program into `netns`, or adopts the pinned link that already does.
/// The instance carries the netns's cookie as a global (sk_lookup programs cannot ask for it);
/// the maps are the pinned ones. Returns the netns inode the link is named by. An upgrade links
/// the new instance first and releases the old link after (rename over its pin), so the netns
/// is never without one.
pub fn attach(dir: &Path, netns: &Path, cookie: u64) -> Result<u64, BpfError> {
    let inode = netns_inode(netns)?;
    let pin = link_pin(dir, inode);
    if adoptable(&pin, dir, inode) {
        return Ok(inode);
    }
    let file = fs::File::open(netns).map_err(|e| BpfError::io("opening netns", netns, e))?;
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
    Ok(inode)
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

const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie the kernel programs key the netns by (bpf_get_netns_cookie): asked with
/// SO_NETNS_COOKIE on a socket made inside the netns, from a short-lived thread that joins it
/// (setns affects only the calling thread).
pub fn netns_cookie(netns: &Path) -> Result<u64, BpfError> {
    let file = fs::File::open(netns).map_err(|e| BpfError::io("opening netns", netns, e))?;
    let joined = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<u64> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let sock = std::net::UdpSocket::bind("127.0.0.1:0")
                .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
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
        })
        .join()
    });
    match joined {
        Ok(r) => r.map_err(|e| BpfError::io("reading the netns cookie of", netns, e)),
        Err(_) => Err(BpfError::io(
            "reading the netns cookie of",
            netns,
            std::io::Error::other("thread panicked"),
        )),
    }
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
