//! Types shared between the kernel programs (redirect-ebpf) and the agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding so that the byte layout is identical on both
//! sides and `bpftool map dump` prints meaningful field names from BTF. With the `user` feature the
//! types implement `aya::Pod` so that userspace can read and write the maps.
#![no_std]

/// Deepest cgroup level the connect programs look at when walking ancestors. Kubernetes pod
/// cgroups sit at depth 3-4 (`kubepods.slice/kubepods-<qos>.slice/<pod>.slice/<container>`), and tests
/// nest that under their own subtree, so 16 leaves ample room while keeping the loop bounded.
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// Map names. They double as the pin file names under `--bpffs-dir` (BPF object names are
/// limited to 15 characters).
pub mod map_names {
    pub const POLICY: &str = "POLICY";
    pub const CIDR_V4: &str = "CIDR_V4";
    pub const CIDR_V6: &str = "CIDR_V6";
    pub const PORTS: &str = "PORTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const ALL: [&str; 5] = [POLICY, CIDR_V4, CIDR_V6, PORTS, COUNTERS];
}

/// `Policy::flags` bits.
pub mod flags {
    /// Interception is on for this workload. A registered workload without it is left alone
    /// (Istio `interceptionMode: NONE`, an empty `includeOutboundIPRanges` and no included ports).
    pub const ENABLED: u32 = 1 << 0;
    /// Node mode: redirect to `proxy_addr4/6` instead of loopback.
    pub const MODE_NODE: u32 = 1 << 1;
    /// `proxy_uid` is meaningful (uid 0 is a valid uid, so it cannot double as "unset").
    pub const HAS_PROXY_UID: u32 = 1 << 2;
    /// `proxy_cgroup` is meaningful.
    pub const HAS_PROXY_CGROUP: u32 = 1 << 3;
}

/// Per-workload policy record, the value of the `POLICY` map keyed by the cgroup id (inode number)
/// of the workload's cgroup directory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Policy {
    /// Namespaces this workload's entries in `CIDR_V4`, `CIDR_V6` and `PORTS`. A policy change
    /// writes a fresh id and then swaps this record, so a connect sees the old or the new policy
    /// whole, never a mix.
    pub policy_id: u32,
    pub flags: u32,
    pub proxy_uid: u32,
    /// Proxy outbound port, host byte order.
    pub proxy_port: u16,
    pub _pad0: u16,
    pub proxy_cgroup: u64,
    /// Proxy address for IPv4 destinations (network byte order). 127.0.0.1 in sidecar mode.
    pub proxy_addr4: [u8; 4],
    /// Proxy address for IPv6 destinations. ::1 in sidecar mode.
    pub proxy_addr6: [u8; 16],
    pub _pad1: [u8; 4],
}

/// What an entry of the CIDR or port tries says about a matching destination.
pub mod action {
    /// Bypass the proxy (exclusion list).
    pub const EXCLUDE: u32 = 1;
    /// Redirect to the proxy (inclusion list).
    pub const INCLUDE: u32 = 2;
}

/// LPM value: one of [`action`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rule {
    pub action: u32,
}

/// Data part of an IPv4 LPM key. The prefix length counts the 32 policy-id bits too, so an entry
/// for 10.0.0.0/8 has prefix length 40 and can only ever match its own policy's lookups.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct CidrV4Key {
    /// Big-endian so that the trie (which matches bytes MSB first) sees the id as a plain prefix.
    pub policy_id: [u8; 4],
    pub addr: [u8; 4],
}

/// Data part of an IPv6 LPM key; see [`CidrV4Key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct CidrV6Key {
    pub policy_id: [u8; 4],
    pub addr: [u8; 16],
}

/// Data part of a port LPM key. Ports live in a trie too, so that a range such as Linkerd's
/// `1-65535` becomes at most 30 prefixes instead of 65535 entries, and one lookup answers both the
/// excluded-port step and the included-port step.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub policy_id: [u8; 4],
    /// Big-endian port.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Bits of the policy id at the front of every LPM key.
pub const POLICY_ID_BITS: u32 = 32;

/// Index into the per-CPU `COUNTERS` array: one slot per decision of the connect programs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Redirected = 0,
    BypassProxy = 1,
    BypassPort = 2,
    BypassLoopback = 3,
    BypassCidr = 4,
    BypassNotIncluded = 5,
    NotInMesh = 6,
    Disabled = 7,
    Error = 8,
}

pub const DECISION_COUNT: u32 = 9;

impl Decision {
    pub const ALL: [Decision; DECISION_COUNT as usize] = [
        Decision::Redirected,
        Decision::BypassProxy,
        Decision::BypassPort,
        Decision::BypassLoopback,
        Decision::BypassCidr,
        Decision::BypassNotIncluded,
        Decision::NotInMesh,
        Decision::Disabled,
        Decision::Error,
    ];

    /// Stable name used in metrics labels and `inspect`.
    pub const fn name(self) -> &'static str {
        match self {
            Decision::Redirected => "redirected",
            Decision::BypassProxy => "bypass_proxy",
            Decision::BypassPort => "bypass_port",
            Decision::BypassLoopback => "bypass_loopback",
            Decision::BypassCidr => "bypass_cidr",
            Decision::BypassNotIncluded => "bypass_not_included",
            Decision::NotInMesh => "not_in_mesh",
            Decision::Disabled => "disabled",
            Decision::Error => "error",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for Policy {}
    unsafe impl aya::Pod for Rule {}
    unsafe impl aya::Pod for CidrV4Key {}
    unsafe impl aya::Pod for CidrV6Key {}
    unsafe impl aya::Pod for PortKey {}
}
