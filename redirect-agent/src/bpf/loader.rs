//! Loads the embedded object, pins its maps, and attaches its programs with pinned bpf_links.
//!
//! Restart story (docs/architecture.md, "Reconcile rules"): maps are pinned, so a new agent
//! reuses them with their contents;
//! links are pinned, so interception survives the agent's exit (even kill -9). On start the agent
//! adopts a pinned link that already runs the same program on the same cgroup; otherwise it
//! attaches the new link first and only then releases the old one, so there is no gap.
use std::{
    fs,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, Program, ProgramError, ProgramInfo,
        SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use redirect_common::map_names;
use tracing::{debug, info};

use super::{BpfError, PinnedMaps};
use crate::cgroup;

pub(super) static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect"));

/// How a program attaches to the cgroup.
#[derive(Clone, Copy, Debug)]
enum Hook {
    SockAddr,
    SockOps,
    GetSockopt,
}

/// The programs, by their function names in redirect-ebpf, in attach order: the programs that
/// keep and answer original destinations go first, so that the first redirected connect already
/// finds them in place.
const PROGRAMS: [(&str, Hook); 10] = [
    ("redirect_sockops", Hook::SockOps),
    ("redirect_getsockopt", Hook::GetSockopt),
    // getpeername answers for both a redirected client and DNS capture (redirect-ebpf/src/dns.rs).
    ("redirect_getpeername4", Hook::SockAddr),
    ("redirect_getpeername6", Hook::SockAddr),
    // DNS capture: the programs that restore the server's address go before the ones that
    // capture.
    ("redirect_dns_recvmsg4", Hook::SockAddr),
    ("redirect_dns_recvmsg6", Hook::SockAddr),
    ("redirect_dns_sendmsg4", Hook::SockAddr),
    ("redirect_dns_sendmsg6", Hook::SockAddr),
    ("redirect_connect4", Hook::SockAddr),
    ("redirect_connect6", Hook::SockAddr),
];

/// Prefix of link pins: `link_<program>_<cgroup id>`. The cgroup id in the name tells a restarted
/// agent whether a pinned link is attached where it is asked to attach now.
const LINK_PREFIX: &str = "link_";
/// Prefix of program pins: `prog_<program>`, the program the link of the same name runs.
const PROG_PREFIX: &str = "prog_";

#[derive(Clone, Debug)]
pub struct AttachOptions {
    pub bpffs_dir: PathBuf,
    pub cgroup_root: PathBuf,
    /// Capacity of each rule trie (CIDR_V4, CIDR_V6, PORTS); None keeps the compiled-in size.
    /// Tries allocate per entry, so a large capacity costs nothing until it is used. It only
    /// applies when the maps are created: pinned maps keep the size they were made with.
    pub max_rule_entries: Option<u32>,
    /// Inbound interception is on (`--inbound`, the default): a kernel that cannot run the
    /// sk_lookup program is refused before anything is pinned (probe::check_inbound).
    pub inbound: bool,
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn ensure_bpffs_dir(dir: &Path) -> Result<(), BpfError> {
    fs::create_dir_all(dir).map_err(|e| BpfError::io("creating", dir, e))?;
    let st = nix::sys::statfs::statfs(dir)
        .map_err(|e| BpfError::io("statfs", dir, std::io::Error::from(e)))?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(BpfError::NotBpffs(dir.to_path_buf()));
    }
    Ok(())
}

/// Loads the programs, pins or reuses the maps, attaches (or adopts) the links, and returns the
/// pinned maps for the reconciler. The maps live in the layout generation this build runs
/// (bpf/generation.rs): the pinned one when its layout matches, else a new one beside it.
pub fn load_and_attach(opts: &AttachOptions) -> Result<PinnedMaps, BpfError> {
    if OBJECT.is_empty() {
        return Err(BpfError::NoObject);
    }
    // Before the first pin: a kernel without a needed feature gets one line and no pins.
    super::probe::check(OBJECT, &own_programs().collect::<Vec<_>>())?;
    if opts.inbound {
        super::probe::check_inbound(OBJECT)?;
    }
    let sk_uid_offset = super::kernel_btf::sk_uid_offset()?;
    ensure_bpffs_dir(&opts.bpffs_dir)?;
    // Before the first pin too: a pinned map of another layout is never handed to aya.
    let expected = super::generation::expected(OBJECT, opts.max_rule_entries)?;
    let generation = super::generation::prepare(&opts.bpffs_dir, &expected)?;
    let dir = &generation.dir;
    let reused = dir.join(map_names::POLICY).exists();
    let mut loader = EbpfLoader::new();
    for name in all_map_names() {
        loader.map_pin_path(name, dir.join(name));
    }
    // The socket owner's uid for the proxy-uid bypass (redirect-ebpf/src/sockstate.rs).
    loader.override_global("SK_UID_OFFSET", &sk_uid_offset, true);
    if let Some(n) = opts.max_rule_entries {
        for name in [map_names::CIDR_V4, map_names::CIDR_V6, map_names::PORTS] {
            loader.map_max_entries(name, n);
        }
    }
    let mut ebpf = loader.load(OBJECT)?;
    info!(dir = %dir.display(), generation = generation.number, reused, "maps pinned");

    let cgroup_id = cgroup::cgroup_id(&opts.cgroup_root).map_err(|e| {
        BpfError::io(
            "opening cgroup",
            &opts.cgroup_root,
            std::io::Error::other(e),
        )
    })?;
    let cgroup = fs::File::open(&opts.cgroup_root)
        .map_err(|e| BpfError::io("opening cgroup", &opts.cgroup_root, e))?;
    // Every program passes the verifier before any is attached: a rejection leaves nothing
    // half-attached.
    for (program, hook) in PROGRAMS {
        load_program(&mut ebpf, program, hook)?;
    }
    super::netns::load_program(&mut ebpf, dir)?;
    for (program, hook) in PROGRAMS {
        attach_program(
            &mut ebpf,
            program,
            hook,
            (&cgroup, &opts.cgroup_root, cgroup_id),
            dir,
        )?;
    }
    release_unowned(dir)?;
    PinnedMaps::open(dir)
}

fn program_err(program: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> BpfError {
    move |source| BpfError::Program { program, source }
}

fn any<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut Program, BpfError> {
    ebpf.program_mut(program).ok_or(BpfError::Program {
        program,
        source: ProgramError::NotLoaded,
    })
}

fn typed<'a, T>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    any(ebpf, program)?.try_into().map_err(program_err(program))
}

fn load_program(ebpf: &mut Ebpf, program: &'static str, hook: Hook) -> Result<(), BpfError> {
    let loaded = match hook {
        Hook::SockAddr => typed::<CgroupSockAddr>(ebpf, program)?.load(),
        Hook::SockOps => typed::<SockOps>(ebpf, program)?.load(),
        Hook::GetSockopt => typed::<CgroupSockopt>(ebpf, program)?.load(),
    };
    loaded.map_err(program_err(program))
}

/// True when `link_pin` holds a link running this very program: the link's program is the one
/// pinned at `prog_pin` and has the same tag as the program just loaded. Reading the pins needs
/// no CAP_SYS_ADMIN (walking all loaded programs would).
fn adoptable(link_pin: &Path, prog_pin: &Path, tag: u64) -> bool {
    let Ok(link) = PinnedLink::from_pin(link_pin) else {
        return false;
    };
    let link: FdLink = link.into();
    let Ok(link_prog) = link.info().map(|i| i.program_id()) else {
        return false;
    };
    ProgramInfo::from_pin(prog_pin).is_ok_and(|p| p.id() == link_prog && p.tag() == tag)
}

fn pin_fd_link(
    program: &'static str,
    link: Result<FdLink, LinkError>,
    pin: &Path,
) -> Result<(), BpfError> {
    let link = link.map_err(|source| BpfError::Link { program, source })?;
    pin_replacing(pin, |tmp| {
        link.pin(tmp)
            .map(drop)
            .map_err(|e| BpfError::io("pinning link", tmp, std::io::Error::other(e)))
    })
}

fn attach_program(
    ebpf: &mut Ebpf,
    program: &'static str,
    hook: Hook,
    (cgroup, cgroup_path, cgroup_id): (&fs::File, &Path, u64),
    dir: &Path,
) -> Result<(), BpfError> {
    let pin = dir.join(format!("{LINK_PREFIX}{program}_{cgroup_id}"));
    let prog_pin = dir.join(format!("{PROG_PREFIX}{program}"));
    let tag = any(ebpf, program)
        .and_then(|p| p.info().map_err(program_err(program)))?
        .tag();
    if adoptable(&pin, &prog_pin, tag) {
        info!(program, pin = %pin.display(), "adopted pinned link");
    } else {
        match hook {
            Hook::SockAddr => {
                let prog: &mut CgroupSockAddr = typed(ebpf, program)?;
                let id = prog
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(program_err(program))?;
                let link = prog.take_link(id).map_err(program_err(program))?;
                pin_fd_link(program, link.try_into(), &pin)?;
            }
            Hook::SockOps => {
                let prog: &mut SockOps = typed(ebpf, program)?;
                let id = prog
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(program_err(program))?;
                let link = prog.take_link(id).map_err(program_err(program))?;
                pin_fd_link(program, link.try_into(), &pin)?;
            }
            Hook::GetSockopt => {
                let prog: &mut CgroupSockopt = typed(ebpf, program)?;
                // aya 0.14 cannot turn a CgroupSockoptLink into an FdLink (so it could not be
                // pinned), hence the raw BPF_LINK_CREATE.
                let prog_fd = prog.fd().map_err(program_err(program))?.as_fd();
                let link = raw::link_create(prog_fd, cgroup.as_fd(), raw::BPF_CGROUP_GETSOCKOPT)
                    .map_err(|e| {
                        BpfError::io(
                            "attaching getsockopt (BPF_LINK_CREATE) to cgroup",
                            cgroup_path,
                            e,
                        )
                    })?;
                pin_replacing(&pin, |tmp| {
                    raw::obj_pin(link.as_fd(), tmp)
                        .map_err(|e| BpfError::io("pinning link", tmp, e))
                })?;
            }
        }
        // The program is pinned next to its link so that the next start can tell, from the pins
        // alone, whether the link runs the program it is about to load.
        let prog = any(ebpf, program)?;
        pin_replacing(&prog_pin, |tmp| {
            prog.pin(tmp)
                .map_err(|e| BpfError::io("pinning program", tmp, std::io::Error::other(e)))
        })?;
        info!(program, pin = %pin.display(), "attached");
    }
    // Links of this program on other cgroups belong to an earlier --cgroup-root: release them
    // only now that the new one is in place.
    for stale in link_pins(dir)?.into_iter().filter(|p| {
        p != &pin
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{LINK_PREFIX}{program}_")))
    }) {
        debug!(pin = %stale.display(), "releasing link from an earlier cgroup root");
        let _ = fs::remove_file(&stale);
    }
    Ok(())
}

/// Pins under a temporary name and renames over the old pin: the old link is released only once
/// the new one is attached. Both run for an instant, which is harmless: a second connect program
/// sees a loopback destination and bypasses, and the original-destination programs are
/// idempotent (same record written twice, a delete of a deleted record, the same answer twice).
fn pin_replacing(
    pin: &Path,
    do_pin: impl FnOnce(&Path) -> Result<(), BpfError>,
) -> Result<(), BpfError> {
    // bpffs refuses names with a dot, hence no ".new".
    let mut tmp = pin.as_os_str().to_owned();
    tmp.push("_new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    do_pin(&tmp)?;
    fs::rename(&tmp, pin).map_err(|e| BpfError::io("renaming link pin", pin, e))
}

/// The two bpf(2) commands aya 0.14 does not expose for cgroup sockopt links.
mod raw {
    use std::{ffi::CString, io, os::unix::ffi::OsStrExt as _};

    use super::*;

    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_LINK_CREATE: libc::c_long = 28;
    pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;

    /// The `link_create` member of `union bpf_attr`, zero-padded (the kernel requires unused
    /// attribute bytes to be zero).
    #[repr(C)]
    #[derive(Default)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        _rest: [u64; 6],
    }

    /// The `obj_pin` member of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix of the given size.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                (attr as *mut T).cast::<libc::c_void>(),
                std::mem::size_of::<T>(),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    pub fn link_create(
        prog: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        attach_type: u32,
    ) -> io::Result<OwnedFd> {
        let mut attr = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: target.as_raw_fd() as u32,
            attach_type,
            ..Default::default()
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: BPF_LINK_CREATE returned a fresh fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut attr = ObjPin {
            pathname: c.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf(BPF_OBJ_PIN, &mut attr).map(drop)
    }
}

fn link_pins(dir: &Path) -> Result<Vec<PathBuf>, BpfError> {
    let entries = fs::read_dir(dir).map_err(|e| BpfError::io("listing", dir, e))?;
    Ok(entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(LINK_PREFIX))
        })
        .collect())
}

