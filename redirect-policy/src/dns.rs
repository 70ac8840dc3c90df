//! DNS capture settings (issue 17): whether a workload's port-53 traffic goes to its proxy's DNS
//! listener, and on which port.
//!
//! - Istio: `proxy.istio.io/config` (a ProxyConfig in YAML or JSON) with
//!   `proxyMetadata.ISTIO_META_DNS_CAPTURE: "true"`; Istio's DNS proxy listens on 15053, so the
//!   port is the mesh default.
//! - Kuma: `kuma.io/builtin-dns: enabled|disabled` and `kuma.io/builtin-dns-port`.
//! - Mesh-wide default: the file's `dns: {capture, port}`, or the Kubernetes source's
//!   `--dns-capture` (and `--dns-port`).
//!
//! Precedence as for every scalar field: pod over namespace over the mesh default, each of
//! `capture` and `port` on its own; two keys on one object that disagree are an error. An
//! interception mode that switches interception off (Istio `NONE`) also switches DNS capture
//! off, as no istio-init rules exist then.

use std::num::NonZeroU16;

use serde::{Deserialize, Serialize};

use super::types::{Annotations, EffectivePolicy, Origin, PolicyError, Source, Sourced};
use super::values::{self, Ctx};

pub mod keys {
    keys! {
        /// Istio's per-pod ProxyConfig; we read `proxyMetadata.ISTIO_META_DNS_CAPTURE` from it.
        ISTIO_PROXY_CONFIG = "proxy.istio.io/config";
        KUMA_BUILTIN_DNS = "kuma.io/builtin-dns";
        KUMA_BUILTIN_DNS_PORT = "kuma.io/builtin-dns-port";
    }
    /// The proxyMetadata variable inside [`ISTIO_PROXY_CONFIG`] (not an annotation).
    pub const ISTIO_DNS_CAPTURE: &str = "ISTIO_META_DNS_CAPTURE";
    /// The file's mesh-wide default (`dns:`), as `explain` names it.
    pub const FILE_DEFAULT: &str = "dns";
    /// The Kubernetes source's mesh-wide default.
    pub const FLAG_DEFAULT: &str = "--dns-capture";
}
use keys::*;

/// Istio's and Kuma's DNS listener port.
pub const DEFAULT_DNS_PORT: u16 = 15053;

/// The mesh-wide default: the file's `dns: {capture: true, port: 15053}` or the Kubernetes
/// source's flags. Carried in [`crate::MeshTraffic::dns`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsDefault {
    #[serde(default)]
    pub capture: bool,
    /// 0 is refused when the file is read.
    #[serde(default = "default_port")]
    pub port: NonZeroU16,
    /// How `explain` names this default (`dns` for the file, `--dns-capture` for the flag).
    #[serde(skip, default = "file_key")]
    pub key: String,
}

fn default_port() -> NonZeroU16 {
    NonZeroU16::new(DEFAULT_DNS_PORT).expect("15053 is not 0")
}

fn file_key() -> String {
    FILE_DEFAULT.to_string()
}

impl Default for DnsDefault {
    fn default() -> Self {
        DnsDefault {
            capture: false,
            port: default_port(),
            key: file_key(),
        }
    }
}

/// A workload's effective DNS capture.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DnsPolicy {
    /// On or off, and what decided it (None: nothing set it, so off).
    pub capture: Option<Sourced<bool>>,
    /// The listener port and where it came from.
    pub port: Option<Sourced<u16>>,
}

impl DnsPolicy {
    pub fn enabled(&self) -> bool {
        self.capture.as_ref().is_some_and(|c| c.value)
    }

    /// The record's `dns_port`: the listener port when capture is on, else 0.
    pub fn record_port(&self) -> u16 {
        match (&self.capture, &self.port) {
            (Some(c), Some(p)) if c.value => p.value,
            (Some(c), None) if c.value => DEFAULT_DNS_PORT,
            _ => 0,
        }
    }
}

/// What one object's annotations say about DNS.
#[derive(Default)]
struct DnsLayer {
    capture: Vec<Sourced<bool>>,
    port: Vec<Sourced<u16>>,
}

