//! DNS capture (DESIGN §2): shared types of the kernel's DNS programs and the agent.
//!
//! A workload's port-53 traffic (UDP datagrams and TCP connects, to any address) goes to the
//! proxy's DNS listener at `proxy_addr4/6 : Policy::dns_port`. The original server is kept in
//! socket-local storage ([`DnsOrig`] in `DNS_ORIG`), freed with the socket, so that a reply's
//! source and `getpeername()` show the server the application asked.

use crate::flags;

/// The destination port that DNS capture applies to.
pub const DNS_PORT: u16 = 53;

/// Map names (pin file names under `--bpffs-dir`).
pub mod map_names {
    map_names! {
        /// Socket-local storage: the server a captured socket sent to ([`super::DnsOrig`]).
        DNS_ORIG = "DNS_ORIG";
        /// Per-CPU counters of the DNS programs, indexed by [`super::DnsEvent`].
        DNS_STATS = "DNS_STATS";
    }
}

flag_bits! {
    /// `DnsOrig::flags` bits.
    pub mod dns_flags: u16 {
        /// The original server is IPv4 (stored v4-mapped).
        V4,
    }
}

/// The value of `DNS_ORIG`: where a captured socket meant to go, and where it went instead.
/// Addresses in IPv6 form (IPv4 v4-mapped), ports big-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsOrig {
    /// The server the application addressed.
    pub orig_addr: [u8; 16],
    /// The DNS listener the datagram or connect was sent to instead. Only replies from exactly
    /// this address and port get their source rewritten.
    pub target_addr: [u8; 16],
    pub orig_port: [u8; 2],
    pub target_port: [u8; 2],
    /// [`dns_flags`].
    pub flags: u16,
    pub _pad: u16,
}

counter_enum! {
    /// Index into the per-CPU `DNS_STATS` array: one slot per DNS decision or event.
    pub enum DnsEvent (DNS_EVENT_COUNT) {
        /// A UDP datagram (sendmsg with an address) went to the DNS listener.
        UdpCaptured => "udp_captured",
        /// A UDP connect went to the DNS listener.
        UdpConnectCaptured => "udp_connect_captured",
        /// A TCP connect went to the DNS listener.
        TcpCaptured => "tcp_captured",
        /// Port 53 from the proxy itself (its cgroup or uid): left alone.
        BypassProxy => "bypass_proxy",
        /// Port 53 from a registered workload whose DNS capture is off: left alone.
        Off => "off",
        /// Port 53 from a cgroup with no registered workload: left alone.
        NotInMesh => "not_in_mesh",
        /// A reply's source was rewritten back to the original server (recvmsg).
        Restored => "restored",
        /// getpeername was shown the original server.
        Peername => "peername",
        /// The socket-local record could not be created: the query still goes to the listener, but
        /// its reply keeps the listener's source.
        StoreFailed => "store_failed",
    }
}

/// The DNS decision for one port-53 datagram or connect of a registered workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DnsStep {
    /// Not port 53: DNS capture has no say.
    NotDns,
    /// The workload's DNS capture is off.
    Off,
    /// The caller is the proxy (its cgroup or uid): its own upstream queries go out.
    ProxyCaller,
    /// To the DNS listener.
    Captured,
}

/// DNS capture is on in this record.
#[inline(always)]
pub fn capture_on(policy_flags: u32, dns_port: u16) -> bool {
    policy_flags & flags::DNS_CAPTURE != 0 && dns_port != 0
}

/// The whole DNS order, shared by the kernel and `explain`. Excluded CIDRs and ports are not
/// consulted: none of the dialects applies them to DNS capture (docs/policy.md).
#[inline(always)]
pub fn decide_dns(capture: bool, caller_is_proxy: bool, dest_port: u16) -> DnsStep {
    if dest_port != DNS_PORT {
        DnsStep::NotDns
    } else if !capture {
        DnsStep::Off
    } else if caller_is_proxy {
        DnsStep::ProxyCaller
    } else {
        DnsStep::Captured
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for DnsOrig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order() {
        assert_eq!(decide_dns(true, false, 80), DnsStep::NotDns);
        assert_eq!(decide_dns(false, false, 53), DnsStep::Off);
        assert_eq!(decide_dns(false, true, 53), DnsStep::Off);
        assert_eq!(decide_dns(true, true, 53), DnsStep::ProxyCaller);
        assert_eq!(decide_dns(true, false, 53), DnsStep::Captured);
        assert!(!capture_on(flags::DNS_CAPTURE, 0));
        assert!(capture_on(flags::DNS_CAPTURE, 15053));
        assert!(!capture_on(flags::ENABLED, 15053));
    }
}
