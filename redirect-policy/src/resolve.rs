//! Precedence: mesh config, namespace annotations and pod annotations → one [`EffectivePolicy`].
//!
//! Field by field, the most specific object with an *override* key for the field wins (pod over
//! namespace over mesh); if several dialects set the field on that object their values are
//! unioned. Then every *union* key (FSM/OSM) on the pod or the namespace adds its values. See
//! docs/policy.md for the table.

use std::collections::BTreeSet;

use super::dialect;
use super::layer::{Layer, Merge, Setting};
use super::mesh::{self, KEY_INCLUDE_CIDRS};
use super::types::{
    EffectivePolicy, Origin, PolicyError, Resolved, Source, Sourced, WorkloadInputs,
};
use super::values;

/// The mesh config validated into the bottom layer, with the warnings that gave: what every
/// workload's resolution starts from. Parsing a 100,000-CIDR mesh list costs far more than the
/// rest of a resolution, so callers that resolve many workloads parse it once per mesh config
/// content ([`MeshLayer::parse`]) and resolve each with [`resolve_with`].
#[derive(Clone, Debug)]
pub struct MeshLayer {
    pub(crate) layer: Layer,
    pub(crate) warnings: Vec<String>,
}

impl MeshLayer {
    /// The first bad value of the mesh config is the error every workload's resolution gives.
    pub fn parse(mesh: &mesh::MeshTraffic) -> Result<Self, PolicyError> {
        let mut warnings = Vec::new();
        let layer = mesh::layer(mesh, &mut warnings)?;
        Ok(Self { layer, warnings })
    }
}

/// Resolves one workload's policy. All or nothing for the outbound part: the first bad value
/// outside the inbound keys is an error, and nothing is returned for the workload. A bad value
/// in an inbound key fails only the inbound part ([`Resolved::inbound_error`]): the inbound
/// fields then come from the layers below that object, as the mesh default does for outbound.
/// Never panics.
pub fn resolve(inputs: &WorkloadInputs) -> Result<Resolved, PolicyError> {
    resolve_with(&MeshLayer::parse(inputs.mesh)?, inputs)
}

/// [`resolve`] with the mesh config already parsed: `mesh` must be `inputs.mesh`'s layer.
pub fn resolve_with(mesh: &MeshLayer, inputs: &WorkloadInputs) -> Result<Resolved, PolicyError> {
    let mut warnings = mesh.warnings.clone();
    let objects = object_layers(inputs, &mut warnings)?;
    // Most specific first.
    let layers = [&objects.pod, &objects.ns, &mesh.layer];
    let mut policy = combine(&layers)?;
    policy.dns = super::dns::resolve(inputs, &policy)?;
    Ok(Resolved {
        policy,
        warnings,
        inbound_error: objects.inbound_error,
    })
}

/// The namespace's and the pod's layers, and the inbound-only error.
pub(crate) struct ObjectLayers {
    pub pod: Layer,
    pub ns: Layer,
    pub inbound_error: Option<PolicyError>,
}

/// Parses the namespace's and the pod's annotations, in the order (and so with the warnings and
/// the first error) every resolution has.
pub(crate) fn object_layers(
    inputs: &WorkloadInputs,
    warnings: &mut Vec<String>,
) -> Result<ObjectLayers, PolicyError> {
    let ns_origin = Origin::Namespace(inputs.namespace.to_string());
    let pod_origin = Origin::Pod(format!("{}/{}", inputs.namespace, inputs.name));
    let (ns_out, ns_in) = dialect::split_inbound(inputs.namespace_annotations);
    let (pod_out, pod_in) = dialect::split_inbound(inputs.pod_annotations);
    let mut ns = dialect::layer(&ns_origin, &ns_out, warnings)?;
    let mut pod = dialect::layer(&pod_origin, &pod_out, warnings)?;
    // The namespace's inbound keys first: when they are bad, the pod's (which override them)
    // are dropped too, leaving the mesh's.
    let mut inbound_error = None;
    for (layer, origin, ann) in [
        (&mut ns, &ns_origin, &ns_in),
        (&mut pod, &pod_origin, &pod_in),
    ] {
        match dialect::layer(origin, ann, warnings) {
            Ok(l) => layer.absorb_inbound(l),
            Err(e) => {
                inbound_error = Some(e);
                break;
            }
        }
    }
    Ok(ObjectLayers {
        pod,
        ns,
        inbound_error,
    })
}

