//! The standalone source: one YAML file describing the mesh, the proxy and the workloads.
//! It needs no cluster, and it is what the demo and the kernel tests drive.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

mod alias;

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

/// The largest config file read (16 MiB): a symlink to a huge file, or a runaway generator,
/// must not make the agent read gigabytes. A larger file is refused and changes nothing.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Values are cut to this many characters in error messages (the message says how long they were).
const SHOWN_CHARS: usize = 120;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is a {kind}, not a regular file; only regular files are read")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("config {path} is {len} bytes; the limit is {MAX_CONFIG_BYTES} bytes (16 MiB)")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error(
        "config {path}: unknown key {}; nothing was applied (a typo of a known key would \
         otherwise be silently ignored)",
        .keys.join(", ")
    )]
    UnknownKeys { path: PathBuf, keys: Vec<String> },
    #[error(
        "config {path}: YAML aliases expand to more than {limit} nodes (the file's size in bytes \
         plus 4096); refused as an alias bomb"
    )]
    AliasBomb { path: PathBuf, limit: usize },
    #[error(
        "config {path}: no `workloads` key, which would remove every workload; the applied \
         state is kept. Write `workloads: []` to remove every workload on purpose"
    )]
    NoWorkloads { path: PathBuf },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The file as written, before the checks that need the whole of it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawFile {
    #[serde(default)]
    mesh: MeshTraffic,
    #[serde(default)]
    proxy: ProxyConfig,
    #[serde(default)]
    dns: crate::policy::DnsDefault,
    #[serde(default)]
    namespaces: BTreeMap<String, NamespaceConfig>,
    /// None (absent or null) is refused: only an explicit `[]` removes every workload.
    #[serde(default)]
    workloads: Option<Vec<WorkloadConfig>>,
}

/// `value` for an error message: at most [`SHOWN_CHARS`] characters, and its length when cut.
pub fn shown(value: &str) -> String {
    let n = value.chars().count();
    if n <= SHOWN_CHARS {
        value.to_string()
    } else {
        let head: String = value.chars().take(SHOWN_CHARS).collect();
        format!("{head}... ({n} characters)")
    }
}

