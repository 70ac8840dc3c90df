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
    /// A field of the MeshConfig's `spec.traffic`.
    macro_rules! traffic {
        ($field:literal) => {
            concat!("spec.traffic.", $field)
        };
    }
    pub const KEY_EXCLUDE_CIDRS: &str = traffic!("outboundIPRangeExclusionList");
    pub const KEY_INCLUDE_CIDRS: &str = traffic!("outboundIPRangeInclusionList");
    pub const KEY_EXCLUDE_PORTS: &str = traffic!("outboundPortExclusionList");
    pub const KEY_INBOUND_EXCLUDE_PORTS: &str = traffic!("inboundPortExclusionList");
    pub const KEY_INTERFACES: &str = traffic!("networkInterfaceExclusionList");
    pub const KEY_MODE: &str = traffic!("interceptionMode");
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
    let (l, t) = (&mut layer, mesh);
    let mut cidr = |c: &Ctx, s: &String| values::cidr(c, s.trim(), CidrSyntax::CidrOnly, warnings);
    let interface = |c: &Ctx, s: &String| values::interface(c, s.trim());
    set(
        &mut l.exclude_cidrs,
        KEY_EXCLUDE_CIDRS,
        &t.outbound_ip_range_exclusion_list,
        &mut cidr,
    )?;
    set(
        &mut l.include_cidrs,
        KEY_INCLUDE_CIDRS,
        &t.outbound_ip_range_inclusion_list,
        &mut cidr,
    )?;
    set(
        &mut l.exclude_ports,
        KEY_EXCLUDE_PORTS,
        &t.outbound_port_exclusion_list,
        json_port,
    )?;
    let inbound = &mut l.inbound_exclude_ports;
    set(
        inbound,
        KEY_INBOUND_EXCLUDE_PORTS,
        &t.inbound_port_exclusion_list,
        json_port,
    )?;
    set(
        &mut l.exclude_interfaces,
        KEY_INTERFACES,
        &t.network_interface_exclusion_list,
        interface,
    )?;
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

/// Adds the setting a list field of the mesh config gives under `key`, each item parsed by
/// `item`; an empty list sets nothing.
fn set<I, T>(
    field: &mut Vec<Setting<T>>,
    key: &str,
    items: &[I],
    mut item: impl FnMut(&Ctx, &I) -> Result<T, PolicyError>,
) -> Result<(), PolicyError> {
    if !items.is_empty() {
        let ctx = Ctx::new(&Origin::Mesh, key);
        let v = items.iter().map(|i| item(&ctx, i));
        let v = v.collect::<Result<Vec<_>, _>>()?;
        field.push(Setting::new(Merge::Override, ctx.source(), v));
    }
    Ok(())
}

/// FSM declares these lists as `[]int`: accept JSON integers 1-65535 only.
fn json_port(ctx: &Ctx, v: &serde_json::Value) -> Result<PortRange, PolicyError> {
    match v.as_u64() {
        Some(n) if (1..=65535).contains(&n) => Ok(PortRange::single(n as u16)),
        Some(_) => Err(ctx.error(&v.to_string(), "port out of range 1-65535")),
        None if v.as_i64().is_some() => Err(ctx.error(&v.to_string(), "port out of range 1-65535")),
        None => Err(ctx.error(&v.to_string(), "expected an integer port number")),
    }
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