/// Which of this build's programs have a live pinned link under a pin dir.
#[derive(Debug, Default)]
pub struct LinkStatus {
    pub attached: Vec<&'static str>,
    pub missing: Vec<&'static str>,
}

/// For `inspect`: a program counts as attached when a `link_<program>_<cgroup>` pin opens as a
/// link (bpffs only holds a link while it exists, so an openable pin is an attached link).
pub fn link_status(dir: &Path) -> LinkStatus {
    let pins = link_pins(dir).unwrap_or_default();
    let mut status = LinkStatus::default();
    for (program, _) in PROGRAMS {
        let prefix = format!("{LINK_PREFIX}{program}_");
        let live = pins.iter().any(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && !n.ends_with("_new"))
                && PinnedLink::from_pin(p).is_ok()
        });
        if live {
            status.attached.push(program);
        } else {
            status.missing.push(program);
        }
    }
    status
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub links: Vec<PathBuf>,
    pub programs: Vec<PathBuf>,
    pub maps: Vec<PathBuf>,
    /// Entries that are not redirect's, left in place (the directory too, then).
    pub left: Vec<PathBuf>,
}

/// Every map this build pins: the outbound/original-destination maps, DNS capture's and inbound's.
pub(crate) fn all_map_names() -> impl Iterator<Item = &'static str> {
    map_names::ALL
        .into_iter()
        .chain(redirect_common::dns::map_names::ALL)
        .chain(redirect_common::inbound::map_names::ALL)
}

