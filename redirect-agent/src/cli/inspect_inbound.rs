//! The inbound (sk_lookup) part of `inspect`: netns records, their rules, the linked netns and the
//! counters, read from the pins. Empty when the pins predate inbound.
use std::{fmt::Write as _, path::Path};

use serde_json::json;

use crate::bpf::{inbound_maps::InboundMaps, netns};

pub fn json(dir: &Path) -> serde_json::Value {
    let Ok(maps) = InboundMaps::open(dir) else {
        return serde_json::Value::Null;
    };
    let entries = maps.entries().unwrap_or_default();
    let netns: Vec<_> = maps
        .records()
        .unwrap_or_default()
        .iter()
        .map(|(cookie, r)| {
            let e = entries.get(&r.policy_id).cloned().unwrap_or_default();
            json!({
                "netns_cookie": cookie,
                "policy_id": r.policy_id,
                "proxy_port": r.proxy_port,
                "ports": e.ports.iter().map(|((bits, p), a)| json!({"port": p, "bits": bits, "action": action(*a)})).collect::<Vec<_>>(),
                "excluded_sources": e.v4.len() + e.v6.len(),
            })
        })
        .collect();
    let counters: serde_json::Map<String, serde_json::Value> = maps
        .counters()
        .unwrap_or_default()
        .iter()
        .map(|(c, n)| (c.name().to_string(), json!(n)))
        .collect();
    json!({"netns": netns, "links": netns::linked(dir), "counters": counters})
}

fn action(a: u32) -> &'static str {
    match a {
        redirect_common::action::EXCLUDE => "app",
        redirect_common::action::INCLUDE => "proxy",
        _ => "?",
    }
}

pub fn text(dir: &Path) -> String {
    let mut s = String::new();
    let Ok(maps) = InboundMaps::open(dir) else {
        return s;
    };
    let _ = writeln!(s, "\nINBOUND (sk_lookup)");
    let _ = writeln!(
        s,
        "{:<22} {:>8} {:>10}",
        "NETNS COOKIE", "POLICY", "PROXY PORT"
    );
    for (cookie, r) in maps.records().unwrap_or_default() {
        let _ = writeln!(s, "{cookie:<22} {:>8} {:>10}", r.policy_id, r.proxy_port);
    }
    let _ = writeln!(s, "linked netns inodes: {:?}", netns::linked(dir));
    for (c, n) in maps.counters().unwrap_or_default() {
        let _ = writeln!(s, "{:<22} {}", c.name(), n);
    }
    s
}
