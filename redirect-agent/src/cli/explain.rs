//! `redirect-agent explain`: which rule decides a workload's connect to a destination, and why.
//!
//! Without `--bpffs-dir` it evaluates the policy alone (no kernel needed). With it, the decision
//! comes from the pinned maps (the kernel answers the trie lookups), and it is checked against
//! the policy: a disagreement means the kernel holds something else than the config says (an
//! agent that is not running, or a rejected change), and is reported with a non-zero exit.
use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, bail};
use redirect_common::{Policy, flags};
use serde_json::json;

use super::Output;
use crate::{
    bpf::PinnedMaps,
    cgroup,
    policy::{self, Step, Verdict, WorkloadInputs},
    source::file::FileConfig,
};

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Standalone config holding the mesh settings and the workload.
    #[arg(long, env = "REDIRECT_CONFIG", required_unless_present = "pod")]
    pub config: Option<PathBuf>,
    /// NAMESPACE/NAME of the workload.
    #[arg(long, required_unless_present = "pod")]
    pub workload: Option<String>,
    /// Destination IP:PORT ([v6]:port for IPv6); with --inbound, the workload's PORT.
    #[arg(long, value_parser = parse_dest)]
    pub dest: SocketAddr,
    /// Explain a new inbound connection to --dest PORT (sk_lookup) instead of a connect.
    #[arg(long)]
    pub inbound: bool,
    /// With --inbound: the connection's source address.
    #[arg(long, requires = "inbound")]
    pub source: Option<std::net::IpAddr>,
    /// With --inbound: the connection arrived on lo (from inside the pod).
    #[arg(long, requires = "inbound")]
    pub from_loopback: bool,
    /// Evaluate as a connect made by the proxy itself (its uid or cgroup).
    #[arg(long)]
    pub as_proxy: bool,
    /// Evaluate against the maps pinned here (the kernel's view) instead of the policy alone.
    #[arg(long)]
    pub bpffs_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Kubernetes: NAMESPACE/NAME of a pod on this node, instead of --config/--workload. The pod,
    /// its namespace and the MeshConfig come from the API (in-cluster config or kubeconfig);
    /// the decision comes from the pinned maps (--bpffs-dir, default /sys/fs/bpf/redirect).
    #[arg(long, conflicts_with = "workload")]
    pub pod: Option<String>,
    /// With --pod: where the pod's cgroup is searched for (default: the cgroup2 mount).
    #[arg(long, requires = "pod")]
    pub cgroup_root: Option<PathBuf>,
}

