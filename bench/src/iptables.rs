//! The iptables side: N exclusion CIDRs, and istio-iptables' nat OUTPUT layout loaded with one
//! iptables-restore into a lane's netns; inbound, N excluded ports and its ISTIO_INBOUND layout.
use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use redirect_tests::Fixture;

use super::PROXY_UID;

/// The `i`-th exclusion: disjoint blocks of 128 addresses in 10.0.0.0/8 with prefix lengths
/// cycling through /25../32, so that no two overlap and none covers the bench's destinations
/// (198.18.0.0/15): every packet walks the whole list. 10/8 holds 131 072 such blocks.
pub fn exclusion(i: usize) -> String {
    assert!(i < 1 << 17, "exclusion index {i} outside 10.0.0.0/8");
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i as u32) * 128;
    format!("{}/{}", Ipv4Addr::from(base), 25 + i % 8)
}

pub fn exclusions(n: usize) -> Vec<String> {
    (0..n).map(exclusion).collect()
}

/// istio-iptables' outbound capture (tools/istio-iptables), as `iptables-save` prints it after
/// `istio-iptables -p 15001 -u 1337 -g 1337 -x <cidrs>`: the proxy uid/gid RETURNs, the
/// loopback RETURN, one RETURN per excluded CIDR, then the REDIRECT. Istio's `-o lo` rules for
/// inbound and pod-to-itself traffic are left out: here every destination sits on `lo`, so they
/// would exempt everything and measure nothing.
pub fn ruleset(exclusions: &[String]) -> String {
    let mut s = String::with_capacity(64 * exclusions.len() + 512);
    s.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    s.push_str(":POSTROUTING ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n");
    s.push_str("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n");
    s.push_str(&format!(
        "-A ISTIO_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN\n"
    ));
    s.push_str(&format!(
        "-A ISTIO_OUTPUT -m owner --gid-owner {PROXY_UID} -j RETURN\n"
    ));
    s.push_str("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n");
    for c in exclusions {
        s.push_str(&format!("-A ISTIO_OUTPUT -d {c} -j RETURN\n"));
    }
    s.push_str("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n");
    s.push_str("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n");
    s
}

/// The `i`-th excluded inbound port: every other port from 20000 (20000, 20002, …), so that
/// neither side can merge them into ranges: iptables gets one rule per port, as istio-iptables
/// writes them, and the agent one trie entry per port.
pub fn inbound_exclusion(i: usize) -> String {
    assert!(i < 20_000, "excluded inbound port index {i} beyond 60000");
    (20_000 + 2 * i).to_string()
}

pub fn inbound_exclusions(n: usize) -> Vec<String> {
    (0..n).map(inbound_exclusion).collect()
}

/// The proxy's own ports istio-iptables always exempts from inbound capture (15008 HBONE, and
/// the injector's default excludeInboundPorts: 15090 metrics, 15021 health, 15020 status); the
/// agent exempts the same ports by itself.
const ISTIO_OWN_INBOUND: [u16; 4] = [15008, 15090, 15021, 15020];

/// istio-iptables' inbound capture, as `iptables-save` prints it after `istio-iptables -b '*'
/// -d <ports>` (its outbound half left out): PREROUTING → ISTIO_INBOUND, a RETURN per excluded
/// port (the proxy's own, then the `ports`), then ISTIO_IN_REDIRECT → REDIRECT to 15006.
pub fn inbound_ruleset(ports: &[String]) -> String {
    let mut s = String::with_capacity(64 * ports.len() + 512);
    s.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    s.push_str(":POSTROUTING ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\n:ISTIO_IN_REDIRECT - [0:0]\n");
    s.push_str("-A PREROUTING -p tcp -j ISTIO_INBOUND\n");
    let own = ISTIO_OWN_INBOUND.iter().map(u16::to_string);
    for p in own.chain(ports.iter().cloned()) {
        s.push_str(&format!(
            "-A ISTIO_INBOUND -p tcp -m tcp --dport {p} -j RETURN\n"
        ));
    }
    s.push_str("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n");
    s.push_str("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\nCOMMIT\n");
    s
}

/// `iptables -V`, e.g. "iptables v1.8.9 (nf_tables)".
pub fn version() -> String {
    Command::new("iptables")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("iptables unavailable: {e}"))
}

/// Replaces the nat table of the fixture's netns with `rules` (iptables-restore without
/// --noflush swaps the whole table in one commit) and returns how long that took. Fails if it
/// takes longer than `limit`; the process is killed then.
pub fn restore(fx: &Fixture, tools: &Path, rules: &str, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut child = fx.spawn_in(
        tools,
        Command::new("iptables-restore")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )?;
    let mut stdin = child.stdin.take().context("iptables-restore stdin")?;
    let feed = {
        let rules = rules.to_string();
        std::thread::spawn(move || stdin.write_all(rules.as_bytes()))
    };
    loop {
        if let Some(status) = child.try_wait()? {
            let elapsed = started.elapsed();
            let _ = feed.join();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!(
                    "iptables-restore in netns {} failed ({status}): {}",
                    fx.netns_name(),
                    err.trim()
                );
            }
            return Ok(elapsed);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "iptables-restore of {} lines did not finish within {limit:?}",
                rules.lines().count()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions_are_disjoint_and_miss_the_destinations() {
        assert_eq!(exclusion(0), "10.0.0.0/25");
        assert_eq!(exclusion(1), "10.0.0.128/26");
        assert_eq!(exclusion(7), "10.0.3.128/32");
        assert_eq!(exclusion((1 << 17) - 1), "10.255.255.128/32");
        let rules = ruleset(&exclusions(3));
        assert_eq!(rules.matches(" -j RETURN\n").count(), 3 + 3);
        assert!(rules.contains("-A ISTIO_OUTPUT -d 10.0.1.0/27 -j RETURN\n"));
        assert!(rules.ends_with("--to-ports 15001\nCOMMIT\n"));
    }

    #[test]
    fn inbound_exclusions_are_separate_ports_and_the_layout_is_istio_inbound() {
        assert_eq!(inbound_exclusions(3), ["20000", "20002", "20004"]);
        assert_eq!(inbound_exclusion(999), "21998");
        let rules = inbound_ruleset(&inbound_exclusions(2));
        assert_eq!(rules.matches(" -j RETURN\n").count(), 4 + 2);
        assert!(rules.contains("-A ISTIO_INBOUND -p tcp -m tcp --dport 20002 -j RETURN\n"));
        assert!(rules.contains("-A PREROUTING -p tcp -j ISTIO_INBOUND\n"));
        assert!(rules.ends_with("--to-ports 15006\nCOMMIT\n"));
    }
}
