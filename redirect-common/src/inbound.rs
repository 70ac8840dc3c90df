//! Kernel types of inbound interception (sk_lookup, docs/architecture.md, "Inbound"): the per-netns record,
//! the listener key and the counters. The rule tries reuse the outbound key layouts
//! ([`crate::PortKey`], [`crate::CidrV4Key`], [`crate::CidrV6Key`]) in maps of their own, with their
//! own policy-id space, so inbound and outbound entries never meet.

/// Map names, also the pin file names (15 characters at most).
pub mod map_names {
    map_names! {
        /// Network namespace cookie → [`super::InboundRecord`].
        INBOUND = "INBOUND";
        /// {inbound policy id, port prefix} → exclude/include.
        IN_PORTS = "IN_PORTS";
        /// {inbound policy id, IPv4 source prefix} → exclude.
        IN_SRC_V4 = "IN_SRC_V4";
        /// {inbound policy id, IPv6 source prefix} → exclude.
        IN_SRC_V6 = "IN_SRC_V6";
        /// SOCKHASH of TCP listeners keyed by [`super::ListenerKey`].
        IN_LISTEN = "IN_LISTEN";
        /// Per-CPU counters indexed by [`super::InboundCounter`].
        IN_STATS = "IN_STATS";
    }
}

/// The sk_lookup program's function name (also its pin name suffix).
pub const SK_LOOKUP_PROGRAM: &str = "redirect_sk_lookup";

/// Value of `INBOUND`, keyed by the network namespace cookie of the workload's netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InboundRecord {
    /// Namespaces this workload's entries in `IN_PORTS`, `IN_SRC_V4`, `IN_SRC_V6`; swapped whole
    /// on a change, like `Policy::policy_id`.
    pub policy_id: u32,
    /// The proxy's inbound listener port (host byte order), e.g. 15006.
    pub proxy_port: u16,
    pub _pad: u16,
}

/// `ListenerKey::family` values.
pub const LISTEN_V4: u16 = 4;
pub const LISTEN_V6: u16 = 6;

/// Key of the `IN_LISTEN` SOCKHASH: a listening TCP socket by its netns, port and family. An
/// AF_INET6 listener is `LISTEN_V6` whether or not it is dual stack (sk_assign refuses a v6-only
/// one for an IPv4 packet, which is then counted and refused).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct ListenerKey {
    pub netns: u64,
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

counter_enum! {
    /// Index into the per-CPU `IN_STATS` array.
    pub enum InboundCounter (INBOUND_COUNTER_COUNT) {
        /// Steered to the proxy's listener.
        Steered => "steered",
        /// Arrived on lo: the normal lookup (step 1).
        Loopback => "loopback",
        /// Excluded destination port (step 2).
        ExcludedPort => "excluded_port",
        /// Excluded source (step 3).
        ExcludedSource => "excluded_source",
        /// No included port matched (step 5).
        NotIncluded => "not_included",
        /// To be steered, but no listener on the proxy port: refused (SK_DROP).
        NoListener => "no_listener",
        /// The listener refused the assignment (e.g. a v6-only listener for IPv4): refused.
        AssignFailed => "assign_failed",
        /// A lookup in a netns with no record (not meshed): the normal lookup.
        NotInMesh => "not_in_mesh",
        /// A listener was recorded in `IN_LISTEN`.
        ListenerAdded => "listener_added",
        /// Recording a listener failed (map full).
        ListenerFailed => "listener_failed",
    }
}

/// Capacity of `INBOUND` (meshed network namespaces per node).
pub const MAX_INBOUND_NETNS: u32 = 16384;
/// Capacity of `IN_LISTEN`: every TCP listener in the attached cgroup tree is recorded (so that a
/// proxy that listens before the agent writes its record is still found); entries leave when the
/// socket closes.
pub const MAX_LISTENERS: u32 = 65536;
/// Capacity of each inbound rule trie.
pub const MAX_INBOUND_RULES: u32 = 1 << 18;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for InboundRecord {}
    unsafe impl aya::Pod for ListenerKey {}
}
