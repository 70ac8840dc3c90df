//! Loads the embedded object, pins its maps, and attaches its programs with pinned bpf_links.
//!
//! Restart story (DESIGN §3): maps are pinned, so a new agent reuses them with their contents;
//! links are pinned, so interception survives the agent's exit (even kill -9). On start the agent
//! adopts a pinned link that already runs the same program on the same cgroup; otherwise it
//! attaches the new link first and only then releases the old one, so there is no gap.
use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use redirect_common::map_names;
use tracing::{debug, info};

use super::{BpfError, PinnedMaps};
use crate::cgroup;

static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect"));

/// The cgroup/connect programs, by their function names in redirect-ebpf.
const CONNECT_PROGRAMS: [&str; 2] = ["redirect_connect4", "redirect_connect6"];

/// Prefix of link pins: `link_<program>_<cgroup id>`. The cgroup id in the name tells a restarted
/// agent whether a pinned link is attached where it is asked to attach now.
const LINK_PREFIX: &str = "link_";

#[derive(Clone, Debug)]
pub struct AttachOptions {
    pub bpffs_dir: PathBuf,
    pub cgroup_root: PathBuf,
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
/// pinned maps for the reconciler.
pub fn load_and_attach(opts: &AttachOptions) -> Result<PinnedMaps, BpfError> {
    if OBJECT.is_empty() {
        return Err(BpfError::NoObject);
    }
    ensure_bpffs_dir(&opts.bpffs_dir)?;
    let reused = opts.bpffs_dir.join(map_names::POLICY).exists();
    let mut loader = EbpfLoader::new();
    for name in map_names::ALL {
        loader.map_pin_path(name, opts.bpffs_dir.join(name));
    }
    let mut ebpf = loader.load(OBJECT)?;
    info!(dir = %opts.bpffs_dir.display(), reused, "maps pinned");

    let cgroup_id = cgroup::cgroup_id(&opts.cgroup_root)
        .map_err(|e| BpfError::io("opening cgroup", &opts.cgroup_root, std::io::Error::other(e)))?;
    let cgroup = fs::File::open(&opts.cgroup_root)
        .map_err(|e| BpfError::io("opening cgroup", &opts.cgroup_root, e))?;
    for program in CONNECT_PROGRAMS {
        attach_connect(&mut ebpf, program, &cgroup, cgroup_id, &opts.bpffs_dir)?;
    }
    PinnedMaps::open(&opts.bpffs_dir)
}

fn program_err(program: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> BpfError {
    move |source| BpfError::Program { program, source }
}

fn attach_connect(
    ebpf: &mut Ebpf,
    program: &'static str,
    cgroup: &fs::File,
    cgroup_id: u64,
    dir: &Path,
) -> Result<(), BpfError> {
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut(program)
        .ok_or(BpfError::Program {
            program,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(program_err(program))?;
    prog.load().map_err(program_err(program))?;
    let tag = prog.info().map_err(program_err(program))?.tag();
    let pin = dir.join(format!("{LINK_PREFIX}{program}_{cgroup_id}"));

    if pinned_program_tag(&pin) == Some(tag) {
        info!(program, pin = %pin.display(), "adopted pinned link");
    } else {
        let id = prog
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(program_err(program))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(program_err(program))?
            .try_into()
            .map_err(|source| BpfError::Link { program, source })?;
        pin_replacing(link, &pin)?;
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
/// the new one is attached (both run for an instant, which is harmless: the second sees a
/// loopback destination and bypasses).
fn pin_replacing(link: FdLink, pin: &Path) -> Result<(), BpfError> {
    // bpffs refuses names with a dot, hence no ".new".
    let mut tmp = pin.as_os_str().to_owned();
    tmp.push("_new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    link.pin(&tmp)
        .map_err(|e| BpfError::io("pinning link", &tmp, std::io::Error::other(e)))?;
    fs::rename(&tmp, pin).map_err(|e| BpfError::io("renaming link pin", pin, e))
}

fn pinned_program_tag(pin: &Path) -> Option<u64> {
    let link: FdLink = PinnedLink::from_pin(pin).ok()?.into();
    let prog_id = link.info().ok()?.program_id();
    loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .map(|p| p.tag())
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

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub links: Vec<PathBuf>,
    pub maps: Vec<PathBuf>,
}

/// Detaches every link (by removing its pin, the last reference) and unpins every map, then
/// removes the directory. Links go first so no program runs against half-removed maps.
pub fn cleanup(dir: &Path) -> Result<CleanupReport, BpfError> {
    if !dir.exists() {
        return Err(BpfError::NotPinned(dir.to_path_buf()));
    }
    let mut report = CleanupReport::default();
    for pin in link_pins(dir)? {
        fs::remove_file(&pin).map_err(|e| BpfError::io("unpinning", &pin, e))?;
        report.links.push(pin);
    }
    let entries = fs::read_dir(dir).map_err(|e| BpfError::io("listing", dir, e))?;
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        fs::remove_file(&path).map_err(|e| BpfError::io("unpinning", &path, e))?;
        report.maps.push(path);
    }
    fs::remove_dir(dir).map_err(|e| BpfError::io("removing", dir, e))?;
    Ok(report)
}
