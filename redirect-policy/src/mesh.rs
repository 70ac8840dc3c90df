//! FSM MeshConfig `spec.traffic` (config.flomesh.io/v1alpha3): the mesh-wide base layer.

use serde::{Deserialize, Deserializer, Serialize};

use super::layer::{Layer, Merge, Setting};
use super::types::{Mode, Origin, PolicyError, PortRange};
use super::values::{self, CidrSyntax, Ctx};

/// FSM MeshConfig `spec.traffic`, with FSM's JSON names. All fields are optional and unknown
/// fields are ignored. Lists stay raw here; `resolve` validates them so that errors can name the
/// field and the bad value. Ports are JSON values because a hand-edited MeshConfig may hold
/// strings or negative numbers, and those must be reported, not fail the whole deserialisation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshTraffic {
    #[serde(
        rename = "outboundIPRangeExclusionList",
        deserialize_with = "null_as_default"
    )]
    pub outbound_ip_range_exclusion_list: Vec<String>,
    #[serde(
        rename = "outboundIPRangeInclusionList",
        deserialize_with = "null_as_default"
    )]
    pub outbound_ip_range_inclusion_list: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub outbound_port_exclusion_list: Vec<serde_json::Value>,
    #[serde(deserialize_with = "null_as_default")]
    pub inbound_port_exclusion_list: Vec<serde_json::Value>,
    #[serde(deserialize_with = "null_as_default")]
    pub network_interface_exclusion_list: Vec<String>,
    /// Egress passthrough. A proxy policy in FSM: it does not change what is intercepted.
    pub enable_egress: Option<bool>,
    /// Informational, except values that clearly mean "off" (see [`mode_disables`]).
    pub interception_mode: Option<String>,
    /// Mesh-wide DNS capture default. Not a MeshConfig field: the file's `dns:` section or the
    /// Kubernetes source's `--dns-capture` sets it.
    #[serde(skip)]
    pub dns: crate::dns::DnsDefault,
}

/// Go encodes a nil slice as `null`; treat it like an absent field.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The field paths that sources and errors name.
pub mod keys {
    pub const KEY_EXCLUDE_CIDRS: &str = "spec.traffic.outboundIPRangeExclusionList";
    pub const KEY_INCLUDE_CIDRS: &str = "spec.traffic.outboundIPRangeInclusionList";
    pub const KEY_EXCLUDE_PORTS: &str = "spec.traffic.outboundPortExclusionList";
    pub const KEY_INBOUND_EXCLUDE_PORTS: &str = "spec.traffic.inboundPortExclusionList";
    pub const KEY_INTERFACES: &str = "spec.traffic.networkInterfaceExclusionList";
    pub const KEY_MODE: &str = "spec.traffic.interceptionMode";
}
pub(crate) use keys::*;

/// Mesh interception modes that can only mean "do not intercept". FSM's own values select an
/// implementation, not whether to intercept, so anything else is informational.
pub(crate) fn mode_disables(raw: &str) -> bool {
    ["none", "disabled", "disable", "off"]
        .iter()
        .any(|m| raw.eq_ignore_ascii_case(m))
}

