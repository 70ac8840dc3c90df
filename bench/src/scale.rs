//! The agent at node scale, two ways:
//! - [`run`]: the real agent (file source, real maps) with W workloads (cgroups of their own)
//!   with C excluded CIDRs each, as Istio pod annotations. Measures the first reconcile, the
//!   agent's memory, and how long a config edit takes from the file being replaced to the maps
//!   holding it (the file source's change-to-applied).
//! - [`harness`]: issue #13's scenario (1,000 workloads sharing a 100,000-CIDR mesh list, 50 with
//!   extra CIDRs of their own) in the agent's own harness, `redirect_agent::reconcile::scale`,
//!   against in-memory maps of the kernel tries' capacity, in a process of its own
//!   (`redirect-bench worker scale`), so that its RSS is the harness's alone.
use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use redirect_agent::reconcile::scale::ScaleConfig;
use redirect_tests::Fixture;

use super::{
    Bins, PROXY_UID,
    agent::BenchAgent,
    check_interrupt,
    iptables::exclusion,
    results::{Harness, Scale},
};

/// Runs the node-scale harness with `cfg` in a child process and reads its figures.
pub fn harness(bins: &Bins, cfg: &ScaleConfig) -> Result<Harness> {
    let out = Command::new(&bins.worker)
        .args(["worker", "scale"])
        .args(["--shared-workloads", &cfg.shared_workloads.to_string()])
        .args(["--mesh-cidrs", &cfg.mesh_cidrs.to_string()])
        .args(["--own-workloads", &cfg.own_workloads.to_string()])
        .args(["--own-extra-cidrs", &cfg.own_extra_cidrs.to_string()])
        .args(["--edits", &cfg.edits.to_string()])
        .args(["--max-rule-entries", &cfg.max_rule_entries.to_string()])
        .output()
        .context("running redirect-bench worker scale")?;
    if !out.status.success() {
        bail!(
            "the scale harness failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut h: Harness = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the scale harness printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    h.config = cfg.clone();
    Ok(h)
}

const ANNOTATION: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// A mesh-wide excluded port: the edit that changes every workload's policy at once (the pods'
/// annotations only set CIDRs, so they do not override it).
const MESH_EDIT_PORT: &str = "5432";

fn config(pods: &[PathBuf], lists: &[Vec<String>], mesh_ports: &[&str]) -> String {
    let mut s = String::with_capacity(lists.len() * (lists.first().map_or(0, Vec::len) * 20 + 200));
    s.push_str(&format!(
        "mesh:\n  outboundPortExclusionList: [{}]\nproxy: {{mode: sidecar, outboundPort: 15001, uid: {PROXY_UID}}}\nworkloads:\n",
        mesh_ports.join(", ")
    ));
    for (i, (pod, list)) in pods.iter().zip(lists).enumerate() {
        s.push_str(&format!(
            "  - name: pod-{i:04}\n    namespace: bench\n    cgroup: {}\n    annotations: {{{ANNOTATION}: \"{}\"}}\n",
            pod.display(),
            list.join(",")
        ));
    }
    s
}

pub fn run(bins: &Bins, workloads: usize, cidrs: usize, edits: usize) -> Result<Scale> {
    let fx = Fixture::new("bench-scale")?;
    let pods = (0..workloads)
        .map(|i| fx.cgroup(&format!("pods/pod-{i:04}")))
        .collect::<Result<Vec<_>>>()?;
    let mut lists: Vec<Vec<String>> = (0..workloads)
        .map(|w| (0..cidrs).map(|j| exclusion(w * cidrs + j)).collect())
        .collect();
    let timeout = Duration::from_secs(120);
    let mut agent = BenchAgent::start(&fx, &bins.agent, &config(&pods, &lists, &[]), timeout)?;
    let first = agent
        .applied()
        .into_iter()
        .next()
        .expect("generation 1 was applied");
    let (rss_kib, hwm_kib) = agent.rss_kib()?;
    let mut scale = Scale {
        workloads,
        cidrs_per_workload: cidrs,
        initial_us: first.elapsed_us,
        rss_kib,
        hwm_kib,
        ..Scale::default()
    };
    eprintln!(
        "    first apply of {workloads} x {cidrs}: {:.1} ms, RSS {:.1} MiB",
        first.elapsed_us as f64 / 1e3,
        rss_kib as f64 / 1024.0
    );
    // Single-workload edits: one CIDR of one pod replaced by a fresh one.
    for (k, fresh) in (0..edits).zip(workloads * cidrs..) {
        check_interrupt()?;
        let w = (k * 7919) % workloads;
        lists[w][0] = exclusion(fresh);
        let (applied, latency) = agent.reconfigure(&config(&pods, &lists, &[]), timeout)?;
        scale.edits.push((latency, applied.elapsed_us));
    }
    // One mesh-wide edit: every workload's policy changes.
    let (applied, latency) =
        agent.reconfigure(&config(&pods, &lists, &[MESH_EDIT_PORT]), timeout)?;
    scale.mesh_edit = Some((latency, applied.elapsed_us));
    (scale.rss_after_kib, scale.hwm_after_kib) = agent.rss_kib()?;
    Ok(scale)
}
