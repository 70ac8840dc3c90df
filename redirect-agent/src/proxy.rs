//! Where redirected connections go, and who the proxy is. Shared by every source.
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// Redirect to 127.0.0.1 / ::1 on the proxy's outbound port.
    #[default]
    Sidecar,
    /// Redirect to a node-level proxy at `address` / `address6`.
    Node,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    #[serde(default)]
    pub mode: ProxyMode,
    #[serde(default = "default_outbound_port")]
    pub outbound_port: u16,
    /// The proxy's inbound listener port (sk_lookup steers inbound connections to it).
    #[serde(default = "default_inbound_port")]
    pub inbound_port: u16,
    /// The proxy's uid: its connects are never redirected (istio-iptables' `-u`).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Node mode: where IPv4 (and v4-mapped) connects go.
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    /// Node mode: where IPv6 connects go; defaults to `address` as a v4-mapped IPv6 address.
    #[serde(default)]
    pub address6: Option<Ipv6Addr>,
}

fn default_outbound_port() -> u16 {
    15001
}

/// Istio's and Kuma's inbound port; OSM/FSM use 15003, Linkerd 4143.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

fn default_inbound_port() -> u16 {
    DEFAULT_INBOUND_PORT
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            mode: ProxyMode::Sidecar,
            outbound_port: default_outbound_port(),
            inbound_port: default_inbound_port(),
            uid: None,
            address: None,
            address6: None,
        }
    }
}

impl ProxyConfig {
    /// (IPv4 target, IPv6 target) of a redirect.
    pub fn targets(&self) -> (Ipv4Addr, Ipv6Addr) {
        match self.mode {
            ProxyMode::Sidecar => (Ipv4Addr::LOCALHOST, Ipv6Addr::LOCALHOST),
            ProxyMode::Node => {
                let v4 = self.address.unwrap_or(Ipv4Addr::LOCALHOST);
                (v4, self.address6.unwrap_or_else(|| v4.to_ipv6_mapped()))
            }
        }
    }
}
