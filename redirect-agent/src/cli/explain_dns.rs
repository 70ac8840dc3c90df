//! `explain` for a port-53 destination: the DNS capture decision (issue 17), from the policy and,
//! with `--bpffs-dir`, from the kernel's record, through the same `decide_dns` the kernel runs.
use redirect_common::{
    Policy,
    dns::{DnsStep, capture_on, decide_dns},
};
use serde_json::json;

use super::{Output, explain::ExplainArgs};
use crate::{policy::DnsPolicy, proxy::ProxyConfig};

fn name(step: DnsStep) -> &'static str {
    match step {
        DnsStep::NotDns => "not_dns",
        DnsStep::Off => "dns_off",
        DnsStep::ProxyCaller => "dns_proxy_caller",
        DnsStep::Captured => "dns_captured",
    }
}

/// None when DNS capture has no say (not port 53, or capture off in both views): the TCP order
/// then explains the destination. Otherwise prints the DNS decision; a disagreement between the
/// policy and the kernel is an error, as for TCP.
pub(super) fn explain(
    args: &ExplainArgs,
    dns: &DnsPolicy,
    record: Option<&Policy>,
    proxy: &ProxyConfig,
) -> Option<anyhow::Result<()>> {
    let port = args.dest.port();
    let policy_step = decide_dns(dns.enabled(), args.as_proxy, port);
    let kernel_step =
        record.map(|r| decide_dns(capture_on(r.flags, r.dns_port), args.as_proxy, port));
    let step = kernel_step.unwrap_or(policy_step);
    if matches!(policy_step, DnsStep::NotDns | DnsStep::Off)
        && matches!(step, DnsStep::NotDns | DnsStep::Off)
    {
        return None;
    }
    let dns_port = record.map_or(dns.record_port(), |r| r.dns_port);
    let (v4, v6) = match record {
        Some(r) => (r.proxy_addr4.into(), r.proxy_addr6.into()),
        None => proxy.targets(),
    };
    let target = match args.dest {
        std::net::SocketAddr::V4(_) => format!("{v4}:{dns_port}"),
        std::net::SocketAddr::V6(_) => format!("[{v6}]:{dns_port}"),
    };
    let captured = step == DnsStep::Captured;
    let source = dns.capture.as_ref().map(|c| c.source.to_string());
    match args.output {
        Output::Json => {
            let out = json!({
                "workload": args.workload,
                "dest": args.dest.to_string(),
                "decision": if captured { "redirect" } else { "bypass" },
                "step": name(step),
                "dns_target": captured.then_some(&target),
                "source": source,
                "evaluated": if record.is_some() { "kernel" } else { "policy" },
                "policy_decision": {"step": name(policy_step)},
                "agree": kernel_step.is_none_or(|k| k == policy_step),
            });
            match serde_json::to_string_pretty(&out) {
                Ok(s) => println!("{s}"),
                Err(e) => return Some(Err(e.into())),
            }
        }
        Output::Text => {
            println!("workload  {}", args.workload.as_deref().unwrap_or(""));
            println!("dest      {} (DNS: UDP and TCP)", args.dest);
            if captured {
                println!("decision  redirect -> {target} (the proxy's DNS listener)");
            } else {
                println!("decision  bypass (goes to {} directly)", args.dest);
            }
            println!("step      {}", name(step));
            if step == DnsStep::ProxyCaller {
                println!("because   the proxy's own queries are never captured");
            } else if let Some(s) = &source {
                println!("because   DNS capture set by {s}");
            }
            println!("note      excluded CIDRs and ports do not apply to DNS capture");
        }
    }
    match kernel_step {
        Some(k) if k != policy_step => Some(Err(anyhow::anyhow!(
            "the pinned maps decide {} for DNS, but the config decides {}: the kernel does not hold this config (is the agent running on it?)",
            name(k),
            name(policy_step)
        ))),
        _ => Some(Ok(())),
    }
}
