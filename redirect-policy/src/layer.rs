//! What one object (the mesh config, a namespace or a pod) says about each policy field, before
//! precedence is applied. Dialect parsers fill a [`Layer`]; `resolve` merges the three layers.

use ipnet::IpNet;

use super::types::{Mode, PortRange, Source};

/// How a setting combines with the layers below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Merge {
    /// Replaces what the less specific layers say (Istio, Linkerd, Kuma, the mesh config itself).
    Override,
    /// Adds to whatever the field resolves to (FSM and OSM document a union with the mesh lists).
    Union,
}

/// One key's contribution to one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Setting<T> {
    pub merge: Merge,
    pub source: Source,
    pub values: Vec<T>,
    /// The value was `*` where the field has an "all" meaning that is not a list (inbound ports).
    pub wildcard: bool,
}

impl<T> Setting<T> {
    pub fn new(merge: Merge, source: Source, values: Vec<T>) -> Self {
        Setting {
            merge,
            source,
            values,
            wildcard: false,
        }
    }
}

/// Every field one object can set. Each field holds the settings of all the keys (of any
/// dialect) present on that object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Layer {
    pub exclude_cidrs: Vec<Setting<IpNet>>,
    pub include_cidrs: Vec<Setting<IpNet>>,
    pub exclude_ports: Vec<Setting<PortRange>>,
    pub include_ports: Vec<Setting<PortRange>>,
    pub inbound_exclude_ports: Vec<Setting<PortRange>>,
    pub inbound_include_ports: Vec<Setting<PortRange>>,
    pub inbound_exclude_cidrs: Vec<Setting<IpNet>>,
    pub exclude_interfaces: Vec<Setting<String>>,
    /// Scalar: each setting holds exactly one value.
    pub proxy_uid: Vec<Setting<u32>>,
    /// Scalar: each setting holds exactly one value.
    pub mode: Vec<Setting<Mode>>,
}

impl Layer {
    /// Takes the inbound fields of `other` (a layer parsed from the same object's inbound keys).
    pub fn absorb_inbound(&mut self, other: Layer) {
        self.inbound_exclude_ports
            .extend(other.inbound_exclude_ports);
        self.inbound_include_ports
            .extend(other.inbound_include_ports);
        self.inbound_exclude_cidrs
            .extend(other.inbound_exclude_cidrs);
    }
}