/// Reads the config file's bytes, refusing what is not a regular file or is larger than
/// [`MAX_CONFIG_BYTES`]. The open is non-blocking, so a FIFO (or a device) at the path cannot
/// block the source, or the agent's shutdown with it: it is opened, seen not to be a regular
/// file, and closed.
pub fn read_config(path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let read_err = |source| ConfigError::Read {
        path: path.into(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        use std::os::unix::fs::FileTypeExt as _;
        let kind = if ft.is_fifo() {
            "FIFO"
        } else if ft.is_char_device() {
            "character device"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_dir() {
            "directory"
        } else {
            "special file"
        };
        return Err(ConfigError::NotRegular {
            path: path.into(),
            kind,
        });
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.into(),
            len: meta.len(),
        });
    }
    // The size can grow between fstat and read: never read past the limit.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.into(),
            len: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

impl FileConfig {
    /// Reads and parses the file (see [`read_config`] for which files are read).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let bytes = read_config(path)?;
        Self::parse(path, &String::from_utf8_lossy(&bytes))
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let parse_err = |source| ConfigError::Parse {
            path: path.into(),
            source,
        };
        // serde_yaml 0.9 bounds alias jumps (100 per event) but not what each jump expands, so
        // a small file can expand to gigabytes. Walk the document once, counting nodes as the
        // aliases expand them, and stop at the bound: that walk allocates nothing.
        // An alias (`*name`) needs an anchor (`&name`) in the same document, so a file without
        // both cannot expand anything: most files (Istio's `"*"` include-all among them) are
        // then parsed once, not twice.
        if text.contains('*') && text.contains('&') {
            let limit = text.len() + 4096;
            let budget = alias::Budget::new(limit);
            if let Err(e) = budget.walk(serde_yaml::Deserializer::from_str(text)) {
                return Err(if budget.exhausted() {
                    ConfigError::AliasBomb {
                        path: path.into(),
                        limit,
                    }
                } else {
                    parse_err(e)
                });
            }
        }
        let mut unknown = Vec::new();
        let raw: RawFile =
            serde_ignored::deserialize(serde_yaml::Deserializer::from_str(text), |p| {
                // serde_ignored shows an Option level as `?`: not part of the key as written.
                unknown.push(format!("`{}`", p.to_string().replace(".?", "")))
            })
            .map_err(parse_err)?;
        if !unknown.is_empty() {
            return Err(ConfigError::UnknownKeys {
                path: path.into(),
                keys: unknown,
            });
        }
        let Some(workloads) = raw.workloads else {
            return Err(ConfigError::NoWorkloads { path: path.into() });
        };
        let config = FileConfig {
            mesh: raw.mesh,
            proxy: raw.proxy,
            dns: raw.dns,
            namespaces: raw.namespaces,
            workloads,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks every workload's `cgroup` and `proxyCgroup` against the cgroup2 mount and
    /// `--cgroup-root` ([`cgroup::PathCheck`]). One bad path refuses the whole file, like a
    /// syntax error: dropping just that workload would remove its policy. Returns the cgroup id
    /// of every path that exists now (what [`Self::snapshot_with`] takes), so that each path is
    /// opened once per change.
    pub fn check_paths(
        &self,
        path: &Path,
        mount: &Path,
        cgroup_root: &Path,
    ) -> Result<BTreeMap<PathBuf, u64>, ConfigError> {
        let check = cgroup::PathCheck::new(mount, cgroup_root);
        let mut ids = BTreeMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let paths = std::iter::once(("cgroup", &w.cgroup))
                .chain(w.proxy_cgroup.iter().map(|p| ("proxyCgroup", p)));
            for (key, configured) in paths {
                let resolved = cgroup::resolve_path(mount, configured);
                match check.check(&resolved) {
                    Ok(Some(id)) => {
                        ids.insert(resolved, id);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        return Err(ConfigError::Invalid {
                            path: path.into(),
                            message: format!(
                                "workload {}/{}: workloads[{i}].{key}: bad value {} (resolved to {}): {e}",
                                w.namespace,
                                w.name,
                                shown(&configured.display().to_string()),
                                resolved.display()
                            ),
                        });
                    }
                }
            }
        }
        Ok(ids)
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
                    shown(&w.namespace),
                    shown(&w.name)
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
    /// cgroup ids are those [`Self::check_paths`] found.
    pub fn snapshot_with(&self, cgroup_mount: &Path, cgroups: BTreeMap<PathBuf, u64>) -> Snapshot {
        Snapshot {
            mesh: std::sync::Arc::new(MeshTraffic {
                dns: self.dns.clone(),
                ..self.mesh.clone()
            }),
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
                    inbound_port: None,
                    annotations: w.annotations.clone(),
                })
                .collect(),
            cgroups,
            netns: Default::default(),
        }
    }
}

