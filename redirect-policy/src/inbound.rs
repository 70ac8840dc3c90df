//! Inbound policy (sk_lookup, istio-iptables' ISTIO_INBOUND): the effective policy's inbound lists
//! plus the proxy's own ports → the kernel's inbound tables, and the reference evaluator the
//! property test holds `redirect_common::decide::decide_inbound` to.
//!
//! - excluded ports: the dialect's lists (`excludeInboundPorts`, `inboundPortExclusionList`,
//!   `skip-inbound-ports`, `exclude-inbound-ports`) plus [`own_ports`];
//! - excluded sources: `exclude-inbound-ips`, `skip-subnets`;
//! - included ports: `includeInboundPorts` (`*` or unset = all; empty = none).

use std::net::IpAddr;

use ipnet::IpNet;
use redirect_common::decide::{InboundStep, decide_inbound};

use crate::compile::{range_prefixes, table, trie};
use crate::evaluate::{Lookups, canonical_ip, dest_of, ip_of, lookups, rule};
use crate::types::{Annotations, Compiled, EffectivePolicy, PortPrefix, PortRange, Source};

/// Istio's own ports, never captured inbound (istio-iptables excludes them): 15020 (merged
/// metrics / status), 15021 (health), 15090 (Envoy Prometheus), 15008 (HBONE), 15000 (admin).
pub const ISTIO_OWN_PORTS: [u16; 5] = [15020, 15021, 15090, 15008, 15000];
/// Istio's per-pod status port annotation, also excluded.
pub const ISTIO_STATUS_PORT: &str = "status.sidecar.istio.io/port";
/// OSM's and FSM's inbound listener port (Istio and Kuma use 15006, Linkerd 4143).
pub const OSM_INBOUND_PORT: u16 = 15003;
/// OSM/FSM's init container returns these from its inbound chain: 15010 (Envoy's inbound
/// Prometheus listener) and 15901-15903 (rewritten liveness, readiness and startup probes).
pub const OSM_OWN_PORTS: [u16; 4] = [15010, 15901, 15902, 15903];
/// Linkerd's inbound listener port.
pub const LINKERD_INBOUND_PORT: u16 = 4143;
/// linkerd-proxy-init's default inbound ports to ignore: 4190 (control) and 4191 (admin, where
/// the kubelet's probes and Prometheus reach the proxy).
pub const LINKERD_OWN_PORTS: [u16; 2] = [4190, 4191];
/// Linkerd's per-pod overrides of those two ports, excluded as well.
pub const LINKERD_PORT_KEYS: [&str; 2] = [
    "config.linkerd.io/admin-port",
    "config.linkerd.io/control-port",
];

/// The annotations that name one of the proxy's own ports (a watcher must not ignore them).
pub const OWN_PORT_KEYS: [&str; 3] = [
    ISTIO_STATUS_PORT,
    LINKERD_PORT_KEYS[0],
    LINKERD_PORT_KEYS[1],
];

/// The proxy's own ports for a workload, never captured inbound: its inbound and outbound
/// listeners, plus the fixed ports of the mesh whose inbound port is configured (4143: Linkerd's
/// control and admin ports and the pod's `config.linkerd.io/admin-port`/`control-port`; 15003:
/// OSM/FSM's Prometheus and probe ports; anything else: Istio's ports and the pod's
/// `status.sidecar.istio.io/port`, which also suits Kuma, whose own ports listen on loopback).
/// A bad port value in one of those annotations is ignored, as the mesh's init would fail the
/// pod rather than capture it; the outbound policy is unaffected.
pub fn own_ports(inbound_port: u16, outbound_port: u16, pod: &Annotations) -> Vec<u16> {
    let mut v = vec![inbound_port, outbound_port];
    let keys: &[&str] = match inbound_port {
        LINKERD_INBOUND_PORT => {
            v.extend(LINKERD_OWN_PORTS);
            &LINKERD_PORT_KEYS
        }
        OSM_INBOUND_PORT => {
            v.extend(OSM_OWN_PORTS);
            &[]
        }
        _ => {
            v.extend(ISTIO_OWN_PORTS);
            &[ISTIO_STATUS_PORT]
        }
    };
    v.extend(
        keys.iter()
            .filter_map(|k| pod.get(*k))
            .filter_map(|s| s.trim().parse::<u16>().ok())
            .filter(|p| *p != 0),
    );
    v.sort_unstable();
    v.dedup();
    v
}

