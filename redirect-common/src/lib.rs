//! Types shared between the kernel programs (redirect-ebpf) and the agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding so that the byte layout is identical on both
//! sides and `bpftool map dump` prints meaningful field names from BTF. With the `user` feature the
//! types implement `aya::Pod` so that userspace can read and write the maps.
#![no_std]

#[macro_use]
mod counters;
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
    map_names! {
        POLICY = "POLICY";
        CIDR_V4 = "CIDR_V4";
        CIDR_V6 = "CIDR_V6";
        PORTS = "PORTS";
        COUNTERS = "COUNTERS";
        /// Hand-offs of original destinations from client sockets to the proxy's accepted sockets,
        /// by {netns, 4-tuple}; each lives from the client's establishment to the proxy's.
        ORIG_TUPLE = "ORIG_TUPLE";
        /// Per-CPU counters of the original-destination programs, indexed by `OrigEvent`.
        ORIG_STATS = "ORIG_STATS";
        /// Socket-local storage: the socket's owner uid and its original-destination record
        /// (`SockState`).
        SOCK_STATE = "SOCK_STATE";
        /// Slot 0: the generation of the `POLICY` registrations, bumped by the agent after every
        /// `POLICY` write so that `CGROUP_CACHE` entries of earlier generations are not used.
        POLICY_GEN = "POLICY_GEN";
        /// Current cgroup id → the registered workload it belongs to (`CgroupCache`).
        CGROUP_CACHE = "CGROUP_CACHE";
        /// Per-CPU decision counts per registered workload (`POLICY` key → `PodDecisions`); the
        /// agent creates an entry when it registers a workload and deletes it after unregistering.
        POD_STATS = "POD_STATS";
    }
    /// Maps earlier builds pinned and this one no longer has (`ORIG_COOKIE`: client records by
    /// socket cookie, now in `SOCK_STATE`): still ours for `cleanup` to remove.
    pub const RETIRED: [&str; 1] = ["ORIG_COOKIE"];
}

flag_bits! {
    /// `Policy::flags` bits.
    pub mod flags: u32 {
        /// Interception is on for this workload. A registered workload without it is left alone
        /// (Istio `interceptionMode: NONE`, an empty `includeOutboundIPRanges` and no included
        /// ports).
        ENABLED,
        /// Node mode: redirect to `proxy_addr4/6` instead of loopback.
        MODE_NODE,
        /// `proxy_uid` is meaningful (uid 0 is a valid uid, so it cannot double as "unset").
        HAS_PROXY_UID,
        /// `proxy_cgroup` is meaningful.
        HAS_PROXY_CGROUP,
        /// DNS capture is on: port-53 UDP and TCP go to `proxy_addr4/6:dns_port` (see `dns`).
        DNS_CAPTURE,
    }
}

flag_bits! {
    /// `OrigDst::flags` bits.
    pub mod orig_flags: u16 {
        /// The original destination is IPv4 (`OrigDst::addr` holds it v4-mapped), so the IPv4
        /// option (SOL_IP, SO_ORIGINAL_DST) and getpeername4 can express it.
        V4,
        /// Redirected to a node proxy, which sees the connection from another netns: the 4-tuple
        /// record is keyed with netns 0 (pod addresses are unique on a node, loopback tuples are
        /// not).
        NODE,
    }
}

flag_bits! {
    /// `SockState::flags` bits.
    pub mod sock_state_flags: u32 {
        /// `owner_uid` is set (earlier builds only; see `SockState::owner_uid`).
        HAS_OWNER,
        /// `peer_addr`/`peer_port` are set.
        HAS_PEER,
        /// `orig` is this redirected client socket's original destination (getpeername).
        CLIENT_ORIG,
        /// `orig` is the original destination of the connection this proxy socket accepted
        /// (getsockopt SO_ORIGINAL_DST).
        PROXY_ORIG,
    }
}

/// Per-workload policy record, the value of the `POLICY` map keyed by the cgroup id (inode number)
/// of the workload's cgroup directory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Policy {
    /// Namespaces this workload's entries in `CIDR_V4`, `CIDR_V6` and `PORTS`. A policy change
    /// writes a fresh id and then swaps this record, so a connect sees the old or the new policy
    /// whole, never a mix.
    #[cfg(not(feature = "test-policy-pad"))]
    pub policy_id: u32,
    pub flags: u32,
    /// Test only (feature `test-policy-pad`): `policy_id` after `flags`, a layout change that
    /// keeps every size and offset, for the upgrade test (tests/tests/upgrade.rs). Only the BTF
    /// of the pinned map tells the two layouts apart (`bpf/btf_layout.rs` in the agent).
    #[cfg(feature = "test-policy-pad")]
    pub policy_id: u32,
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
    /// The shared base entry set this workload's entries overlay, or 0 (`decide::NO_BASE`): a
    /// rule lookup that finds nothing under `policy_id` asks `base_id`'s entries, unless the own
    /// entry says [`action::STOP`] (`decide::layered`). It took the place of 4 padding bytes, so
    /// the record's size is unchanged: the agent's layout check tells the two apart by the
    /// pinned map's BTF (`bpf/generation.rs`).
    pub base_id: u32,
}

