//! `redirect-agent explain --inbound --dest PORT [--source IP]`: which step of the inbound order
//! (istio-iptables' ISTIO_INBOUND) decides a new connection into the workload, and why. Same
//! contract as the outbound explain: from the policy alone, or from the pinned maps (the kernel's
//! lookups, through the same `decide_inbound`) checked against the policy.
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::{Output, explain::ExplainArgs};
use crate::{
    bpf::{inbound_maps::InboundMaps, netns},
    policy::{Action, EffectivePolicy, Lookups, PolicyError, inbound},
    source::file::{FileConfig, WorkloadConfig},
};

pub fn explain(
    args: &ExplainArgs,
    config: &FileConfig,
    w: &WorkloadConfig,
    policy: &EffectivePolicy,
    inbound_error: Option<&PolicyError>,
) -> anyhow::Result<()> {
    let port = args.dest.port();
    let source = args
        .source
        .unwrap_or(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)));
    let own = inbound::own_ports(
        config.proxy.inbound_port,
        config.proxy.outbound_port,
        &w.annotations,
    );
    let verdict = inbound::evaluate_inbound(policy, &own, args.from_loopback, port, source);
    let kernel = match &args.bpffs_dir {
        None => None,
        Some(dir) => {
            let Some(ns) = &w.netns else {
                bail!(
                    "workload {}/{}: no netns in the config, so no inbound interception",
                    w.namespace,
                    w.name
                );
            };
            let dir = &crate::bpf::generation::current(dir);
            let maps = InboundMaps::open(dir)?;
            let cookie = netns::netns_cookie(ns)?;
            let record = maps.record(cookie).with_context(|| {
                format!(
                    "workload {}/{}: netns {} has no inbound record in {}; its inbound connections are not intercepted",
                    w.namespace,
                    w.name,
                    ns.display(),
                    dir.display()
                )
            })?;
            let id = record.policy_id;
            let action = |a: Option<u32>| a.and_then(Action::from_value);
            Some(inbound::evaluate_inbound_lookups(
                args.from_loopback,
                port,
                source,
                Lookups {
                    port: |p| action(maps.lookup_port(id, p)),
                    ip: |ip| match ip {
                        IpAddr::V4(a) => action(maps.lookup_v4(id, a.octets())),
                        IpAddr::V6(a) => action(maps.lookup_v6(id, a.octets())),
                    },
                },
            ))
        }
    };
    let step = kernel.unwrap_or(verdict.step);
    let (n, name) = inbound::step_name(step);
    let to = if step.steers() {
        format!("proxy (inbound listener :{})", config.proxy.inbound_port)
    } else {
        format!("app (:{port})")
    };
    match args.output {
        Output::Json => {
            let out = json!({
                "workload": format!("{}/{}", w.namespace, w.name),
                "direction": "inbound",
                "dest_port": port,
                "source": source.to_string(),
                "decision": if step.steers() { "proxy" } else { "app" },
                "step": name,
                "step_number": n,
                "rule": verdict.source.as_ref().map(|s| s.to_string()),
                "evaluated": if kernel.is_some() { "kernel" } else { "policy" },
                "agree": kernel.is_none_or(|k| k == verdict.step),
                "inbound_error": inbound_error.map(|e| e.to_string()),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Output::Text => {
            println!("workload  {}/{} (inbound)", w.namespace, w.name);
            if let Some(e) = inbound_error {
                println!(
                    "rejected  {e}: the outbound policy is unaffected; inbound keeps its last good policy, or the mesh default's inbound lists (shown here)"
                );
            }
            println!("dest      port {port} from {source}");
            println!("decision  {to}");
            println!("step      {n} {name}");
            match (&verdict.source, step) {
                (Some(s), _) => println!("because   {s}"),
                (None, redirect_common::decide::InboundStep::ExcludedPort) => {
                    println!("because   the proxy's own port ({own:?})")
                }
                (None, redirect_common::decide::InboundStep::IncludedPort) => {
                    println!(
                        "because   all inbound ports are captured (includeInboundPorts \"*\", the default)"
                    )
                }
                _ => {}
            }
        }
    }
    // With a rejected inbound value the kernel keeps the last good policy, which may well
    // differ from the mesh default shown: that is the rule working, not a stale kernel.
    if let Some(k) = kernel
        && k != verdict.step
        && inbound_error.is_none()
    {
        bail!(
            "the pinned maps decide {} but the config decides {}: the kernel does not hold this config",
            inbound::step_name(k).1,
            inbound::step_name(verdict.step).1
        );
    }
    Ok(())
}
