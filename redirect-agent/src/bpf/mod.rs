//! Everything that touches the kernel's BPF objects: loading, attaching, pinning, map access.
pub mod btf_layout;
pub mod dns;
pub mod generation;
pub mod inbound_maps;
pub mod kernel_btf;
pub mod loader;
pub mod maps;
pub mod netns;
pub mod podstats;
pub mod probe;
pub mod tries;

use std::path::PathBuf;

pub use loader::{AttachOptions, cleanup, load_and_attach};
pub use maps::{PinnedMaps, PolicyEntries};

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "nothing is pinned under {0}: is the agent installed there? (see --bpffs-dir; `redirect-agent run` creates it)"
    )]
    NotPinned(PathBuf),
    #[error("opening pinned map {path}: {source}")]
    OpenPin {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "{0} is not on a bpf filesystem; mount one first (mount -t bpf bpf /sys/fs/bpf) or choose another --bpffs-dir"
    )]
    NotBpffs(PathBuf),
    #[error(
        "this binary was built with AYA_BUILD_SKIP=1 and carries no eBPF object; rebuild it with the eBPF toolchain (cargo xtask build)"
    )]
    NoObject,
    #[error(
        "the maps pinned in {dir} have another layout than this build's ({mismatches}); read them with the redirect-agent binary of the release that runs there"
    )]
    Layout { dir: PathBuf, mismatches: String },
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("link of {program}: {source}")]
    Link {
        program: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl BpfError {
    pub(crate) fn map(map: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map { map, source }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// True when an insert failed because a map is at max_entries: reported per workload.
    pub fn is_map_full(&self) -> bool {
        matches!(self, BpfError::Map { source: aya::maps::MapError::SyscallError(e), .. }
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM)))
    }
}