/// What an entry of the CIDR or port tries says about a matching destination.
pub mod action {
    /// Bypass the proxy (exclusion list).
    pub const EXCLUDE: u32 = 1;
    /// Redirect to the proxy (inclusion list).
    pub const INCLUDE: u32 = 2;
    /// An overlay entry: no rule for this destination, and do not fall back to the base's
    /// entries (`decide::layered`).
    pub const STOP: u32 = 3;
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

counter_enum! {
    /// Index into the per-CPU `COUNTERS` array: one slot per decision of the connect programs.
    pub enum Decision (DECISION_COUNT) {
        Redirected => "redirected",
        BypassProxy => "bypass_proxy",
        BypassPort => "bypass_port",
        BypassLoopback => "bypass_loopback",
        BypassCidr => "bypass_cidr",
        BypassNotIncluded => "bypass_not_included",
        NotInMesh => "not_in_mesh",
        Disabled => "disabled",
        Error => "error",
    }
}

/// Capacity of `POD_STATS`: one entry per `POLICY` record.
pub const POD_STATS_ENTRIES: u32 = 65536;

/// Value of the per-CPU hash `POD_STATS`, keyed by a workload's registered cgroup id (its
/// `POLICY` key): this CPU's count of each [`Decision`], indexed by the decision's slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodDecisions {
    pub counts: [u64; DECISION_COUNT as usize],
}

/// getsockopt option name of both `SO_ORIGINAL_DST` (level SOL_IP) and `IP6T_SO_ORIGINAL_DST`
/// (level SOL_IPV6).
pub const SO_ORIGINAL_DST: i32 = 80;

/// The destination a redirected connection was meant for: the value of `ORIG_TUPLE`, and the
/// `orig` of a socket's `SockState`.
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
    /// Written by earlier builds' cgroup/sock_create (the creator's uid); this build reads the
    /// owner from the socket itself (`sk->sk_uid`) and leaves it alone. Kept so that the map
    /// layout, and a `SOCK_STATE` pinned by an earlier build, stay as they are.
    pub owner_uid: u32,
    /// [`sock_state_flags`].
    pub flags: u32,
    /// Where the last redirecting connect sent the socket (the proxy), in IPv6 form (IPv4
    /// v4-mapped): getpeername answers from `orig` only while the socket's real peer is this.
    pub peer_addr: [u8; 16],
    /// Big-endian port of `peer_addr`.
    pub peer_port: [u8; 2],
    pub _pad: [u8; 2],
    /// The original destination: the client's own (`CLIENT_ORIG`) or the proxy's accepted
    /// socket's copy (`PROXY_ORIG`).
    pub orig: OrigDst,
}

/// Capacity of `CGROUP_CACHE`: cgroups that create or connect TCP sockets under the attached
/// tree. LRU, so a cgroup that goes away is evicted in time; a miss only costs a walk.
pub const CGROUP_CACHE_ENTRIES: u32 = 16384;

/// Value of `CGROUP_CACHE`, keyed by the current cgroup id: what the ancestor walk found for
/// that cgroup, valid while `generation` is the one in `POLICY_GEN`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CgroupCache {
    /// The key again: a reader checks it after copying the entry (an LRU node can be recycled
    /// for another key while it is read).
    pub cgroup_id: u64,
    /// `POLICY_GEN` as read before the walk.
    pub generation: u64,
    /// The nearest registered ancestor (its `POLICY` key), 0 = not in the mesh.
    pub workload_cgroup: u64,
    /// 1 if the cgroup is (or is under) that workload's proxy container cgroup.
    pub in_proxy_cgroup: u32,
    pub _pad: u32,
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

counter_enum! {
    /// Index into the per-CPU `ORIG_STATS` array. Slots 6 and 7 counted close callbacks in
    /// earlier builds (`client_closed`, `proxy_closed`); records now live in socket-local
    /// storage, which the kernel frees with the socket, so there is nothing left to count there.
    pub enum OrigEvent (ORIG_EVENT_COUNT) {
        /// A redirect recorded its original destination in the client socket's storage.
        Recorded => "recorded",
        /// The client socket's storage could not be created (the connection still goes to the
        /// proxy, which will not learn the original destination).
        RecordFailed => "record_failed",
        /// The client side was established and its record handed off under its 4-tuple.
        Established => "established",
        /// The proxy's accepted socket took the hand-off into its own storage (and deleted it).
        Accepted => "accepted",
        /// A getsockopt(SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST) was answered.
        Answered => "answered",
        /// A getpeername was shown the original destination.
        Peername => "peername",
        /// The proxy's accepted socket found its hand-off but could not store it: the hand-off
        /// stays in `ORIG_TUPLE`, getsockopt answers from there, and LRU bounds it.
        AcceptFailed => "accept_failed",
        /// The hand-off could not be written (`ORIG_TUPLE` update failed): the proxy will not
        /// learn the original destination.
        HandOffFailed => "handoff_failed",
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
    unsafe impl aya::Pod for CgroupCache {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for PodDecisions {}
}
