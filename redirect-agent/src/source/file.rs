//! The standalone source: one YAML file describing the mesh, the proxy and the workloads.
//! It needs no cluster, and it is what the demo and the kernel tests drive.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    cgroup,
    policy::{Annotations, MeshTraffic},
    proxy::{ProxyConfig, ProxyMode},
    reconcile::{Snapshot, WorkloadSpec},
};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileConfig {
    /// The fields of FSM MeshConfig `spec.traffic`.
    #[serde(default)]
    pub mesh: MeshTraffic,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    /// Mesh-wide DNS capture default (`dns: {capture: true, port: 15053}`); annotations override it.
    #[serde(default)]
    pub dns: crate::policy::DnsDefault,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceConfig {
    #[serde(default)]
    pub annotations: Annotations,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadConfig {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The workload's cgroup directory: absolute, or relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    /// The proxy container's cgroup; connects from it (or below it) are never redirected.
    #[serde(default)]
    pub proxy_cgroup: Option<PathBuf>,
    /// The workload's network namespace file (`/run/netns/NAME`); without it, no inbound
    /// interception.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub annotations: Annotations,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: FileConfig =
            serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.into(),
                source,
            })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks what serde cannot: a mode that needs an address has one, and workload names are
    /// unique (they key the last-good policy).
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        if self.proxy.outbound_port == 0 {
            return Err(invalid("proxy.outboundPort: bad value 0".into()));
        }
        if self.proxy.mode == ProxyMode::Node && self.proxy.address.is_none() {
            return Err(invalid(
                "proxy.mode is node but proxy.address (the node proxy's IPv4 address) is not set"
                    .into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for w in &self.workloads {
            if !seen.insert((&w.namespace, &w.name)) {
                return Err(invalid(format!(
                    "workload {}/{} is listed twice",
                    w.namespace, w.name
                )));
            }
        }
        Ok(())
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&WorkloadConfig> {
        self.workloads
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
    }

    pub fn namespace_annotations(&self, namespace: &str) -> Annotations {
        self.namespaces
            .get(namespace)
            .map(|n| n.annotations.clone())
            .unwrap_or_default()
    }

    /// The reconcile input; relative cgroup paths are resolved against `cgroup_mount`, and the
    /// cgroup ids of those that exist now are looked up.
    pub fn snapshot(&self, cgroup_mount: &Path) -> Snapshot {
        let mut snapshot = Snapshot {
            mesh: MeshTraffic {
                dns: self.dns.clone(),
                ..self.mesh.clone()
            },
            proxy: self.proxy.clone(),
            namespaces: self
                .namespaces
                .iter()
                .map(|(k, v)| (k.clone(), v.annotations.clone()))
                .collect(),
            workloads: self
                .workloads
                .iter()
                .map(|w| WorkloadSpec {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    cgroup: cgroup::resolve_path(cgroup_mount, &w.cgroup),
                    proxy_cgroup: w
                        .proxy_cgroup
                        .as_deref()
                        .map(|p| cgroup::resolve_path(cgroup_mount, p)),
                    proxy_uid: None,
                    netns: w.netns.clone(),
                    annotations: w.annotations.clone(),
                })
                .collect(),
            cgroups: Default::default(),
        };
        snapshot.resolve_cgroups();
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
mesh:
  outboundIPRangeExclusionList: ["198.18.5.0/24"]
  outboundIPRangeInclusionList: []
  outboundPortExclusionList: [5432]
proxy: {mode: sidecar, outboundPort: 15001, uid: 1337}
namespaces:
  demo: {annotations: {}}
workloads:
  - name: app
    namespace: demo
    cgroup: /sys/fs/cgroup/unified/x/app
    proxyCgroup: /sys/fs/cgroup/unified/x/proxy
    annotations:
      traffic.sidecar.istio.io/excludeOutboundIPRanges: "198.18.0.11/32"
"#;

    #[test]
    fn parses_the_documented_example() {
        let c = FileConfig::parse(Path::new("x.yaml"), EXAMPLE).unwrap();
        assert_eq!(c.proxy.uid, Some(1337));
        assert_eq!(c.proxy.outbound_port, 15001);
        assert_eq!(c.workloads.len(), 1);
        assert_eq!(
            c.workloads[0].proxy_cgroup.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified/x/proxy"))
        );
        assert_eq!(
            c.mesh.outbound_ip_range_exclusion_list,
            vec!["198.18.5.0/24".to_string()]
        );
    }

    #[test]
    fn node_mode_needs_an_address() {
        let err = FileConfig::parse(Path::new("x.yaml"), "proxy: {mode: node}\n").unwrap_err();
        assert!(err.to_string().contains("proxy.address"), "{err}");
    }

    #[test]
    fn duplicate_workloads_are_rejected() {
        let text = "workloads:\n - {name: a, namespace: n, cgroup: x}\n - {name: a, namespace: n, cgroup: y}\n";
        let err = FileConfig::parse(Path::new("x.yaml"), text).unwrap_err();
        assert!(err.to_string().contains("n/a"), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let err = FileConfig::parse(Path::new("/etc/r.yaml"), "workloads: [").unwrap_err();
        assert!(err.to_string().contains("/etc/r.yaml"), "{err}");
    }
}
