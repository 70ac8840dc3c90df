//! `redirect-agent run`: the daemon. Attaches (or adopts) the datapath, starts the reconcile
//! owner and the admin endpoint, then follows the source: `kubernetes` inside a cluster, `file`
//! elsewhere.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::ValueEnum;
use tokio::sync::mpsc;
use tracing::{error, info};

use super::{BpffsArg, LogFormat};
use crate::{
    admin,
    bpf::{self, AttachOptions},
    cgroup,
    metrics::Metrics,
    proxy::{ProxyConfig, ProxyMode},
    reconcile::{Applier, Owner},
    source::{
        self,
        kube::{DEFAULT_MESH_CONFIG_NAME, DEFAULT_MESH_CONFIG_NAMESPACE, KubeOptions, pods},
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// Pods on this node, namespaces and the FSM MeshConfig, from the API server.
    Kubernetes,
    /// The standalone YAML of --config.
    File,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProxyModeArg {
    Sidecar,
    Node,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Where the desired state comes from. Default: kubernetes inside a cluster (when
    /// KUBERNETES_SERVICE_HOST is set), file otherwise.
    #[arg(long, value_enum, env = "REDIRECT_SOURCE")]
    pub source: Option<SourceKind>,
    /// Standalone YAML config (mesh, proxy, namespaces, workloads) for the file source. Watched
    /// with inotify: applied 10 ms after a writer closes (or renames) it, or once unchanged for
    /// 1 s; SIGHUP re-reads it. Unknown keys, a missing `workloads` key (write `workloads: []` to
    /// remove all), non-regular files, files over 16 MiB and bad cgroup paths are refused whole.
    #[arg(long, env = "REDIRECT_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub bpffs: BpffsArg,
    /// cgroup v2 directory the programs attach to, and where the kubepods tree is looked for.
    /// Default: the root of the cgroup2 mount, read from /proc/self/mountinfo.
    #[arg(long, env = "REDIRECT_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// This node's name (kubernetes source): only its pods are watched.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Name of the FSM MeshConfig whose spec.traffic is the mesh-wide policy.
    #[arg(long, env = "REDIRECT_MESH_CONFIG_NAME", default_value = DEFAULT_MESH_CONFIG_NAME)]
    pub mesh_config_name: String,
    /// Namespace of the FSM MeshConfig.
    #[arg(long, env = "REDIRECT_MESH_CONFIG_NAMESPACE", default_value = DEFAULT_MESH_CONFIG_NAMESPACE)]
    pub mesh_config_namespace: String,
    /// Container names (containers or init containers) that mark a pod as meshed.
    #[arg(
        long,
        env = "REDIRECT_SIDECAR_CONTAINERS",
        value_delimiter = ',',
        default_values_t = pods::DEFAULT_SIDECARS.map(String::from)
    )]
    pub sidecar_containers: Vec<String>,
    /// Kubernetes source: where redirected connects go (sidecar: loopback; node: --proxy-address).
    #[arg(long, value_enum, default_value_t = ProxyModeArg::Sidecar)]
    pub proxy_mode: ProxyModeArg,
    /// Kubernetes source: the proxy's outbound port.
    #[arg(long, default_value_t = 15001)]
    pub proxy_port: u16,
    /// Kubernetes source: proxy uid for pods whose sidecar sets no runAsUser.
    #[arg(long)]
    pub proxy_uid: Option<u32>,
    /// Kubernetes source, node mode: the node proxy's IPv4 address.
    #[arg(long)]
    pub proxy_address: Option<Ipv4Addr>,
    /// Kubernetes source, node mode: the node proxy's IPv6 address.
    #[arg(long)]
    pub proxy_address6: Option<Ipv6Addr>,
    /// Serves /metrics, /livez and /readyz.
    #[arg(long, env = "REDIRECT_ADMIN_ADDR", default_value = "0.0.0.0:9102")]
    pub admin_addr: SocketAddr,
    /// Capacity of each rule trie (IPv4 CIDRs, IPv6 CIDRs, ports), shared by all workloads.
    /// Pinned tries of another size are not resized in place: like any map layout change, the
    /// agent builds a new generation of maps and programs beside them and releases the old one
    /// once the new one is ready (docs/deploy.md, "Upgrades").
    /// Identical policies share entries; a change needs room for its old and new entries at once (make before break).
    #[arg(long, env = "REDIRECT_MAX_RULE_ENTRIES", default_value_t = redirect_common::MAX_RULE_ENTRIES)]
    pub max_rule_entries: u32,
    /// Kubernetes source: capture every meshed pod's DNS (port-53 UDP and TCP) to the proxy's DNS
    /// listener unless its annotations say otherwise (Istio ISTIO_META_DNS_CAPTURE, Kuma
    /// kuma.io/builtin-dns). The file source sets this with `dns: {capture: true}`.
    #[arg(long, env = "REDIRECT_DNS_CAPTURE")]
    pub dns_capture: bool,
    /// Kubernetes source: the DNS listener port for --dns-capture (Kuma's
    /// kuma.io/builtin-dns-port overrides it per pod).
    #[arg(long, env = "REDIRECT_DNS_PORT", default_value_t = crate::policy::DnsDefault::default().port)]
    pub dns_port: std::num::NonZeroU16,
    /// Inbound interception: sk_lookup into each meshed pod's network namespace (Kubernetes:
    /// found from the pod's processes; file source: each workload's `netns`). Needs Linux 5.17
    /// or later (sk_lookup's ingress_ifindex): on an older kernel the agent refuses to start,
    /// pinning nothing, unless `--inbound=false`. The Kubernetes source needs CAP_SYS_ADMIN,
    /// CAP_SYS_PTRACE and the host's PID namespace for it on top of the three base capabilities.
    /// `--inbound=false` intercepts outbound only and needs none of them; the file source then
    /// ignores each workload's `netns`, with a warning that names the workload.
    #[arg(long, env = "REDIRECT_INBOUND", default_value_t = true, action = clap::ArgAction::Set)]
    pub inbound: bool,
    /// Kubernetes source: the proxy's inbound listener port for every pod. Default: by the pod's
    /// mesh (Istio and Kuma 15006, OSM/FSM 15003, Linkerd 4143); a pod of no known mesh gets no
    /// inbound interception without it.
    #[arg(long, env = "REDIRECT_INBOUND_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: Option<u16>,
}

impl RunArgs {
    pub fn source(&self) -> SourceKind {
        self.source.unwrap_or_else(|| {
            if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
                SourceKind::Kubernetes
            } else {
                SourceKind::File
            }
        })
    }

    fn proxy(&self) -> anyhow::Result<ProxyConfig> {
        let mode = match self.proxy_mode {
            ProxyModeArg::Sidecar => ProxyMode::Sidecar,
            ProxyModeArg::Node => ProxyMode::Node,
        };
        if mode == ProxyMode::Node && self.proxy_address.is_none() {
            bail!("--proxy-mode node needs --proxy-address (the node proxy's IPv4 address)");
        }
        if self.proxy_port == 0 {
            bail!("--proxy-port: bad value 0");
        }
        Ok(ProxyConfig {
            mode,
            outbound_port: self.proxy_port,
            inbound_port: self
                .inbound_port
                .unwrap_or(crate::proxy::DEFAULT_INBOUND_PORT),
            uid: self.proxy_uid,
            address: self.proxy_address,
            address6: self.proxy_address6,
        })
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    // Until the runtime's handler is installed below, a SIGHUP would kill the agent (exit 129).
    // SAFETY: setting a signal's disposition to SIG_IGN runs no handler code.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGHUP,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }
    .context("ignoring SIGHUP")?;
    let source = args.source();
    // Check the arguments before touching the kernel.
    let kube_opts = match source {
        SourceKind::File => {
            if args.config.is_none() {
                bail!("the file source needs --config FILE (or choose --source kubernetes)");
            }
            None
        }
        SourceKind::Kubernetes => {
            let node = args.node_name.clone().filter(|n| !n.is_empty()).context(
                "the kubernetes source needs --node-name (env NODE_NAME, from the downward API)",
            )?;
            Some(KubeOptions {
                mesh_config_name: args.mesh_config_name.clone(),
                mesh_config_namespace: args.mesh_config_namespace.clone(),
                sidecar_containers: args.sidecar_containers.clone(),
                proxy: args.proxy()?,
                dns: crate::policy::DnsDefault {
                    capture: args.dns_capture,
                    port: args.dns_port,
                    key: crate::policy::dns_keys::FLAG_DEFAULT.into(),
                },
                inbound: args.inbound,
                inbound_port: args.inbound_port,
                ..KubeOptions::new(node, PathBuf::new())
            })
        }
    };
    // Before touching the kernel: a missing capability is named, not left to a bare EPERM.
    crate::caps::require_for_run(kube_opts.as_ref().is_some_and(|o| o.inbound))?;
    // Before adopting anything: a second agent on this pin dir would delete the first one's
    // workloads. Held until the process exits; the kernel releases it even after kill -9.
    let _lock = crate::lock::lock_pin_dir(&args.bpffs.bpffs_dir)?;
    let mount = cgroup::cgroup2_mount_for(args.cgroup_root.as_deref())?;
    let cgroup_root = args.cgroup_root.clone().unwrap_or_else(|| mount.clone());
    let maps = bpf::load_and_attach(&AttachOptions {
        bpffs_dir: args.bpffs.bpffs_dir.clone(),
        cgroup_root: cgroup_root.clone(),
        max_rule_entries: Some(args.max_rule_entries),
        inbound: args.inbound,
    })
    .context("attaching the datapath")?;
    // The layout generation this build runs (bpf/generation.rs); older ones stay attached until
    // it is ready.
    let generation_dir = maps.dir().to_path_buf();
    let inbound = crate::reconcile::inbound::InboundApplier::adopt(maps.dir());
    let applier = Applier::adopt(maps)
        .context("adopting pinned state")?
        .with_inbound(inbound);
    info!(
        cgroup_root = %cgroup_root.display(),
        adopted = applier.applied_count(),
        source = ?source,
        "datapath ready"
    );
    let metrics = Arc::new(Metrics::new(Some(&generation_dir)));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // SIGHUP (a closed terminal, or an operator's reload) must never stop interception.
        let reread = Arc::new(tokio::sync::Notify::new());
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        let kube_source = kube_opts.is_some();
        tokio::spawn({
            let reread = reread.clone();
            async move {
                while hup.recv().await.is_some() {
                    if kube_source {
                        info!("SIGHUP received; ignored (the kubernetes source is always live)");
                    } else {
                        reread.notify_one();
                    }
                }
            }
        });
        let (owner, thread) = Owner::spawn(applier, metrics.clone())?;
        tokio::spawn(release_older_generations(
            args.bpffs.bpffs_dir.clone(),
            generation_dir,
            owner.health(),
        ));
        // Interception matters more than observability: a taken port is logged, not fatal.
        let admin = match admin::serve(args.admin_addr, metrics.clone(), owner.health()).await {
            Ok((_, task)) => Some(task),
            Err(e) => {
                error!("{e}; running without /metrics, /livez and /readyz");
                None
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        match kube_opts {
            None => {
                let config = args.config.clone().expect("checked above");
                let (tx, mut rx) = mpsc::unbounded_channel();
                let file_source = source::watch::FileSource {
                    path: config,
                    cgroup_mount: mount,
                    cgroup_root: cgroup_root.clone(),
                    tx,
                    pending: owner.health().waiting_flag(),
                    reread: reread.clone(),
                    inbound: args.inbound,
                };
                tasks.spawn(async move {
                    source::watch::follow_file(file_source).await;
                    Ok(())
                });
                let owner = owner.clone();
                tasks.spawn(async move {
                    while let Some(snapshot) = rx.recv().await {
                        owner.submit(snapshot, Instant::now());
                    }
                    Ok(())
                });
            }
            Some(opts) => {
                let client = kube::Client::try_default().await.context(
                    "connecting to the Kubernetes API (in-cluster config or kubeconfig)",
                )?;
                let opts = KubeOptions {
                    cgroup_root: cgroup_root.clone(),
                    ..opts
                };
                let (owner, metrics) = (owner.clone(), metrics.clone());
                tasks.spawn(async move {
                    source::kube::run(client, opts, owner, metrics)
                        .await
                        .map_err(anyhow::Error::from)
                });
            }
        }
        let outcome = tokio::select! {
            _ = shutdown_signal() => Ok(()),
            Some(done) = tasks.join_next() => match done {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::Error::from(e)),
            },
        };
        // Leaving the links and maps pinned is the point: interception continues while the
        // agent is away, and the next start adopts them.
        info!("shutting down; pinned programs stay attached");
        tasks.shutdown().await;
        if let Some(admin) = admin {
            admin.abort();
        }
        drop(owner);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        if let Err(e) = &outcome {
            error!("{e:#}");
        }
        outcome
    })
}

/// Releases the older layout generations once this one is ready (its first snapshot applied and
/// nothing failing): until then they keep redirecting every connect this one does not yet, and
/// this one's connect programs stand aside for the connects they already redirected. An agent
/// that never gets ready leaves them attached, which fails safe.
async fn release_older_generations(
    base: PathBuf,
    keep: PathBuf,
    health: Arc<crate::reconcile::owner::Health>,
) {
    if !bpf::generation::list(&base).iter().any(|g| g.dir != keep) {
        return;
    }
    info!(keep = %keep.display(), "older layout generations stay attached until this one is ready");
    while !health.ready() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    match bpf::generation::release_others(&base, &keep) {
        Ok(released) => info!(?released, keep = %keep.display(), "upgrade complete"),
        Err(e) => error!("releasing an older layout generation: {e}"),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!("installing SIGTERM handler: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
