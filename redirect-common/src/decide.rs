//! The decision functions, written once. The kernel programs call them with map lookups, and the
//! policy crate calls them with lookups over compiled tables (the property test) or over the
//! pinned maps (`explain --bpffs-dir`), so what `explain` says is what the kernel runs.
//!
//! Lookups are passed as closures and called only when the order reaches them: a proxy's own
//! connect or a disabled workload costs no trie lookup, and loopback costs no CIDR lookup.

use crate::{Decision, action};

/// A rule lookup that found nothing. A plain u32 rather than `Option<u32>`: LLVM leaves the
/// payload of a `None` undefined, and the verifier rejects the uninitialised register it copies.
pub const NO_RULE: u32 = 0;

/// `Policy::base_id` of a workload whose entries are not layered over a base.
pub const NO_BASE: u32 = 0;

/// A layered rule lookup (docs/architecture.md, "Shared policies"): the workload's own entry
/// (`own`, already looked up under its policy id) decides; where it has none, the entries of
/// the shared base `base_id` do (`base` looks them up, and is called only then); an own
/// [`action::STOP`] entry means "no rule" without asking the base.
#[inline(always)]
pub fn layered(own: u32, base_id: u32, base: impl FnOnce(u32) -> u32) -> u32 {
    if own == action::STOP {
        NO_RULE
    } else if own != NO_RULE {
        own
    } else if base_id == NO_BASE {
        NO_RULE
    } else {
        base(base_id)
    }
}

/// A destination address as the datapath evaluates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Dest {
    /// An AF_INET6 address: `::ffff:a.b.c.d` is an IPv4 destination and follows the IPv4 rules,
    /// exactly as iptables sees it.
    #[inline(always)]
    pub fn from_v6(ip: [u8; 16]) -> Dest {
        if ip[..10] == [0u8; 10] && ip[10] == 0xff && ip[11] == 0xff {
            Dest::V4([ip[12], ip[13], ip[14], ip[15]])
        } else {
            Dest::V6(ip)
        }
    }

    /// 127.0.0.0/8 and ::1.
    #[inline(always)]
    pub fn is_loopback(&self) -> bool {
        match self {
            Dest::V4(ip) => ip[0] == 127,
            Dest::V6(ip) => ip[..15] == [0u8; 15] && ip[15] == 1,
        }
    }
}

/// Which step of the outbound order decided (README "How it decides", docs/architecture.md
/// "Decision order"), first match wins. The kernel counts it ([`OutboundStep::decision`]) and
/// `explain` prints it (`redirect_policy::Step` is this type), so both name the same steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutboundStep {
    /// The workload's interception is off (checked before step 1).
    Disabled,
    /// 1: the caller is the proxy (its cgroup or its uid).
    ProxyCaller,
    /// 2: the destination port is excluded.
    ExcludedPort,
    /// 3: the destination is loopback.
    Loopback,
    /// 4: the destination address is in an excluded CIDR.
    ExcludedCidr,
    /// 5: the destination port is included.
    IncludedPort,
    /// 6: the destination address is in an included CIDR.
    IncludedCidr,
    /// 7: nothing included it.
    NotIncluded,
}

impl OutboundStep {
    #[inline(always)]
    pub fn redirects(self) -> bool {
        matches!(
            self,
            OutboundStep::IncludedPort | OutboundStep::IncludedCidr
        )
    }