pub fn explain(mut args: ExplainArgs) -> anyhow::Result<()> {
    let (config, source_name) = match &args.pod {
        Some(pod) => {
            let c = crate::source::kube::explain::pod_config_from_env(
                pod,
                args.cgroup_root.as_deref(),
            )?;
            args.workload = Some(pod.clone());
            args.bpffs_dir = args
                .bpffs_dir
                .take()
                .or_else(|| Some(super::DEFAULT_BPFFS_DIR.into()));
            (c, "the Kubernetes API".to_string())
        }
        None => {
            let path = args.config.clone().context("--config is required")?;
            (FileConfig::load(&path)?, path.display().to_string())
        }
    };
    let workload = args.workload.clone().context("--workload is required")?;
    let (namespace, name) = workload
        .split_once('/')
        .with_context(|| format!("--workload {workload:?}: expected NAMESPACE/NAME"))?;
    let Some(w) = config.workload(namespace, name) else {
        bail!("workload {namespace}/{name} is not in {source_name}");
    };
    let ns_annotations = config.namespace_annotations(namespace);
    let mesh = policy::MeshTraffic {
        dns: config.dns.clone(),
        ..config.mesh.clone()
    };
    let resolved = policy::resolve(&WorkloadInputs {
        mesh: &mesh,
        namespace,
        namespace_annotations: &ns_annotations,
        name,
        pod_annotations: &w.annotations,
    })?;
    if args.inbound {
        return super::explain_inbound::explain(
            &args,
            &config,
            w,
            &resolved.policy,
            resolved.inbound_error.as_ref(),
        );
    }
    let verdict = policy::evaluate(&resolved.policy, args.dest, args.as_proxy);

    let kernel = match &args.bpffs_dir {
        None => None,
        Some(dir) => {
            let dir = crate::bpf::generation::current(dir);
            crate::bpf::generation::check_readable(&dir)?;
            let maps = PinnedMaps::open(&dir)?;
            let mount = cgroup::cgroup2_mount()?;
            let path = cgroup::resolve_path(&mount, &w.cgroup);
            let cgroup_id = cgroup::cgroup_id(&path)?;
            let Some(record) = maps.policy(cgroup_id) else {
                bail!(
                    "workload {}: cgroup {} (id {cgroup_id}) is not registered in {}; its connects are not intercepted",
                    workload,
                    path.display(),
                    dir.display()
                );
            };
            Some((
                record,
                kernel_decision(&maps, &record, args.dest, args.as_proxy),
            ))
        }
    };

    // Port 53: DNS capture decides first, as in the kernel (explain_dns.rs).
    if let Some(done) = super::explain_dns::explain(
        &args,
        &resolved.policy.dns,
        kernel.as_ref().map(|(r, _)| r),
        &config.proxy,
    ) {
        return done;
    }
    let target = match args.dest {
        SocketAddr::V4(_) => format!(
            "{}:{}",
            std::net::Ipv4Addr::LOCALHOST,
            config.proxy.outbound_port
        ),
        SocketAddr::V6(_) => format!("[::1]:{}", config.proxy.outbound_port),
    };
    let mismatch = kernel.as_ref().is_some_and(|(_, (redirect, step))| {
        *redirect != verdict.redirect || *step != verdict.step
    });
    let (redirect, step) = kernel
        .as_ref()
        .map_or((verdict.redirect, verdict.step), |(_, k)| *k);
    match args.output {
        Output::Json => {
            let out = json!({
                "workload": args.workload,
                "dest": args.dest.to_string(),
                "decision": if redirect { "redirect" } else { "bypass" },
                "step": step.name(),
                "step_number": step.number(),
                "source": verdict.source.as_ref().map(|s| json!({"object": s.origin.object(), "key": s.key, "text": s.to_string()})),
                "evaluated": if kernel.is_some() { "kernel" } else { "policy" },
                "policy_id": kernel.as_ref().map(|(r, _)| r.policy_id),
                "policy_decision": {"decision": if verdict.redirect { "redirect" } else { "bypass" }, "step": verdict.step.name()},
                "agree": !mismatch,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Output::Text => print_text(
            &args,
            &verdict,
            redirect,
            step,
            &target,
            kernel.as_ref().map(|(r, _)| r),
        ),
    }
    if mismatch {
        bail!(
            "the pinned maps decide {} at step {}, but the config decides {} at step {}: the kernel does not hold this config (is the agent running on it?)",
            if redirect { "redirect" } else { "bypass" },
            step.name(),
            if verdict.redirect {
                "redirect"
            } else {
                "bypass"
            },
            verdict.step.name()
        );
    }
    Ok(())
}

fn print_text(
    args: &ExplainArgs,
    verdict: &Verdict,
    redirect: bool,
    step: Step,
    target: &str,
    record: Option<&Policy>,
) {
    println!("workload  {}", args.workload.as_deref().unwrap_or(""));
    println!("dest      {}", args.dest);
    if redirect {
        println!("decision  redirect -> {target}");
    } else {
        println!("decision  bypass (goes to {} directly)", args.dest);
    }
    println!("step      {} {}", step.number(), step.name());
    match &verdict.source {
        Some(s) => println!("because   {s}"),
        None if step == Step::Loopback => {
            println!("because   loopback destinations are never redirected")
        }
        None if step == Step::NotIncluded => println!("because   no included port or CIDR matches"),
        None => println!("because   built-in default"),
    }
    match record {
        Some(r) => println!(
            "evaluated by the kernel's maps in {} (policy id {}{})",
            args.bpffs_dir
                .as_deref()
                .unwrap_or_else(|| std::path::Path::new("?"))
                .display(),
            r.policy_id,
            if r.base_id == 0 {
                String::new()
            } else {
                format!(", over base {}", r.base_id)
            }
        ),
        None => println!("evaluated from the policy alone (add --bpffs-dir to ask the kernel)"),
    }
}

/// The kernel's decision order over the kernel's own longest-prefix lookups, layered over the
/// record's base entries as connect4/6 layer them (`redirect_common::decide::layered`).
fn kernel_decision(
    maps: &PinnedMaps,
    record: &Policy,
    dest: SocketAddr,
    as_proxy: bool,
) -> (bool, Step) {
    use redirect_common::decide::{NO_RULE, layered};
    let (id, base) = (record.policy_id, record.base_id);
    let raw = |a: Option<u32>| a.unwrap_or(NO_RULE);
    let ip_rule = |id: u32, ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(a) => raw(maps.lookup_v4(id, a.octets())),
        std::net::IpAddr::V6(a) => raw(maps.lookup_v6(id, a.octets())),
    };
    policy::evaluate_rules(
        record.flags & flags::ENABLED != 0,
        dest,
        as_proxy,
        |port| {
            layered(raw(maps.lookup_port(id, port)), base, |b| {
                raw(maps.lookup_port(b, port))
            })
        },
        |ip| layered(ip_rule(id, ip), base, |b| ip_rule(b, ip)),
    )
}

/// IP:PORT, or a bare PORT (for --inbound, where only the port matters).
fn parse_dest(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<u16>()
                .map(|p| SocketAddr::from(([0, 0, 0, 0], p)))
        })
        .map_err(|_| format!("{s:?}: expected IP:PORT, [IPv6]:PORT or (with --inbound) PORT"))
}