/// Resolves the DNS settings of one workload, after the rest of its policy (whose mode may
/// switch capture off).
pub(crate) fn resolve(
    inputs: &crate::WorkloadInputs,
    policy: &EffectivePolicy,
) -> Result<DnsPolicy, PolicyError> {
    let pod_origin = Origin::Pod(format!("{}/{}", inputs.namespace, inputs.name));
    let ns_origin = Origin::Namespace(inputs.namespace.to_string());
    let pod = layer(&pod_origin, inputs.pod_annotations)?;
    let ns = layer(&ns_origin, inputs.namespace_annotations)?;
    let d = &inputs.mesh.dns;
    let mesh = DnsLayer {
        capture: vec![Sourced {
            value: d.capture,
            source: Source::new(Origin::Mesh, d.key.clone()),
        }],
        port: vec![Sourced {
            value: d.port.get(),
            source: Source::new(Origin::Mesh, format!("{}.port", d.key)),
        }],
    };
    let layers = [&pod, &ns, &mesh];
    let mut capture = scalar(layers.map(|l| l.capture.as_slice()))?;
    let port = scalar(layers.map(|l| l.port.as_slice()))?;
    if let Some(m) = policy.mode.as_ref().filter(|m| m.value.disables) {
        capture = Some(Sourced {
            value: false,
            source: m.source.clone(),
        });
    }
    Ok(DnsPolicy { capture, port })
}

/// The most specific layer that sets the value wins; disagreeing keys on it are an error.
fn scalar<T: Clone + PartialEq + std::fmt::Debug>(
    layers: [&[Sourced<T>]; 3],
) -> Result<Option<Sourced<T>>, PolicyError> {
    let Some(winner) = layers.into_iter().find(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let first = &winner[0];
    if let Some(other) = winner.iter().find(|s| s.value != first.value) {
        return Err(PolicyError {
            object: other.source.origin.object(),
            key: other.source.key.clone(),
            value: format!("{:?}", other.value),
            reason: format!("conflicts with {} = {:?}", first.source.key, first.value),
        });
    }
    Ok(Some(first.clone()))
}

fn layer(origin: &Origin, ann: &Annotations) -> Result<DnsLayer, PolicyError> {
    let mut l = DnsLayer::default();
    if let Some(raw) = ann.get(ISTIO_PROXY_CONFIG) {
        let ctx = Ctx::new(origin, ISTIO_PROXY_CONFIG);
        if let Some(on) = istio_capture(&ctx, raw)? {
            l.capture.push(Sourced {
                value: on,
                source: ctx.source(),
            });
        }
    }
    if let Some(raw) = ann.get(KUMA_BUILTIN_DNS) {
        let ctx = Ctx::new(origin, KUMA_BUILTIN_DNS);
        let on = match raw.trim() {
            "enabled" | "true" => true,
            "disabled" | "false" => false,
            v => return Err(ctx.error(v, "expected enabled or disabled")),
        };
        l.capture.push(Sourced {
            value: on,
            source: ctx.source(),
        });
    }
    if let Some(raw) = ann.get(KUMA_BUILTIN_DNS_PORT) {
        let ctx = Ctx::new(origin, KUMA_BUILTIN_DNS_PORT);
        let port = values::port(&ctx, raw.trim())?;
        l.port.push(Sourced {
            value: port,
            source: ctx.source(),
        });
    }
    Ok(l)
}

/// The part of Istio's ProxyConfig we read. Every other field is ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IstioProxyConfig {
    #[serde(default)]
    proxy_metadata: std::collections::BTreeMap<String, serde_yaml::Value>,
}

/// `proxyMetadata.ISTIO_META_DNS_CAPTURE` as Go's strconv.ParseBool reads it (Istio's own parser).
fn istio_capture(ctx: &Ctx, raw: &str) -> Result<Option<bool>, PolicyError> {
    let cfg: IstioProxyConfig = match serde_yaml::from_str::<Option<IstioProxyConfig>>(raw) {
        Ok(c) => match c {
            Some(c) => c,
            None => return Ok(None),
        },
        Err(e) => return Err(ctx.error(raw.trim(), format!("not a ProxyConfig: {e}"))),
    };
    let Some(v) = cfg.proxy_metadata.get(ISTIO_DNS_CAPTURE) else {
        return Ok(None);
    };
    let text = match v {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        other => format!("{other:?}"),
    };
    match text.as_str() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(Some(true)),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(Some(false)),
        _ => Err(ctx.error(
            &format!("{ISTIO_DNS_CAPTURE}: {text}"),
            "proxyMetadata.ISTIO_META_DNS_CAPTURE is not a boolean",
        )),
    }
}

#[cfg(test)]
#[path = "dns_tests.rs"]
mod tests;