/// Whether a pin name is one this project creates: a map of this build, or a link/program pin
/// of a redirect program (any build's: a renamed program's pins are still ours to remove). Other
/// software's pins in the same directory (`--bpffs-dir /sys/fs/bpf`) never match.
pub(super) fn owned_name(name: &str) -> bool {
    let name = name.strip_suffix("_new").unwrap_or(name);
    all_map_names().any(|m| m == name)
        || map_names::RETIRED.contains(&name)
        // The per-netns sk_lookup links (bpf/netns.rs).
        || name.starts_with("link_sk_lookup_")
        || name.starts_with(&format!("{LINK_PREFIX}{OWN_PROGRAM_PREFIX}"))
        || name.starts_with(&format!("{PROG_PREFIX}{OWN_PROGRAM_PREFIX}"))
}

/// Every program this build loads: the cgroup ones and the per-netns sk_lookup one.
fn own_programs() -> impl Iterator<Item = &'static str> {
    PROGRAMS
        .iter()
        .map(|(p, _)| *p)
        .chain([redirect_common::inbound::SK_LOOKUP_PROGRAM])
}

/// Every program of redirect-ebpf is named `redirect_…`.
const OWN_PROGRAM_PREFIX: &str = "redirect_";

/// Releases the link and program pins of redirect programs this build does not have (a program
/// renamed or dropped by an upgrade): they would otherwise stay attached forever. Runs after this
/// build's links are in place, so the swap has no gap.
fn release_unowned(dir: &Path) -> Result<(), BpfError> {
    let entries = fs::read_dir(dir).map_err(|e| BpfError::io("listing", dir, e))?;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let program = name
            .strip_prefix(LINK_PREFIX)
            .and_then(|rest| rest.rsplit_once('_').map(|(p, _)| p))
            .or_else(|| name.strip_prefix(PROG_PREFIX));
        let Some(program) = program.filter(|p| p.starts_with(OWN_PROGRAM_PREFIX)) else {
            continue;
        };
        if !own_programs().any(|p| p == program) {
            info!(pin = %entry.path().display(), "releasing a pin of a program this build does not have");
            fs::remove_file(entry.path())
                .map_err(|e| BpfError::io("unpinning", entry.path(), e))?;
        }
    }
    Ok(())
}

