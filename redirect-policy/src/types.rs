//! The data model of the policy core: where values come from, the effective per-workload policy,
//! the compiled trie entries and the decision steps. No behaviour beyond formatting lives here.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Kubernetes object annotations (or labels), key → value.
pub type Annotations = BTreeMap<String, String>;

/// Which object a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The FSM MeshConfig `spec.traffic`.
    Mesh,
    /// A namespace annotation; holds the namespace name.
    Namespace(String),
    /// A pod annotation; holds `"ns/name"`.
    Pod(String),
    /// Built-in default (no object set the field).
    Default,
}

impl Origin {
    /// How errors and explanations name the object.
    pub fn object(&self) -> String {
        match self {
            Origin::Mesh => "mesh config".to_string(),
            Origin::Namespace(ns) => format!("namespace {ns}"),
            Origin::Pod(pod) => format!("pod {pod}"),
            Origin::Default => "default".to_string(),
        }
    }
}

/// Where a value came from: the object and the annotation key or MeshConfig field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub origin: Origin,
    /// Annotation key (`traffic.sidecar.istio.io/excludeOutboundIPRanges`) or MeshConfig field path
    /// (`spec.traffic.outboundIPRangeExclusionList`).
    pub key: String,
}

impl Source {
    pub fn new(origin: Origin, key: impl Into<String>) -> Self {
        Source {
            origin,
            key: key.into(),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::Mesh => write!(f, "mesh config field {}", self.key),
            Origin::Namespace(ns) => write!(f, "namespace {ns} annotation {}", self.key),
            Origin::Pod(pod) => write!(f, "pod {pod} annotation {}", self.key),
            Origin::Default => write!(f, "default for {}", self.key),
        }
    }
}

/// Everything `resolve` needs about one workload. Borrowed so that callers keep ownership of
/// their watch caches.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadInputs<'a> {
    pub mesh: &'a crate::MeshTraffic,
    pub namespace: &'a str,
    pub namespace_annotations: &'a Annotations,
    /// Pod / workload name.
    pub name: &'a str,
    pub pod_annotations: &'a Annotations,
}

/// An inclusive port range, `1 <= lo <= hi`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        PortRange { lo: port, hi: port }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// A rule entry with its provenance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sourced<T> {
    pub value: T,
    pub source: Source,
}

/// The interception mode a workload asked for (Istio `sidecar.istio.io/interceptionMode`, or
/// the MeshConfig `interceptionMode`). Informational except that it may switch interception off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mode {
    /// The value as written (trimmed), e.g. `REDIRECT`, `TPROXY`, `NONE`.
    pub raw: String,
    /// This value turns interception off.
    pub disables: bool,
}

/// One effective policy per workload, after precedence and validation.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct EffectivePolicy {
    /// false = outbound interception off (Istio interceptionMode NONE, `includeOutboundIPRanges=""`
    /// with no included ports, ...).
    pub enabled: bool,
    /// v4 and v6 mixed. v4 rules also apply to v4-mapped v6 destinations.
    pub exclude_cidrs: Vec<Sourced<IpNet>>,
    /// `*` = 0.0.0.0/0 and ::/0.
    pub include_cidrs: Vec<Sourced<IpNet>>,
    pub exclude_ports: Vec<Sourced<PortRange>>,
    pub include_ports: Vec<Sourced<PortRange>>,
    pub inbound_exclude_ports: Vec<Sourced<PortRange>>,
    /// None = all ports (Istio `*`, the default).
    pub inbound_include_ports: Option<Vec<Sourced<PortRange>>>,
    /// Inbound peers whose traffic is left alone (Kuma `exclude-inbound-ips`). Used by the
    /// inbound issue, not by the outbound decision.
    pub inbound_exclude_cidrs: Vec<Sourced<IpNet>>,
    pub exclude_interfaces: Vec<Sourced<String>>,
    /// From Linkerd `proxy-uid` / Kuma `sidecar-uid`; None = the agent's configured proxy uid.
    pub proxy_uid: Option<Sourced<u32>>,
    /// The interception mode asked for, if any object set one.
    pub mode: Option<Sourced<Mode>>,
    /// What turned interception off, if it is off.
    pub enabled_source: Option<Source>,
    /// DNS capture (crate::dns).
    pub dns: crate::dns::DnsPolicy,
}