    /// Stable snake_case name (`explain`, and the serde name).
    pub const fn name(self) -> &'static str {
        match self {
            OutboundStep::ProxyCaller => "proxy_caller",
            OutboundStep::ExcludedPort => "excluded_port",
            OutboundStep::Loopback => "loopback",
            OutboundStep::ExcludedCidr => "excluded_cidr",
            OutboundStep::IncludedPort => "included_port",
            OutboundStep::IncludedCidr => "included_cidr",
            OutboundStep::NotIncluded => "not_included",
            OutboundStep::Disabled => "disabled",
        }
    }

    /// The step number (1-7, docs/architecture.md); 0 for `Disabled`, checked before step 1.
    pub const fn number(self) -> u8 {
        match self {
            OutboundStep::Disabled => 0,
            OutboundStep::ProxyCaller => 1,
            OutboundStep::ExcludedPort => 2,
            OutboundStep::Loopback => 3,
            OutboundStep::ExcludedCidr => 4,
            OutboundStep::IncludedPort => 5,
            OutboundStep::IncludedCidr => 6,
            OutboundStep::NotIncluded => 7,
        }
    }

    /// The counter slot of this outcome.
    #[inline(always)]
    pub fn decision(self) -> Decision {
        match self {
            OutboundStep::Disabled => Decision::Disabled,
            OutboundStep::ProxyCaller => Decision::BypassProxy,
            OutboundStep::ExcludedPort => Decision::BypassPort,
            OutboundStep::Loopback => Decision::BypassLoopback,
            OutboundStep::ExcludedCidr => Decision::BypassCidr,
            OutboundStep::IncludedPort | OutboundStep::IncludedCidr => Decision::Redirected,
            OutboundStep::NotIncluded => Decision::BypassNotIncluded,
        }
    }
}

/// As its [`OutboundStep::name`] (userspace only: `explain --output json`).
#[cfg(feature = "serde")]
impl serde::Serialize for OutboundStep {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// The outbound decision for a TCP connect from a registered workload.
///
/// `port_rule` answers the port trie for the destination port (one lookup serves both the
/// excluded-port step and the included-port step); `cidr_rule` answers the CIDR trie of the
/// destination's family. Both return an [`action`] value or [`NO_RULE`].
#[inline(always)]
pub fn decide_outbound(
    enabled: bool,
    caller_is_proxy: bool,
    dest: &Dest,
    port_rule: impl FnOnce() -> u32,
    cidr_rule: impl FnOnce(&Dest) -> u32,
) -> OutboundStep {
    if !enabled {
        return OutboundStep::Disabled;
    }
    if caller_is_proxy {
        return OutboundStep::ProxyCaller;
    }
    let port = port_rule();
    if port == action::EXCLUDE {
        return OutboundStep::ExcludedPort;
    }
    if dest.is_loopback() {
        return OutboundStep::Loopback;
    }
    let cidr = cidr_rule(dest);
    if cidr == action::EXCLUDE {
        OutboundStep::ExcludedCidr
    } else if port == action::INCLUDE {
        OutboundStep::IncludedPort
    } else if cidr == action::INCLUDE {
        OutboundStep::IncludedCidr
    } else {
        OutboundStep::NotIncluded
    }
}

/// Which step of the inbound order decided (istio-iptables' ISTIO_INBOUND), first match wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InboundStep {
    /// 1: arrived on lo (iptables PREROUTING never sees it): the normal lookup, the app.
    Loopback,
    /// 2: the destination port is excluded (the dialect's list or the proxy's own ports).
    ExcludedPort,
    /// 3: the source address is excluded.
    ExcludedSource,
    /// 4: the destination port is included (`*` = all): the proxy's listener.
    IncludedPort,
    /// 5: nothing included it: the app.
    NotIncluded,
}

impl InboundStep {
    #[inline(always)]
    pub fn steers(self) -> bool {
        matches!(self, InboundStep::IncludedPort)
    }

    /// The counter slot of this outcome (a steered connection counts `Steered` only once the
    /// listener took it).
    #[inline(always)]
    pub fn counter(self) -> crate::inbound::InboundCounter {
        use crate::inbound::InboundCounter as C;
        match self {
            InboundStep::Loopback => C::Loopback,
            InboundStep::ExcludedPort => C::ExcludedPort,
            InboundStep::ExcludedSource => C::ExcludedSource,
            InboundStep::IncludedPort => C::Steered,
            InboundStep::NotIncluded => C::NotIncluded,
        }
    }
}

