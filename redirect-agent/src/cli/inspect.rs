//! `redirect-agent inspect`: what the kernel holds, read from the pinned maps.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use redirect_common::{OrigEvent, Policy, action, flags};
use serde_json::json;

use super::{BpffsArg, Output};
use crate::{
    bpf::{PinnedMaps, PolicyEntries, maps::MapFill},
    cgroup,
};

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub bpffs: BpffsArg,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    // The newest layout generation (bpf/generation.rs); an upgrade in progress is named below.
    let generations = crate::bpf::generation::list(&args.bpffs.bpffs_dir);
    let dir = crate::bpf::generation::current(&args.bpffs.bpffs_dir);
    // Another release's maps would be misread: say so instead (issue #13).
    crate::bpf::generation::check_readable(&dir)?;
    let maps = PinnedMaps::open(&dir)?;
    let links = crate::bpf::loader::link_status(&dir);
    let policies = maps.policies()?;
    let entries = maps.entries()?;
    let counters = maps.counters()?;
    let pod_counts = maps.pod_decisions()?;
    let orig = OrigView {
        fill: maps.orig_fill()?,
        stats: maps.orig_stats()?,
    };
    let dns = crate::bpf::dns::dns_stats(&dir)?;
    let paths = cgroup_paths(policies.keys().copied().collect());
    match args.output {
        Output::Json => {
            let workloads: Vec<_> = policies
                .iter()
                .map(|(cg, p)| {
                    let e = entries.get(&p.policy_id).cloned().unwrap_or_default();
                    json!({
                        "cgroup_id": cg,
                        "cgroup": paths.get(cg).map(|p| p.display().to_string()),
                        "policy_id": p.policy_id,
                        // Entries not in "cidrs"/"ports" come from this shared set's (layered).
                        "base_id": (p.base_id != 0).then_some(p.base_id),
                        "enabled": p.flags & flags::ENABLED != 0,
                        "mode": if p.flags & flags::MODE_NODE != 0 { "node" } else { "sidecar" },
                        "proxy_v4": format!("{}:{}", Ipv4Addr::from(p.proxy_addr4), p.proxy_port),
                        "proxy_v6": format!("[{}]:{}", Ipv6Addr::from(p.proxy_addr6), p.proxy_port),
                        "proxy_uid": (p.flags & flags::HAS_PROXY_UID != 0).then_some(p.proxy_uid),
                        "proxy_cgroup_id": (p.flags & flags::HAS_PROXY_CGROUP != 0).then_some(p.proxy_cgroup),
                        "dns": dns_json(p),
                        "cidrs": cidr_rows(&e).into_iter().map(|(c, a)| json!({"cidr": c, "action": a})).collect::<Vec<_>>(),
                        "ports": port_rows(&e).into_iter().map(|(c, a)| json!({"ports": c, "action": a})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let counters: serde_json::Map<String, serde_json::Value> = counters
                .iter()
                .map(|(d, n)| (d.name().to_string(), json!(n)))
                .collect();
            let out = json!({
                "bpffs_dir": maps.dir().display().to_string(),
                "layout_generation": generations.last().map_or(0, |g| g.number),
                "older_generations": generations.iter().filter(|g| g.dir != dir).map(|g| json!({"generation": g.number, "dir": g.dir.display().to_string()})).collect::<Vec<_>>(),
                "workloads": workloads,
                "counters": counters,
                // Per workload, apart from the records: they change with every connect.
                "workload_counters": pod_counts.iter().map(|(cg, c)| json!({"cgroup_id": cg, "decisions": crate::bpf::podstats::by_decision(c).map(|(d, n)| (d.name().to_string(), json!(n))).collect::<serde_json::Map<_, _>>()})).collect::<Vec<_>>(),
                "original_destinations": orig.json(),
                "dns_counters": dns.iter().map(|(e, n)| (e.name().to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "inbound": super::inspect_inbound::json(maps.dir()),
                "attached": links.attached,
                "not_attached": links.missing,
            });
            emit(&(serde_json::to_string_pretty(&out)? + "\n"))?;
        }
        Output::Text => {
            let mut s = String::new();
            if !links.missing.is_empty() {
                let _ = writeln!(s, "WARNING: {}\n", not_attached(&links.missing));
            }
            for g in generations.iter().filter(|g| g.dir != dir) {
                let _ = writeln!(
                    s,
                    "upgrade in progress: layout generation {} ({}) stays attached until the agent running {} is ready\n",
                    g.number,
                    g.dir.display(),
                    dir.display()
                );
            }
            s += &render_text(&maps, &policies, &entries, &counters, &paths);
            s += &pod_counts_text(&pod_counts);
            s += &orig.text();
            s += &dns_text(&policies, &dns);
            s += &super::inspect_inbound::text(maps.dir());
            emit(&s)?;
        }
    }
    // The maps alone decide nothing: say so with the exit status too (issue #16).
    if !links.missing.is_empty() {
        anyhow::bail!(
            "{} (pinned maps in {})",
            not_attached(&links.missing),
            maps.dir().display()
        );
    }
    Ok(())
}

fn not_attached(missing: &[&str]) -> String {
    format!(
        "not attached: {}; interception is OFF for these hooks (start `redirect-agent run`, or `redirect-agent cleanup` to remove the leftover maps)",
        missing.join(", ")
    )
}

/// Writes to stdout; a closed pipe (`inspect | head`) ends the output quietly instead of
/// panicking like `print!` does.
fn emit(s: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => Ok(r?),
    }
}

/// The original-destination records: how full their maps are (they must drain back as
/// connections close) and what the programs did.
struct OrigView {
    fill: Vec<MapFill>,
    stats: Vec<(OrigEvent, u64)>,
}

impl OrigView {
    fn json(&self) -> serde_json::Value {
        let maps: serde_json::Map<String, serde_json::Value> = self
            .fill
            .iter()
            .map(|f| {
                (
                    f.name.to_string(),
                    json!({"entries": f.entries, "max_entries": f.max_entries}),
                )
            })
            .collect();
        let counters: serde_json::Map<String, serde_json::Value> = self
            .stats
            .iter()
            .map(|(e, n)| (e.name().to_string(), json!(n)))
            .collect();
        json!({"maps": maps, "counters": counters})
    }

    fn text(&self) -> String {
        let mut s = String::new();
        if self.fill.is_empty() {
            return s;
        }
        let _ = writeln!(s, "\nORIGINAL DESTINATION RECORDS");
        let _ = writeln!(
            s,
            "{:<12} {:>10} {:>12} {:>7}",
            "MAP", "ENTRIES", "MAX", "FILL"
        );
        for f in &self.fill {
            let pct = 100.0 * f.entries as f64 / f64::from(f.max_entries.max(1));
            let _ = writeln!(
                s,
                "{:<12} {:>10} {:>12} {:>6.1}%",
                f.name, f.entries, f.max_entries, pct
            );
        }
        for (e, n) in &self.stats {
            let _ = writeln!(s, "{:<22} {}", e.name(), n);
        }
        s
    }
}

/// A workload's DNS capture: where its port-53 traffic goes, or null when capture is off.
fn dns_json(p: &Policy) -> serde_json::Value {
    if !redirect_common::dns::capture_on(p.flags, p.dns_port) {
        return serde_json::Value::Null;
    }
    json!({
        "v4": format!("{}:{}", Ipv4Addr::from(p.proxy_addr4), p.dns_port),
        "v6": format!("[{}]:{}", Ipv6Addr::from(p.proxy_addr6), p.dns_port),
    })
}

fn dns_text(
    policies: &BTreeMap<u64, Policy>,
    stats: &[(redirect_common::dns::DnsEvent, u64)],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nDNS CAPTURE (port 53, UDP and TCP)");
    for (cg, p) in policies {
        let to = if redirect_common::dns::capture_on(p.flags, p.dns_port) {
            format!("{}:{}", Ipv4Addr::from(p.proxy_addr4), p.dns_port)
        } else {
            "off".into()
        };
        let _ = writeln!(s, "{cg:<12} {to}");
    }
    for (e, n) in stats {
        let _ = writeln!(s, "{:<22} {}", e.name(), n);
    }
    s
}

fn render_text(
    maps: &PinnedMaps,
    policies: &BTreeMap<u64, Policy>,
    entries: &BTreeMap<u32, PolicyEntries>,
    counters: &[(redirect_common::Decision, u64)],
    paths: &BTreeMap<u64, PathBuf>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "pinned state in {}", maps.dir().display());
    let _ = writeln!(s, "\nWORKLOADS ({})", policies.len());
    let _ = writeln!(
        s,
        "{:<12} {:<7} {:<8} {:<8} {:<22} {:<8} {:<8} CGROUP",
        "CGROUP_ID", "POLICY", "ENABLED", "MODE", "PROXY", "UID", "ENTRIES"
    );
    for (cg, p) in policies {
        let n = entries.get(&p.policy_id).map_or(0, PolicyEntries::len);
        let uid = if p.flags & flags::HAS_PROXY_UID != 0 {
            p.proxy_uid.to_string()
        } else {
            "-".into()
        };
        let _ = writeln!(
            s,
            "{:<12} {:<7} {:<8} {:<8} {:<22} {:<8} {:<8} {}",
            cg,
            p.policy_id,
            p.flags & flags::ENABLED != 0,
            if p.flags & flags::MODE_NODE != 0 {
                "node"
            } else {
                "sidecar"
            },
            format!("{}:{}", Ipv4Addr::from(p.proxy_addr4), p.proxy_port),
            uid,
            n,
            paths
                .get(cg)
                .map_or_else(|| "?".into(), |p| p.display().to_string()),
        );
    }
    let _ = writeln!(s, "\nENTRIES");
    let _ = writeln!(s, "{:<7} {:<6} {:<44} ACTION", "POLICY", "KIND", "MATCH");
    for (id, e) in entries {
        for (c, a) in cidr_rows(e) {
            let _ = writeln!(s, "{:<7} {:<6} {:<44} {}", id, "cidr", c, a);
        }
        for (c, a) in port_rows(e) {
            let _ = writeln!(s, "{:<7} {:<6} {:<44} {}", id, "port", c, a);
        }
    }
    let _ = writeln!(s, "\nCOUNTERS (connects since the maps were created)");
    for (d, n) in counters {
        let _ = writeln!(s, "{:<22} {}", d.name(), n);
    }
    s
}

/// Per-workload decision counts (`POD_STATS`), the decisions that occurred.
fn pod_counts_text(counts: &BTreeMap<u64, crate::bpf::podstats::Counts>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nCOUNTERS PER WORKLOAD ({})", counts.len());
    let _ = writeln!(s, "{:<12} DECISIONS", "CGROUP_ID");
    for (cg, c) in counts {
        let row: Vec<String> = crate::bpf::podstats::by_decision(c)
            .filter(|(_, n)| *n > 0)
            .map(|(d, n)| format!("{}={n}", d.name()))
            .collect();
        let _ = writeln!(
            s,
            "{:<12} {}",
            cg,
            if row.is_empty() {
                "-".to_string()
            } else {
                row.join(" ")
            }
        );
    }
    s
}

fn action_name(a: u32) -> &'static str {
    match a {
        action::EXCLUDE => "exclude",
        action::INCLUDE => "include",
        action::STOP => "stop",
        _ => "unknown",
    }
}

fn cidr_rows(e: &PolicyEntries) -> Vec<(String, &'static str)> {
    let v4 =
        e.v4.iter()
            .map(|((bits, a), act)| (format!("{}/{bits}", Ipv4Addr::from(*a)), action_name(*act)));
    let v6 =
        e.v6.iter()
            .map(|((bits, a), act)| (format!("{}/{bits}", Ipv6Addr::from(*a)), action_name(*act)));
    v4.chain(v6).collect()
}

/// A port prefix shown as the range it covers.
fn port_rows(e: &PolicyEntries) -> Vec<(String, &'static str)> {
    e.ports
        .iter()
        .map(|((bits, port), act)| {
            let span = 1u32 << (16 - bits);
            let hi = u32::from(*port) + span - 1;
            let text = if span == 1 {
                port.to_string()
            } else {
                format!("{port}-{hi}")
            };
            (text, action_name(*act))
        })
        .collect()
}

/// Best effort: finds the directories of the registered cgroup ids by walking the cgroup2 mount
/// (a few thousand directories on a busy node).
fn cgroup_paths(mut wanted: BTreeSet<u64>) -> BTreeMap<u64, PathBuf> {
    let mut found = BTreeMap::new();
    let Ok(mount) = cgroup::cgroup2_mount() else {
        return found;
    };
    let mut stack = vec![(mount, 0u32)];
    while let Some((dir, depth)) = stack.pop() {
        if wanted.is_empty() {
            break;
        }
        if let Ok(id) = cgroup::cgroup_id(&dir)
            && wanted.remove(&id)
        {
            found.insert(id, dir.clone());
        }
        if depth >= redirect_common::MAX_CGROUP_DEPTH {
            continue;
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.filter_map(Result::ok) {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    found
}
