//! The sk_lookup program's links, one per meshed network namespace (DESIGN §2 "Inbound").
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
    Ebpf,
    programs::{ProgramInfo, SkLookup, links::FdLink, links::PinnedLink},
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

/// Loads the sk_lookup program (called by the loader with the other programs) and pins it,
/// unless the pinned one is this very program (same tag): then existing netns links keep
/// running it and are adopted as they are.
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

/// True when the pinned link runs the pinned program and its netns still exists.
fn adoptable(link: &Path, dir: &Path) -> bool {
    let Ok(link) = PinnedLink::from_pin(link) else {
        return false;
    };
    let link: FdLink = link.into();
    let Ok(prog_id) = link.info().map(|i| i.program_id()) else {
        return false;
    };
    ProgramInfo::from_pin(prog_pin(dir)).is_ok_and(|p| p.id() == prog_id)
}

/// Links the program into `netns` (adopting a pinned link that already does). Returns the
/// netns inode the link is named by. A new program (upgrade) is linked first and the old link
/// released after, so the netns is never without one.
pub fn attach(dir: &Path, netns: &Path) -> Result<u64, BpfError> {
    let inode = netns_inode(netns)?;
    let pin = link_pin(dir, inode);
    if adoptable(&pin, dir) {
        return Ok(inode);
    }
    let file = fs::File::open(netns).map_err(|e| BpfError::io("opening netns", netns, e))?;
    let mut prog = SkLookup::from_pin(prog_pin(dir)).map_err(prog_err)?;
    let id = prog.attach(&file).map_err(prog_err)?;
    let link: FdLink = prog.take_link(id).map_err(prog_err)?.into();
    let mut tmp = pin.as_os_str().to_owned();
    tmp.push("_new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    link.pin(&tmp)
        .map_err(|e| BpfError::io("pinning link", &tmp, std::io::Error::other(e)))?;
    fs::rename(&tmp, &pin).map_err(|e| BpfError::io("renaming link pin", &pin, e))?;
    info!(netns = %netns.display(), pin = %pin.display(), "sk_lookup linked");
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