/// Compiled inbound tables: `ports` answers steps 2 and 4 (exclude wins over include), `v4`/`v6`
/// hold the excluded sources.
pub fn compile_inbound(p: &EffectivePolicy, own: &[u16]) -> Compiled {
    let excl: Vec<trie::Prefix> = p
        .inbound_exclude_ports
        .iter()
        .map(|s| s.value.clone())
        .chain(own.iter().map(|&o| PortRange::single(o)))
        .flat_map(|r| range_prefixes(&r))
        .collect();
    let incl: Vec<trie::Prefix> = match &p.inbound_include_ports {
        None => vec![trie::Prefix { bits: 0, len: 0 }],
        Some(l) => l.iter().flat_map(|s| range_prefixes(&s.value)).collect(),
    };
    let mut src = EffectivePolicy {
        exclude_cidrs: p.inbound_exclude_cidrs.clone(),
        ..EffectivePolicy::default()
    };
    // Reuse the outbound CIDR compilation: exclusions only, no inclusions.
    src.include_cidrs.clear();
    let cidrs = crate::compile(&src);
    let mut ports: Vec<(PortPrefix, crate::Action)> =
        table(|width| trie::minimal(width, &excl, &incl));
    ports.sort_unstable();
    Compiled {
        v4: cidrs.v4,
        v6: cidrs.v6,
        ports,
    }
}

/// The reference evaluator's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundVerdict {
    pub step: InboundStep,
    /// The rule that decided (None for loopback and not-included; the proxy's own ports name
    /// no annotation).
    pub source: Option<Source>,
}

impl InboundVerdict {
    pub fn steers(&self) -> bool {
        self.step.steers()
    }
}

/// Step number and name for `explain`.
pub fn step_name(s: InboundStep) -> (u8, &'static str) {
    match s {
        InboundStep::Loopback => (1, "loopback"),
        InboundStep::ExcludedPort => (2, "excluded_port"),
        InboundStep::ExcludedSource => (3, "excluded_source"),
        InboundStep::IncludedPort => (4, "included_port"),
        InboundStep::NotIncluded => (5, "not_included"),
    }
}

impl std::fmt::Display for InboundVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.steers() { "proxy" } else { "app" };
        let (n, name) = step_name(self.step);
        write!(f, "{what} at step {n} ({name})")?;
        match &self.source {
            Some(s) => write!(f, ": {s}"),
            None => Ok(()),
        }
    }
}

/// First match wins, straight from the lists.
pub fn evaluate_inbound(
    p: &EffectivePolicy,
    own: &[u16],
    from_loopback: bool,
    port: u16,
    source: IpAddr,
) -> InboundVerdict {
    let v = |step, source| InboundVerdict { step, source };
    if from_loopback {
        return v(InboundStep::Loopback, None);
    }
    if own.contains(&port) {
        return v(InboundStep::ExcludedPort, None);
    }
    if let Some(r) = p
        .inbound_exclude_ports
        .iter()
        .find(|r| r.value.contains(port))
    {
        return v(InboundStep::ExcludedPort, Some(r.source.clone()));
    }
    let source = canonical_ip(source);
    if let Some(r) = p
        .inbound_exclude_cidrs
        .iter()
        .find(|r| net_contains(&r.value, source))
    {
        return v(InboundStep::ExcludedSource, Some(r.source.clone()));
    }
    match &p.inbound_include_ports {
        None => v(InboundStep::IncludedPort, None),
        Some(l) => match l.iter().find(|r| r.value.contains(port)) {
            Some(r) => v(InboundStep::IncludedPort, Some(r.source.clone())),
            None => v(InboundStep::NotIncluded, None),
        },
    }
}

fn net_contains(n: &IpNet, ip: IpAddr) -> bool {
    match (n, ip) {
        (IpNet::V4(n), IpAddr::V4(a)) => n.contains(&a),
        (IpNet::V6(n), IpAddr::V6(a)) => n.contains(&a),
        _ => false,
    }
}

/// The kernel's decision function over compiled tables, which the property test holds to the
/// reference ([`evaluate_inbound`]); `explain --inbound` asks the pinned maps instead, through
/// [`evaluate_inbound_lookups`].
pub fn evaluate_inbound_compiled(
    c: &Compiled,
    from_loopback: bool,
    port: u16,
    source: IpAddr,
) -> InboundStep {
    evaluate_inbound_lookups(from_loopback, port, source, lookups(c))
}

/// `decide_inbound` with caller-supplied lookups (compiled tables or the pinned maps).
pub fn evaluate_inbound_lookups(
    from_loopback: bool,
    port: u16,
    source: IpAddr,
    l: Lookups<
        impl FnOnce(u16) -> Option<crate::Action>,
        impl FnOnce(IpAddr) -> Option<crate::Action>,
    >,
) -> InboundStep {
    let Lookups {
        port: port_lookup,
        ip,
    } = l;
    decide_inbound(
        from_loopback,
        &dest_of(source),
        || rule(port_lookup(port)),
        |d| rule(ip(ip_of(d))),
    )
}

#[cfg(test)]
#[path = "inbound_tests.rs"]
mod tests;