/// `--inbound=false`: drops each workload's `netns` (no sk_lookup link, so no inbound
/// interception) and returns one warning per workload that named one, with its netns. Not an
/// error: the operator turned inbound off for the whole node (a kernel without sk_lookup's
/// `ingress_ifindex`, Linux < 5.17), and the workload's outbound is still intercepted; but its
/// inbound connections reach the app directly, so it is said on every load of the config.
pub fn without_inbound(snapshot: &mut Snapshot) -> Vec<String> {
    let mut warnings = Vec::new();
    for w in &mut snapshot.workloads {
        if let Some(netns) = w.netns.take() {
            warnings.push(format!(
                "workload {}: netns {} is ignored because inbound interception is off \
                 (--inbound=false): its inbound connections reach the app directly, not its proxy",
                w.id(),
                netns.display()
            ));
        }
    }
    warnings
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
    fn inbound_off_drops_each_netns_and_names_the_workload() {
        let text = "workloads:\n - {name: web, namespace: demo, cgroup: x, netns: /run/netns/web}\n - {name: app, namespace: demo, cgroup: y}\n";
        let c = FileConfig::parse(Path::new("x.yaml"), text).unwrap();
        let mut snap = c.snapshot_with(Path::new("/sys/fs/cgroup"), BTreeMap::new());
        let warnings = without_inbound(&mut snap);
        assert!(snap.workloads.iter().all(|w| w.netns.is_none()));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("workload demo/web: netns /run/netns/web is ignored")
                && warnings[0].contains("--inbound=false"),
            "{}",
            warnings[0]
        );
    }

    #[test]
    fn node_mode_needs_an_address() {
        let err = FileConfig::parse(Path::new("x.yaml"), "proxy: {mode: node}\nworkloads: []\n")
            .unwrap_err();
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

    fn parse_err(text: &str) -> String {
        FileConfig::parse(Path::new("/etc/r.yaml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unknown_keys_are_refused_naming_the_file_and_the_key() {
        let e = parse_err("workload:\n - {name: a, cgroup: x}\nworkloads: []\n");
        assert!(e.contains("/etc/r.yaml") && e.contains("`workload`"), "{e}");
        let e = parse_err("workloads:\n - {name: a, cgroup: x, annotatons: {}}\n");
        assert!(e.contains("`workloads.0.annotatons`"), "{e}");
        let e = parse_err("mesh: {outboundIPRangeExclusionLst: []}\nworkloads: []\n");
        assert!(e.contains("`mesh.outboundIPRangeExclusionLst`"), "{e}");
    }

    #[test]
    fn a_file_without_workloads_is_refused_unless_it_says_so() {
        for text in [
            "",
            "\n",
            "# nothing\n",
            "mesh: {}\n",
            "workloads:\n",
            "workloads: ~\n",
        ] {
            let e = parse_err(text);
            assert!(e.contains("workloads: []"), "{text:?}: {e}");
        }
        let c = FileConfig::parse(Path::new("x"), "workloads: []\n").unwrap();
        assert!(c.workloads.is_empty());
    }

    #[test]
    fn an_alias_bomb_is_refused_quickly() {
        let mut s = String::from("a0: &a0 [\"lol\"]\n");
        for i in 1..=9 {
            let refs = vec![format!("*a{}", i - 1); 10].join(",");
            s.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        s.push_str("workloads: []\n");
        let e = parse_err(&s);
        assert!(e.contains("alias bomb"), "{e}");
        // Ordinary anchors still work.
        let ok = "namespaces:\n  a: &n {annotations: {x: \"1\"}}\n  b: *n\nworkloads: []\n";
        FileConfig::parse(Path::new("x"), ok).unwrap();
        // Without an anchor an alias expands nothing (the walk is skipped): it is a parse error.
        let e = parse_err("workloads: *nowhere\n");
        assert!(
            e.contains("/etc/r.yaml") && e.contains("unknown anchor"),
            "{e}"
        );
        let star = "workloads:\n - {name: a, cgroup: x, annotations: {k: \"*\"}}\n";
        FileConfig::parse(Path::new("x"), star).unwrap();
    }

    #[test]
    fn long_values_are_cut_in_messages_with_their_length() {
        let long = "x".repeat(100_000);
        let e = parse_err(&format!(
            "workloads:\n - {{name: {long}, cgroup: a}}\n - {{name: {long}, cgroup: b}}\n"
        ));
        assert!(e.len() < 1000, "{} bytes", e.len());
        assert!(e.contains("(100000 characters)"), "{e}");
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let dir = std::env::temp_dir().join(format!("redirect-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Returns at once (a blocking open would wait for a writer forever).
        let e = read_config(&fifo).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        let e = read_config(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("character device"), "{e}");
        let big = dir.join("big.yaml");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_CONFIG_BYTES + 1).unwrap();
        let e = read_config(&big).unwrap_err().to_string();
        assert!(e.contains("16 MiB"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_cgroup_paths_refuse_the_file_naming_workload_key_and_value() {
        let c = FileConfig::parse(
            Path::new("/etc/r.yaml"),
            "workloads:\n - {name: a, namespace: n, cgroup: ../../tmp/x}\n",
        )
        .unwrap();
        let e = c
            .check_paths(Path::new("/etc/r.yaml"), Path::new("/cg"), Path::new("/cg"))
            .unwrap_err()
            .to_string();
        for part in ["/etc/r.yaml", "n/a", "workloads[0].cgroup", "../../tmp/x"] {
            assert!(e.contains(part), "{part}: {e}");
        }
    }
}