/// A bad value. Display names the object, the key and the value, e.g.
/// `pod demo/app: annotation traffic.sidecar.istio.io/excludeOutboundPorts: bad value "70000": port out of range 1-65535`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {kind} {key}: bad value {}: {reason}", Shown(.value), kind = key_kind(.key))]
pub struct PolicyError {
    /// `pod ns/name`, `namespace ns` or `mesh config`.
    pub object: String,
    pub key: String,
    /// The offending element (one list item, not the whole list) as written, trimmed.
    pub value: String,
    pub reason: String,
}

/// Values longer than this many characters are cut in messages: a 20 MB annotation must not
/// become a 20 MB log line or Event. The message then says how long the value was.
pub const SHOWN_VALUE_CHARS: usize = 256;

/// A value as messages show it: quoted, cut after [`SHOWN_VALUE_CHARS`] characters with its
/// length in bytes.
pub struct Shown<'a>(pub &'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.char_indices().nth(SHOWN_VALUE_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(
                f,
                "{:?}... (cut; the value is {} bytes)",
                &self.0[..cut],
                self.0.len()
            ),
        }
    }
}

/// MeshConfig keys are field paths (`spec.traffic.…`); everything else is an annotation.
fn key_kind(key: &str) -> &'static str {
    if key.starts_with("spec.") {
        "field"
    } else {
        "annotation"
    }
}

/// The result of `resolve`: the policy and the non-fatal findings (host bits normalised, ...),
/// each naming object, key and value.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Resolved {
    pub policy: EffectivePolicy,
    pub warnings: Vec<String>,
    /// A bad value in an inbound key (see `dialect::keys::is_inbound_key`). It fails only the
    /// inbound part: the outbound policy stands, and the inbound fields of `policy` are the mesh
    /// default (the layers below the object with the bad value), for a workload that has no
    /// last good inbound policy to keep.
    pub inbound_error: Option<PolicyError>,
}

/// What an LPM entry says about a matching destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Exclude,
    Include,
}

impl Action {
    /// The map value the kernel program reads (`redirect_common::action`).
    pub fn value(self) -> u32 {
        match self {
            Action::Exclude => redirect_common::action::EXCLUDE,
            Action::Include => redirect_common::action::INCLUDE,
        }
    }

    pub fn from_value(v: u32) -> Option<Self> {
        match v {
            redirect_common::action::EXCLUDE => Some(Action::Exclude),
            redirect_common::action::INCLUDE => Some(Action::Include),
            _ => None,
        }
    }
}

/// A port prefix: the `len` leading bits of `port` (the other bits are zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortPrefix {
    pub port: u16,
    /// 0..=16 significant leading bits.
    pub len: u8,
}

impl PortPrefix {
    pub fn contains(&self, port: u16) -> bool {
        self.len == 0 || (port ^ self.port) >> (16 - u32::from(self.len.min(16))) == 0
    }
}

/// Trie entries for one workload, sorted and minimal.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Compiled {
    pub v4: Vec<(Ipv4Net, Action)>,
    pub v6: Vec<(Ipv6Net, Action)>,
    pub ports: Vec<(PortPrefix, Action)>,
}

/// Decision steps (docs/architecture.md, "Decision order"): the kernel's own
/// [`redirect_common::decide::OutboundStep`], so that `explain` and the kernel name one set.
pub use redirect_common::decide::OutboundStep as Step;

/// The outcome of the reference evaluator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub redirect: bool,
    pub step: Step,
    /// The rule that decided (None for loopback and not-included, which no rule decides).
    pub source: Option<Source>,
}

/// One line for `explain`, e.g.
/// `bypass at step 4 (excluded_cidr): pod demo/app annotation traffic.sidecar.istio.io/excludeOutboundIPRanges`.
impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.redirect { "redirect" } else { "bypass" };
        let (n, name) = (self.step.number(), self.step.name());
        write!(f, "{what} at step {n} ({name})")?;
        match &self.source {
            Some(s) => write!(f, ": {s}"),
            None => Ok(()),
        }
    }
}