fn combine(layers: &[&Layer; 3]) -> Result<EffectivePolicy, PolicyError> {
    let include_cidrs = merge_list(field(layers, |l| &l.include_cidrs));
    let include_ports = merge_list(field(layers, |l| &l.include_ports));
    let inbound_include = merge_list(field(layers, |l| &l.inbound_include_ports));
    let mode = merge_scalar(layers.map(|l| l.mode.as_slice()));
    let proxy_uid = merge_scalar(layers.map(|l| l.proxy_uid.as_slice()));

    let mut p = EffectivePolicy {
        enabled: true,
        exclude_cidrs: merge_list(field(layers, |l| &l.exclude_cidrs)).values,
        include_cidrs: include_cidrs.values,
        exclude_ports: merge_list(field(layers, |l| &l.exclude_ports)).values,
        include_ports: include_ports.values,
        inbound_exclude_ports: merge_list(field(layers, |l| &l.inbound_exclude_ports)).values,
        inbound_include_ports: match inbound_include.wildcard || !inbound_include.set {
            true => None,
            false => Some(inbound_include.values),
        },
        inbound_exclude_cidrs: merge_list(field(layers, |l| &l.inbound_exclude_cidrs)).values,
        exclude_interfaces: merge_list(field(layers, |l| &l.exclude_interfaces)).values,
        proxy_uid: proxy_uid?,
        mode: mode?,
        enabled_source: None,
        dns: Default::default(),
    };
    // Nothing overrode the inclusion list and no union key added to it: FSM's "empty = all" and
    // Istio's default `*`. A union key alone (FSM pod inclusion list) restricts, as in FSM.
    if !include_cidrs.overridden && p.include_cidrs.is_empty() {
        p.include_cidrs = values::all_cidrs()
            .into_iter()
            .map(|value| Sourced {
                value,
                source: Source::new(Origin::Default, KEY_INCLUDE_CIDRS),
            })
            .collect();
    }
    if let Some(m) = p.mode.as_ref().filter(|m| m.value.disables) {
        p.enabled = false;
        p.enabled_source = Some(m.source.clone());
    } else if p.include_cidrs.is_empty() && p.include_ports.is_empty() {
        // Istio: `includeOutboundIPRanges: ""` and no included ports means no outbound capture.
        p.enabled = false;
        p.enabled_source = include_cidrs.decided_by;
    }
    Ok(p)
}

/// One field's settings from each layer, most specific first.
fn field<'a, T>(
    layers: &[&'a Layer; 3],
    f: fn(&Layer) -> &Vec<Setting<T>>,
) -> [&'a [Setting<T>]; 3] {
    layers.map(|l| f(l).as_slice())
}

/// A list field after precedence.
struct Merged<T> {
    values: Vec<Sourced<T>>,
    /// Some layer set the field with an override key.
    overridden: bool,
    /// Some key set the field at all.
    set: bool,
    wildcard: bool,
    /// The first override key of the winning layer.
    decided_by: Option<Source>,
}

/// The override settings of the most specific layer that has any, unioned, then every union
/// setting. Duplicate values keep their first source (the one `explain` reports).
fn merge_list<T: Clone + Ord>(layers: [&[Setting<T>]; 3]) -> Merged<T> {
    let winner = layers
        .iter()
        .find(|l| l.iter().any(|s| s.merge == Merge::Override));
    let overrides = winner
        .into_iter()
        .flat_map(|l| l.iter().filter(|s| s.merge == Merge::Override));
    let unions = layers
        .iter()
        .flat_map(|l| l.iter().filter(|s| s.merge == Merge::Union));
    let mut out = Merged {
        values: Vec::new(),
        overridden: winner.is_some(),
        set: layers.iter().any(|l| !l.is_empty()),
        wildcard: false,
        decided_by: None,
    };
    let mut seen = BTreeSet::new();
    for (i, s) in overrides.chain(unions).enumerate() {
        if i == 0 && s.merge == Merge::Override {
            out.decided_by = Some(s.source.clone());
        }
        out.wildcard |= s.wildcard;
        for v in &s.values {
            if seen.insert(v.clone()) {
                out.values.push(Sourced {
                    value: v.clone(),
                    source: s.source.clone(),
                });
            }
        }
    }
    out
}

/// A scalar field: the most specific layer that sets it wins. Two keys on the same object that
/// disagree (Linkerd `proxy-uid` 2102 and Kuma `sidecar-uid` 5678) are an error, because the
/// datapath has room for one value and picking one silently would be a partial policy.
pub(crate) fn merge_scalar<T: Clone + PartialEq + std::fmt::Debug>(
    layers: [&[Setting<T>]; 3],
) -> Result<Option<Sourced<T>>, PolicyError> {
    let Some(winner) = layers.iter().find(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let mut settings = winner
        .iter()
        .filter_map(|s| s.values.first().map(|v| (s, v)));
    let Some((first, value)) = settings.next() else {
        return Ok(None);
    };
    if let Some((other, v)) = settings.find(|(_, v)| *v != value) {
        return Err(PolicyError {
            object: other.source.origin.object(),
            key: other.source.key.clone(),
            value: format!("{v:?}"),
            reason: format!("conflicts with {} = {value:?}", first.source.key),
        });
    }
    Ok(Some(Sourced {
        value: value.clone(),
        source: first.source.clone(),
    }))
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