/// Validates the mesh config into the bottom layer. An empty list sets nothing (and an empty
/// inclusion list means "include all", as in FSM).
pub(crate) fn layer(mesh: &MeshTraffic, warnings: &mut Vec<String>) -> Result<Layer, PolicyError> {
    let origin = Origin::Mesh;
    let mut layer = Layer::default();
    let cidrs = |key: &str, list: &[String], w: &mut Vec<String>| {
        let ctx = Ctx::new(&origin, key);
        list.iter()
            .map(|s| values::cidr(&ctx, s.trim(), CidrSyntax::CidrOnly, w))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| Setting::new(Merge::Override, ctx.source(), v))
    };
    if !mesh.outbound_ip_range_exclusion_list.is_empty() {
        let s = cidrs(
            KEY_EXCLUDE_CIDRS,
            &mesh.outbound_ip_range_exclusion_list,
            warnings,
        )?;
        layer.exclude_cidrs.push(s);
    }
    if !mesh.outbound_ip_range_inclusion_list.is_empty() {
        let s = cidrs(
            KEY_INCLUDE_CIDRS,
            &mesh.outbound_ip_range_inclusion_list,
            warnings,
        )?;
        layer.include_cidrs.push(s);
    }
    if !mesh.outbound_port_exclusion_list.is_empty() {
        let ctx = Ctx::new(&origin, KEY_EXCLUDE_PORTS);
        let v = json_ports(&ctx, &mesh.outbound_port_exclusion_list)?;
        layer
            .exclude_ports
            .push(Setting::new(Merge::Override, ctx.source(), v));
    }
    if !mesh.inbound_port_exclusion_list.is_empty() {
        let ctx = Ctx::new(&origin, KEY_INBOUND_EXCLUDE_PORTS);
        let v = json_ports(&ctx, &mesh.inbound_port_exclusion_list)?;
        layer
            .inbound_exclude_ports
            .push(Setting::new(Merge::Override, ctx.source(), v));
    }
    if !mesh.network_interface_exclusion_list.is_empty() {
        let ctx = Ctx::new(&origin, KEY_INTERFACES);
        let v = mesh
            .network_interface_exclusion_list
            .iter()
            .map(|s| values::interface(&ctx, s.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        layer
            .exclude_interfaces
            .push(Setting::new(Merge::Override, ctx.source(), v));
    }
    if let Some(raw) = &mesh.interception_mode {
        let raw = raw.trim();
        if !raw.is_empty() {
            let ctx = Ctx::new(&origin, KEY_MODE);
            let mode = Mode {
                raw: raw.to_string(),
                disables: mode_disables(raw),
            };
            layer
                .mode
                .push(Setting::new(Merge::Override, ctx.source(), vec![mode]));
        }
    }
    Ok(layer)
}

/// FSM declares these lists as `[]int`: accept JSON integers 1-65535 only.
fn json_ports(ctx: &Ctx, list: &[serde_json::Value]) -> Result<Vec<PortRange>, PolicyError> {
    list.iter()
        .map(|v| match v.as_u64() {
            Some(n) if (1..=65535).contains(&n) => Ok(PortRange::single(n as u16)),
            Some(_) => Err(ctx.error(&v.to_string(), "port out of range 1-65535")),
            None if v.as_i64().is_some() => {
                Err(ctx.error(&v.to_string(), "port out of range 1-65535"))
            }
            None => Err(ctx.error(&v.to_string(), "expected an integer port number")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserialises_fsm_names() {
        let json = r#"{
            "enableEgress": false,
            "enablePermissiveTrafficPolicyMode": true,
            "outboundIPRangeExclusionList": ["10.0.0.0/8"],
            "outboundIPRangeInclusionList": null,
            "outboundPortExclusionList": [6379, "x"],
            "inboundPortExclusionList": [],
            "networkInterfaceExclusionList": ["eth1"],
            "interceptionMode": "PodLevel"
        }"#;
        let m: MeshTraffic = serde_json::from_str(json).unwrap();
        assert_eq!(m.outbound_ip_range_exclusion_list, vec!["10.0.0.0/8"]);
        assert!(m.outbound_ip_range_inclusion_list.is_empty());
        assert_eq!(m.outbound_port_exclusion_list.len(), 2);
        assert_eq!(m.enable_egress, Some(false));
        let back = serde_json::to_value(&m).unwrap();
        assert!(back.get("outboundIPRangeExclusionList").is_some());
        let y: MeshTraffic = serde_yaml::from_str("outboundPortExclusionList: [80]\n").unwrap();
        assert_eq!(y.outbound_port_exclusion_list, vec![serde_json::json!(80)]);
    }

    #[test]
    fn bad_values_name_field_and_value() {
        let mut w = Vec::new();
        let m = MeshTraffic {
            outbound_port_exclusion_list: vec![serde_json::json!(80), serde_json::json!("x")],
            ..Default::default()
        };
        let e = layer(&m, &mut w).unwrap_err();
        assert_eq!(e.key, KEY_EXCLUDE_PORTS);
        assert_eq!(
            e.to_string(),
            "mesh config: field spec.traffic.outboundPortExclusionList: bad value \"\\\"x\\\"\": expected an integer port number"
        );
        for bad in [
            serde_json::json!(0),
            serde_json::json!(-1),
            serde_json::json!(65536),
            serde_json::json!(1.5),
        ] {
            let m = MeshTraffic {
                inbound_port_exclusion_list: vec![bad.clone()],
                ..Default::default()
            };
            let e = layer(&m, &mut w).unwrap_err();
            assert_eq!(e.value, bad.to_string());
        }
        let m = MeshTraffic {
            outbound_ip_range_exclusion_list: vec!["10.0.0.0/33".into()],
            ..Default::default()
        };
        let e = layer(&m, &mut w).unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.value.as_str()),
            (KEY_EXCLUDE_CIDRS, "10.0.0.0/33")
        );
    }

    #[test]
    fn modes() {
        assert!(mode_disables("NONE") && mode_disables("disabled"));
        assert!(!mode_disables("iptables") && !mode_disables("PodLevel"));
    }
}