/// Detaches every link of redirect (by removing its pin, the last reference), unpins its
/// programs and maps, in every layout generation, then removes the directory if nothing else is
/// left in it. Links go first so no program runs against half-removed maps. Names this project
/// does not create are left alone, so a shared directory such as /sys/fs/bpf is safe.
pub fn cleanup(dir: &Path) -> Result<CleanupReport, BpfError> {
    if !dir.exists() {
        return Err(BpfError::NotPinned(dir.to_path_buf()));
    }
    let mut report = CleanupReport::default();
    // Every layout generation (bpf/generation.rs), each one links first.
    let mut gens = super::generation::list(dir);
    if !gens.iter().any(|g| g.number == 0) {
        // Stray link or program pins with no map beside them are still this project's.
        gens.insert(
            0,
            super::generation::Generation {
                number: 0,
                dir: dir.to_path_buf(),
            },
        );
    }
    for g in gens.iter().rev() {
        let r = super::generation::release(dir, g)?;
        report.links.extend(r.links);
        report.programs.extend(r.programs);
        report.maps.extend(r.maps);
    }
    let left = fs::read_dir(dir).map_err(|e| BpfError::io("listing", dir, e))?;
    report.left = left.filter_map(Result::ok).map(|e| e.path()).collect();
    if report.left.is_empty() {
        fs::remove_dir(dir).map_err(|e| BpfError::io("removing", dir, e))?;
    }
    Ok(report)
}
