//! The report's inbound section (issue #11): conn/s with the client on another node, each
//! interception beside connecting to the app and to the proxy directly.
use std::fmt::Write as _;

use super::{
    report::{kind_ratio, num, samples_of, sizes_of, thousands},
    results::{Kind, Mode, Results},
    stats::median,
};

const MODES: [Mode; 4] = [Mode::None, Mode::DirectToProxy, Mode::Iptables, Mode::Ebpf];

pub const METHOD: &str = "\
Inbound, each mode has a pod netns and a \"client node\" netns joined by a veth pair \
(198.19.2.1 → 198.19.2.2); the app (the bench server, answering as above) listens on \
0.0.0.0:8080 in the pod's app cgroup and the proxy (the same `redirect-testproxy`, uid 1337) on \
0.0.0.0:15006 in its proxy cgroup; the client runs on the node and connects to 198.19.2.2:8080. \
Modes: `direct-app` (no interception, the app answers); `direct-proxy` (the client connects to \
198.19.2.2:15006 itself: the goal's reference; the proxy forwards to the app); `iptables` \
(istio-iptables' inbound layout in the pod's nat table: `PREROUTING -p tcp -j ISTIO_INBOUND`, a \
`--dport P -j RETURN` for the proxy's own ports 15008, 15090, 15021, 15020 and for each of the N \
excluded ports, then `ISTIO_IN_REDIRECT` → `REDIRECT --to-ports 15006`); `ebpf` (the agent, its \
sk_lookup program in the pod's netns, the same N ports in \
`traffic.sidecar.istio.io/excludeInboundPorts`). The N excluded ports are 20000, 20002, … (none \
adjacent, so neither side merges them into ranges; none is the app's port, so iptables walks \
them all). Interception only: the client connects and resets, the proxy accepts, reads the \
original destination and closes; through the proxy: one request and response, the proxy \
forwarding to the original destination (the app). Modes interleave in rotating order; ratios \
are taken within each run.";

fn title(kind: Kind) -> &'static str {
    match kind {
        Kind::InboundProbe => "interception only (connect and reset)",
        _ => "through the proxy (one request and response)",
    }
}

pub fn section(r: &Results, md: &mut String) {
    let kinds: Vec<Kind> = Kind::INBOUND
        .into_iter()
        .filter(|k| r.conn.iter().any(|s| s.kind == *k))
        .collect();
    if kinds.is_empty() {
        return;
    }
    let _ = writeln!(md, "## Inbound: new connections per second\n\n{METHOD}\n");
    for kind in kinds {
        for &t in &r.params.threads {
            table(r, kind, t, md);
        }
    }
}

fn table(r: &Results, kind: Kind, threads: usize, md: &mut String) {
    if !r
        .conn
        .iter()
        .any(|s| s.kind == kind && s.threads == threads)
    {
        return;
    }
    let _ = writeln!(
        md,
        "### Inbound, {}, {threads} client thread{}\n\nMedian over {} runs; ratios are medians of the ratios taken within each run. direct-proxy / iptables is the most any interception can gain over iptables.\n",
        title(kind),
        if threads == 1 { "" } else { "s" },
        r.params.inbound_runs
    );
    let _ = writeln!(
        md,
        "| N | direct-app | direct-proxy | iptables | ebpf | ebpf / direct-proxy | ebpf / iptables | direct-proxy / iptables |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for n in sizes_of(r, &[kind]) {
        let mut row = format!("| {n} ");
        for m in MODES {
            let x = median(
                samples_of(r, kind, n, threads, m)
                    .into_iter()
                    .map(|s| s.conns_per_s),
            );
            let _ = write!(row, "| {} ", thousands(x));
        }
        let ratio = |a, b| kind_ratio(r, kind, n, threads, a, b);
        let _ = writeln!(
            md,
            "{row}| {} | {} | {} |",
            num(ratio(Mode::Ebpf, Mode::DirectToProxy), 3),
            num(ratio(Mode::Ebpf, Mode::Iptables), 2),
            num(ratio(Mode::DirectToProxy, Mode::Iptables), 2)
        );
    }
    md.push('\n');
}

/// The inbound target rows: ebpf ≥ 0.97 × direct-proxy at every N, per kind and thread count.
pub fn targets(r: &Results, md: &mut String) {
    for kind in Kind::INBOUND {
        let ns = sizes_of(r, &[kind]);
        for &t in &r.params.threads {
            let worst = ns
                .iter()
                .map(|&n| {
                    (
                        n,
                        kind_ratio(r, kind, n, t, Mode::Ebpf, Mode::DirectToProxy),
                    )
                })
                .filter(|(_, x)| x.is_finite())
                .min_by(|a, b| a.1.total_cmp(&b.1));
            let Some((n, x)) = worst else { continue };
            let hi = ns.last().copied().unwrap_or(0);
            let vs = kind_ratio(r, kind, hi, t, Mode::Ebpf, Mode::Iptables);
            let limit = kind_ratio(r, kind, hi, t, Mode::DirectToProxy, Mode::Iptables);
            let _ = writeln!(
                md,
                "| inbound, {}: ebpf ≥ 0.97 × direct-proxy conn/s at every N excluded ports ({t} thr.) | lowest {x:.3} (N = {n}); at N = {hi} ebpf / iptables {} (limit direct-proxy / iptables {}) | {} |",
                title(kind),
                num(vs, 2),
                num(limit, 2),
                super::report::verdict(x >= 0.97)
            );
        }
    }
}