/// The inbound decision for a new TCP connection into a meshed network namespace.
///
/// `port_rule` answers the inbound port trie for the destination port (one lookup serves steps
/// 2 and 4); `source_rule` answers the source trie of the source's family. Both return an
/// [`action`] value or [`NO_RULE`].
#[inline(always)]
pub fn decide_inbound(
    from_loopback: bool,
    source: &Dest,
    port_rule: impl FnOnce() -> u32,
    source_rule: impl FnOnce(&Dest) -> u32,
) -> InboundStep {
    if from_loopback {
        return InboundStep::Loopback;
    }
    let port = port_rule();
    if port == action::EXCLUDE {
        return InboundStep::ExcludedPort;
    }
    if source_rule(source) == action::EXCLUDE {
        return InboundStep::ExcludedSource;
    }
    if port == action::INCLUDE {
        InboundStep::IncludedPort
    } else {
        InboundStep::NotIncluded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_is_v4() {
        let mut ip = [0u8; 16];
        ip[10] = 0xff;
        ip[11] = 0xff;
        ip[12..].copy_from_slice(&[127, 0, 0, 5]);
        assert_eq!(Dest::from_v6(ip), Dest::V4([127, 0, 0, 5]));
        assert!(Dest::from_v6(ip).is_loopback());
        let mut one = [0u8; 16];
        one[15] = 1;
        assert_eq!(Dest::from_v6(one), Dest::V6(one));
        assert!(Dest::V6(one).is_loopback());
    }

    /// Lookups that must not be reached.
    fn never() -> u32 {
        panic!("looked up")
    }
    fn never_addr(_: &Dest) -> u32 {
        panic!("looked up")
    }

    type PortLookup = fn() -> u32;
    type AddrLookup = fn(&Dest) -> u32;

    #[test]
    fn lookups_only_when_reached() {
        let d = Dest::V4([10, 0, 0, 1]);
        let lo = Dest::V4([127, 0, 0, 1]);
        // (enabled, caller is the proxy, destination, port lookup, CIDR lookup, step).
        let cases: [(bool, bool, Dest, PortLookup, AddrLookup, OutboundStep); 5] = [
            (false, false, d, never, never_addr, OutboundStep::Disabled),
            (true, true, d, never, never_addr, OutboundStep::ProxyCaller),
            (
                true,
                false,
                lo,
                || NO_RULE,
                never_addr,
                OutboundStep::Loopback,
            ),
            (
                true,
                false,
                d,
                || action::INCLUDE,
                |_| action::EXCLUDE,
                OutboundStep::ExcludedCidr,
            ),
            (
                true,
                false,
                d,
                || action::INCLUDE,
                |_| NO_RULE,
                OutboundStep::IncludedPort,
            ),
        ];
        for (enabled, proxy, dest, port, cidr, step) in cases {
            assert_eq!(decide_outbound(enabled, proxy, &dest, port, cidr), step);
        }
    }

    #[test]
    fn layered_falls_back_only_on_no_rule() {
        let never = |_: u32| -> u32 { panic!("looked up the base") };
        assert_eq!(layered(action::EXCLUDE, 7, never), action::EXCLUDE);
        assert_eq!(layered(action::INCLUDE, 7, never), action::INCLUDE);
        assert_eq!(layered(action::STOP, 7, never), NO_RULE);
        assert_eq!(layered(NO_RULE, NO_BASE, never), NO_RULE);
        assert_eq!(
            layered(NO_RULE, 7, |b| if b == 7 { action::EXCLUDE } else { 0 }),
            action::EXCLUDE
        );
        assert_eq!(layered(NO_RULE, 7, |_| NO_RULE), NO_RULE);
    }

    #[test]
    fn inbound_order() {
        let s = Dest::V4([198, 18, 0, 1]);
        // (arrived on lo, port lookup, source lookup, step).
        let cases: [(bool, PortLookup, AddrLookup, InboundStep); 6] = [
            (true, never, never_addr, InboundStep::Loopback),
            (
                false,
                || action::EXCLUDE,
                never_addr,
                InboundStep::ExcludedPort,
            ),
            (
                false,
                || action::INCLUDE,
                |_| action::EXCLUDE,
                InboundStep::ExcludedSource,
            ),
            (
                false,
                || NO_RULE,
                |_| action::EXCLUDE,
                InboundStep::ExcludedSource,
            ),
            (
                false,
                || action::INCLUDE,
                |_| NO_RULE,
                InboundStep::IncludedPort,
            ),
            (false, || NO_RULE, |_| NO_RULE, InboundStep::NotIncluded),
        ];
        for (from_loopback, port, source, step) in cases {
            assert_eq!(decide_inbound(from_loopback, &s, port, source), step);
        }
        assert!(InboundStep::IncludedPort.steers());
    }
}
