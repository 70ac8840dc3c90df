//! Types shared between the kernel programs (redirect-ebpf) and the agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding so that the byte layout is identical on both
//! sides and `bpftool map dump` prints meaningful field names from BTF. With the `user` feature the
//! types implement `aya::Pod` so that userspace can read and write the maps.
#![no_std]

pub mod decide;
pub mod dns;
pub mod inbound;

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
    /// Original destinations of redirected client sockets, by socket cookie.
    pub const ORIG_COOKIE: &str = "ORIG_COOKIE";
    /// Original destinations of established redirected connections, by {netns, 4-tuple}.
    pub const ORIG_TUPLE: &str = "ORIG_TUPLE";
    /// Per-CPU counters of the original-destination programs, indexed by `OrigEvent`.
    pub const ORIG_STATS: &str = "ORIG_STATS";
    /// Socket-local storage: the socket's owner uid and where a redirect sent it (`SockState`).
    pub const SOCK_STATE: &str = "SOCK_STATE";
    pub const ALL: [&str; 9] = [
        POLICY,
        CIDR_V4,
        CIDR_V6,
        PORTS,
        COUNTERS,
        ORIG_COOKIE,
        ORIG_TUPLE,
        ORIG_STATS,
        SOCK_STATE,
    ];
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
    /// DNS capture is on: port-53 UDP and TCP go to `proxy_addr4/6:dns_port` (see `dns`).
    pub const DNS_CAPTURE: u32 = 1 << 4;
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
    /// The proxy's DNS listener port, host byte order; 0 = no DNS capture.
    pub dns_port: u16,
    pub proxy_cgroup: u64,
    /// Proxy address for IPv4 destinations (network byte order). 127.0.0.1 in sidecar mode.
    pub proxy_addr4: [u8; 4],
    /// Proxy address for IPv6 destinations. ::1 in sidecar mode.
    pub proxy_addr6: [u8; 16],
    pub _pad1: [u8; 4],
    /// Test only (feature `test-policy-pad`): makes the record 8 bytes longer, a layout change
    /// for the upgrade test (tests/tests/upgrade.rs).
    #[cfg(feature = "test-policy-pad")]
    pub _test_pad: [u8; 8],
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

/// Default capacity of each rule trie (CIDR_V4, CIDR_V6, PORTS), shared by all workloads of a
/// node. LPM tries allocate per entry, so this is a ceiling, not a reservation.
pub const MAX_RULE_ENTRIES: u32 = 1 << 20;

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

/// `OrigDst::flags` bits.
pub mod orig_flags {
    /// The original destination is IPv4 (`OrigDst::addr` holds it v4-mapped), so the IPv4 option
    /// (SOL_IP, SO_ORIGINAL_DST) and getpeername4 can express it.
    pub const V4: u16 = 1 << 0;
    /// Redirected to a node proxy, which sees the connection from another netns: the 4-tuple record
    /// is keyed with netns 0 (pod addresses are unique on a node, loopback tuples are not).
    pub const NODE: u16 = 1 << 1;
}

/// getsockopt option name of both `SO_ORIGINAL_DST` (level SOL_IP) and `IP6T_SO_ORIGINAL_DST`
/// (level SOL_IPV6).
pub const SO_ORIGINAL_DST: i32 = 80;

/// The destination a redirected connection was meant for: the value of `ORIG_COOKIE` and
/// `ORIG_TUPLE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// IPv6 form of the address: an IPv4 destination is stored v4-mapped (::ffff:a.b.c.d).
    pub addr: [u8; 16],
    /// Big-endian port.
    pub port: [u8; 2],
    /// [`orig_flags`].
    pub flags: u16,
}

/// Per-socket state in socket-local storage (`SOCK_STATE`), freed by the kernel with the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockState {
    /// The uid of the task that created the socket (cgroup/sock_create): the socket's owner, as
    /// iptables' `--uid-owner` sees it, not whoever calls connect() later.
    pub owner_uid: u32,
    /// [`sock_state_flags`].
    pub flags: u32,
    /// Where the last redirecting connect sent the socket (the proxy), in IPv6 form (IPv4
    /// v4-mapped): getpeername answers from the original-destination record only while the
    /// socket's real peer is this.
    pub peer_addr: [u8; 16],
    /// Big-endian port of `peer_addr`.
    pub peer_port: [u8; 2],
    pub _pad: [u8; 2],
}

/// `SockState::flags` bits.
pub mod sock_state_flags {
    /// `owner_uid` is set.
    pub const HAS_OWNER: u32 = 1 << 0;
    /// `peer_addr`/`peer_port` are set.
    pub const HAS_PEER: u32 = 1 << 1;
}

/// Key of `ORIG_TUPLE`: a connection as the proxy's accepted socket sees it. Addresses are in IPv6
/// form (IPv4 v4-mapped) so that an IPv4 client and a dual-stack proxy socket agree.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct OrigTupleKey {
    /// Cookie of the client's network namespace (sidecar mode: every pod has the same
    /// 127.0.0.1:x → 127.0.0.1:15001 tuples, so the netns tells them apart), or 0 for a node proxy
    /// that accepts in another netns.
    pub netns: u64,
    /// Client address and port (the connection's source).
    pub src: [u8; 16],
    /// Proxy address and port (the redirect target).
    pub dst: [u8; 16],
    /// Big-endian ports.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub _pad: [u8; 4],
}

/// Index into the per-CPU `ORIG_STATS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrigEvent {
    /// A redirect recorded its original destination under the socket cookie.
    Recorded = 0,
    /// The cookie record could not be written (the connection still goes to the proxy, which will
    /// not learn the original destination).
    RecordFailed = 1,
    /// The client side was established and the record copied to its 4-tuple.
    Established = 2,
    /// The proxy side was established and found its record.
    Accepted = 3,
    /// A getsockopt(SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST) was answered.
    Answered = 4,
    /// A getpeername was shown the original destination.
    Peername = 5,
    /// A redirected client socket closed and its cookie record was deleted.
    ClientClosed = 6,
    /// A proxy socket closed and its 4-tuple record was deleted.
    ProxyClosed = 7,
}

pub const ORIG_EVENT_COUNT: u32 = 8;

impl OrigEvent {
    pub const ALL: [OrigEvent; ORIG_EVENT_COUNT as usize] = [
        OrigEvent::Recorded,
        OrigEvent::RecordFailed,
        OrigEvent::Established,
        OrigEvent::Accepted,
        OrigEvent::Answered,
        OrigEvent::Peername,
        OrigEvent::ClientClosed,
        OrigEvent::ProxyClosed,
    ];

    /// Stable name used in `inspect` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            OrigEvent::Recorded => "recorded",
            OrigEvent::RecordFailed => "record_failed",
            OrigEvent::Established => "established",
            OrigEvent::Accepted => "accepted",
            OrigEvent::Answered => "answered",
            OrigEvent::Peername => "peername",
            OrigEvent::ClientClosed => "client_closed",
            OrigEvent::ProxyClosed => "proxy_closed",
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
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for OrigTupleKey {}
}
