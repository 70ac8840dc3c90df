//! A pod's policy as what its annotations add to its mesh default, without resolving the whole
//! policy again. At node scale a pod that adds ten CIDRs to a 100,000-CIDR mesh list (FSM's and
//! OSM's union keys, or a union port exclusion) would otherwise cost a full merge of the mesh
//! list per pod and per edit; this costs the pod's own annotations.
//!
//! Why it is exact: when every setting of the pod's layer is a union key on the excluded CIDRs or
//! ports, precedence picks the same override layer for every field as it does without the pod's
//! annotations (docs/policy.md), so every field but those two is the mesh default's, and those two
//! are the mesh default's values plus the pod's (`resolve.rs`, `merge_list`). The tests below hold
//! [`additions`] to [`resolve`](crate::resolve) for that.
use ipnet::IpNet;

use super::layer::{Layer, Merge, Setting};
use super::resolve::{MeshLayer, merge_scalar, object_layers};
use super::types::{EffectivePolicy, PolicyError, PortRange, WorkloadInputs};
use crate::DnsPolicy;

/// What a pod's annotations add to the policy its namespace and the mesh give it.
#[derive(Clone, Debug, PartialEq)]
pub struct Additions {
    /// Excluded CIDRs and ports of the pod's own (some may be in the mesh default already).
    pub exclude_cidrs: Vec<IpNet>,
    pub exclude_ports: Vec<PortRange>,
    /// The pod's DNS capture (its annotations may set it).
    pub dns: DnsPolicy,
    /// Every warning [`resolve`](crate::resolve) gives for the pod, in the same order.
    pub warnings: Vec<String>,
    /// As [`Resolved::inbound_error`](crate::Resolved::inbound_error).
    pub inbound_error: Option<PolicyError>,
}

/// `Ok(Some)`: [`resolve`](crate::resolve) of `inputs` gives the policy of `inputs` without pod
/// annotations, plus [`Additions`]' exclusions, with the DNS policy, warnings and inbound error
/// of [`Additions`]. `Ok(None)`: the pod's annotations do more than add exclusions (resolve it
/// whole then). `Err`: the error `resolve` gives. `mesh` must be `inputs.mesh`'s layer.
pub fn additions(
    mesh: &MeshLayer,
    inputs: &WorkloadInputs,
) -> Result<Option<Additions>, PolicyError> {
    let mut warnings = mesh.warnings.clone();
    let objects = object_layers(inputs, &mut warnings)?;
    let Some((exclude_cidrs, exclude_ports)) = only_added_exclusions(&objects.pod) else {
        return Ok(None);
    };
    let layers = [&objects.pod, &objects.ns, &mesh.layer];
    // The scalars `resolve` checks (the pod sets neither, so these are the mesh default's), in
    // its order, so that a conflict gives the same error.
    merge_scalar(layers.map(|l| l.proxy_uid.as_slice()))?;
    let mode = merge_scalar(layers.map(|l| l.mode.as_slice()))?;
    // DNS capture reads only the mode from the policy.
    let policy = EffectivePolicy {
        mode,
        ..EffectivePolicy::default()
    };
    let dns = super::dns::resolve(inputs, &policy)?;
    Ok(Some(Additions {
        exclude_cidrs,
        exclude_ports,
        dns,
        warnings,
        inbound_error: objects.inbound_error,
    }))
}

/// The values of a layer that only adds excluded CIDRs and ports by union keys.
fn only_added_exclusions(pod: &Layer) -> Option<(Vec<IpNet>, Vec<PortRange>)> {
    let Layer {
        exclude_cidrs,
        include_cidrs,
        exclude_ports,
        include_ports,
        inbound_exclude_ports,
        inbound_include_ports,
        inbound_exclude_cidrs,
        exclude_interfaces,
        proxy_uid,
        mode,
    } = pod;
    let others_empty = include_cidrs.is_empty()
        && include_ports.is_empty()
        && inbound_exclude_ports.is_empty()
        && inbound_include_ports.is_empty()
        && inbound_exclude_cidrs.is_empty()
        && exclude_interfaces.is_empty()
        && proxy_uid.is_empty()
        && mode.is_empty();
    fn unions<T: Clone>(settings: &[Setting<T>]) -> Option<Vec<T>> {
        settings
            .iter()
            .all(|s| s.merge == Merge::Union && !s.wildcard)
            .then(|| settings.iter().flat_map(|s| s.values.clone()).collect())
    }
    if !others_empty {
        return None;
    }
    Some((unions(exclude_cidrs)?, unions(exclude_ports)?))
}

#[cfg(test)]
#[path = "additions_tests.rs"]
mod tests;
