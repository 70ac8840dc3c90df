//! Turns [`Results`] into the report: Markdown tables (medians over runs, ratios taken within
//! each run), raw CSV, and the figures (see `plot`).
use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result};

use super::{
    plot,
    results::{ConnSample, Kind, Mode, Results},
    stats::median,
};

const TABLE_MODES: [Mode; 4] = [Mode::None, Mode::DirectToProxy, Mode::Iptables, Mode::Ebpf];

/// The proxied samples of one N, thread count and mode.
pub fn samples(r: &Results, n: usize, threads: usize, mode: Mode) -> Vec<&ConnSample> {
    samples_of(r, Kind::Proxied, n, threads, mode)
}

pub fn samples_of(
    r: &Results,
    kind: Kind,
    n: usize,
    threads: usize,
    mode: Mode,
) -> Vec<&ConnSample> {
    r.conn
        .iter()
        .filter(|s| s.kind == kind && s.n == n && s.threads == threads && s.mode == mode)
        .collect()
}

/// Median over runs of num/den conn/s of `kind`, each ratio taken within one run.
pub fn kind_ratio(r: &Results, kind: Kind, n: usize, threads: usize, num: Mode, den: Mode) -> f64 {
    let dens = samples_of(r, kind, n, threads, den);
    median(
        samples_of(r, kind, n, threads, num)
            .into_iter()
            .filter_map(|a| {
                let b = dens.iter().find(|b| b.run == a.run)?;
                Some(a.conns_per_s / b.conns_per_s)
            }),
    )
}

/// Median over runs of `f`.
pub fn med(r: &Results, n: usize, threads: usize, mode: Mode, f: fn(&ConnSample) -> f64) -> f64 {
    median(samples(r, n, threads, mode).into_iter().map(f))
}

/// Median over runs of num/den conn/s, each ratio taken within one run.
pub fn ratio(r: &Results, n: usize, threads: usize, num: Mode, den: Mode) -> f64 {
    ratio_of(r, n, threads, num, den, |s| s.conns_per_s)
}

/// Median over runs of num/den of `f`, each ratio taken within one run.
pub fn ratio_of(
    r: &Results,
    n: usize,
    threads: usize,
    num: Mode,
    den: Mode,
    f: fn(&ConnSample) -> f64,
) -> f64 {
    let dens = samples(r, n, threads, den);
    median(samples(r, n, threads, num).into_iter().filter_map(|a| {
        let b = dens.iter().find(|b| b.run == a.run)?;
        Some(f(a) / f(b))
    }))
}

pub(super) fn num(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "–".to_string()
    }
}

pub(super) fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "–".to_string();
    }
    let s = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    out
}

pub(super) fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

/// The outbound samples' N (excluded CIDRs).
pub fn sizes(r: &Results) -> Vec<usize> {
    sizes_of(r, &Kind::ALL)
}

pub fn sizes_of(r: &Results, kinds: &[Kind]) -> Vec<usize> {
    let mut v: Vec<usize> = r
        .conn
        .iter()
        .filter(|s| kinds.contains(&s.kind))
        .map(|s| s.n)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn conn_table(r: &Results, threads: usize, md: &mut String) {
    let _ = writeln!(
        md,
        "## New connections per second, {threads} client thread{}\n\nMedian over {} runs; ratios are medians of the ratios taken within each run.\n",
        if threads == 1 { "" } else { "s" },
        r.params.runs
    );
    let _ = writeln!(
        md,
        "| N | none | direct-to-proxy | iptables | ebpf | ebpf / direct-to-proxy | ebpf / iptables |\n|---:|---:|---:|---:|---:|---:|---:|"
    );
    for n in sizes(r) {
        let mut row = format!("| {n} ");
        for m in TABLE_MODES {
            let _ = write!(
                row,
                "| {} ",
                thousands(med(r, n, threads, m, |s| s.conns_per_s))
            );
        }
        let _ = writeln!(
            md,
            "{row}| {} | {} |",
            num(ratio(r, n, threads, Mode::Ebpf, Mode::DirectToProxy), 3),
            num(ratio(r, n, threads, Mode::Ebpf, Mode::Iptables), 2)
        );
    }
    md.push('\n');
}

fn probe_table(r: &Results, threads: usize, md: &mut String) {
    if !r.conn.iter().any(|s| s.kind == Kind::Probe) {
        return;
    }
    let _ = writeln!(
        md,
        "## Interception only: connect-rate probes per second, {threads} client thread{}\n\nThe client connects and resets; the proxy accepts, reads the original destination and closes. Median over {} runs; ratios are medians of the ratios taken within each run. direct-to-proxy / iptables is the most any interception can gain over iptables.\n",
        if threads == 1 { "" } else { "s" },
        r.params.runs
    );
    let _ = writeln!(
        md,
        "| N | none | direct-to-proxy | iptables | ebpf | ebpf / direct-to-proxy | ebpf / iptables | direct-to-proxy / iptables |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for n in sizes(r) {
        let mut row = format!("| {n} ");
        for m in TABLE_MODES {
            let x = median(
                samples_of(r, Kind::Probe, n, threads, m)
                    .into_iter()
                    .map(|s| s.conns_per_s),
            );
            let _ = write!(row, "| {} ", thousands(x));
        }
        let ratio = |a, b| kind_ratio(r, Kind::Probe, n, threads, a, b);
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

fn cpu_table(r: &Results, md: &mut String) {
    let f = |s: &ConnSample| s.cpu_us_per_conn;
    let _ = writeln!(
        md,
        "## CPU time per connection, 1 client thread (µs)\n\nCPU time of all the mode's processes (client, proxy, server, and the kernel work done on their behalf: TCP, netfilter, eBPF) over the measured window, from the mode's cgroup `cpu.stat`, divided by the connections completed. It is the cost behind conn/s once the machine is saturated; on a shared VM it still moves with other load (cache pressure, steal time), so read its ratios with the same caution.\n\n| N | none | direct-to-proxy | iptables | ebpf | ebpf / direct-to-proxy | iptables / ebpf |\n|---:|---:|---:|---:|---:|---:|---:|"
    );
    for n in sizes(r) {
        let mut row = format!("| {n} ");
        for m in TABLE_MODES {
            let _ = write!(row, "| {} ", num(med(r, n, 1, m, f), 1));
        }
        let _ = writeln!(
            md,
            "{row}| {} | {} |",
            num(ratio_of(r, n, 1, Mode::Ebpf, Mode::DirectToProxy, f), 3),
            num(ratio_of(r, n, 1, Mode::Iptables, Mode::Ebpf, f), 2)
        );
    }
    md.push('\n');
}

fn latency_table(r: &Results, md: &mut String) {
    let _ = writeln!(
        md,
        "## Connect latency, 1 client thread (µs, p50 / p99)\n\n`connect()` until it returns; in brackets the whole exchange (connect, request, response, close).\n"
    );
    let _ = writeln!(
        md,
        "| N | none | direct-to-proxy | iptables | ebpf |\n|---:|---:|---:|---:|---:|"
    );
    for n in sizes(r) {
        let mut row = format!("| {n} ");
        for m in TABLE_MODES {
            let p50 = med(r, n, 1, m, |s| s.connect_p50_us);
            let p99 = med(r, n, 1, m, |s| s.connect_p99_us);
            let t50 = med(r, n, 1, m, |s| s.txn_p50_us);
            let t99 = med(r, n, 1, m, |s| s.txn_p99_us);
            let _ = write!(
                row,
                "| {} / {} ({} / {}) ",
                num(p50, 1),
                num(p99, 1),
                num(t50, 0),
                num(t99, 0)
            );
        }
        let _ = writeln!(md, "{row}|");
    }
    md.push('\n');
}

fn bulk_table(r: &Results, md: &mut String) {
    if r.bulk.is_empty() {
        return;
    }
    let gib = r.params.bulk_bytes as f64 / (1u64 << 30) as f64;
    let _ = writeln!(
        md,
        "## Throughput of one long transfer ({gib:.2} GiB upload, N = 0)\n\n| mode | MiB/s (median of {}) | / direct-to-proxy |\n|---|---:|---:|",
        r.params.bulk_runs
    );
    let m = |mode: Mode| {
        median(
            r.bulk
                .iter()
                .filter(|b| b.mode == mode)
                .map(|b| b.bytes_per_s),
        )
    };
    // Within each run, as for conn/s.
    let vs_direct = |mode: Mode| {
        median(r.bulk.iter().filter(|b| b.mode == mode).filter_map(|b| {
            let d = r
                .bulk
                .iter()
                .find(|d| d.run == b.run && d.mode == Mode::DirectToProxy)?;
            Some(b.bytes_per_s / d.bytes_per_s)
        }))
    };
    for mode in TABLE_MODES {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            mode.name(),
            thousands(m(mode) / (1 << 20) as f64),
            num(vs_direct(mode), 3)
        );
    }
    md.push('\n');
}

fn load_table(r: &Results, md: &mut String) {
    let _ = writeln!(
        md,
        "## Loading the exclusion list\n\niptables: wall time of one `iptables-restore` of the whole nat table. ebpf: from the config file being replaced to the agent logging the generation applied (the file source watches it with inotify; the time includes reading and parsing the whole file), and the agent's own reconcile time.\n\n| N | iptables-restore (ms) | ebpf change-to-applied (ms) | ebpf reconcile (ms) |\n|---:|---:|---:|---:|"
    );
    for n in sizes(r) {
        let ipt = r
            .loads
            .iter()
            .find(|l| l.n == n && l.mode == Mode::Iptables);
        let ebpf = r.loads.iter().find(|l| l.n == n && l.mode == Mode::Ebpf);
        let _ = writeln!(
            md,
            "| {n} | {} | {} | {} |",
            ipt.map_or("–".into(), |l| num(l.wall.as_secs_f64() * 1e3, 1)),
            ebpf.map_or("–".into(), |l| num(l.wall.as_secs_f64() * 1e3, 1)),
            ebpf.and_then(|l| l.reconcile_us)
                .map_or("–".into(), |us| num(us as f64 / 1e3, 1)),
        );
    }
    if let Some((n, why)) = &r.iptables_stop {
        let _ = writeln!(
            md,
            "\niptables stops at N = {n}: {why}. Larger N are measured for ebpf only."
        );
    } else {
        let _ = writeln!(
            md,
            "\niptables-restore loaded every N measured, within the {} s limit the bench allows it.",
            r.params.iptables_limit.as_secs()
        );
    }
    md.push('\n');
}

fn prog_section(r: &Results, md: &mut String) {
    if r.prog_costs.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "## Where the eBPF time goes\n\nAverage run time of each attached program during one 1-thread sample of the ebpf mode (kernel BPF stats, `run_time_ns / run_cnt`, as `bpftool prog show` reports with kernel.bpf_stats_enabled=1; a separate pass, because the accounting itself costs time). A proxied connection is four sockets (client, proxy's accepted and upstream sockets, server), all in the attached cgroup tree.\n\n| N | program | runs per connection | ns per run | ns per connection |\n|---:|---|---:|---:|---:|"
    );
    let mut passes: Vec<(usize, bool)> = r.prog_costs.iter().map(|c| (c.n, c.pod_entry)).collect();
    passes.dedup();
    for (n, pod_entry) in passes {
        let label = if pod_entry {
            n.to_string()
        } else {
            format!("{n}, no per-pod entry")
        };
        let mut total = 0.0;
        for c in r
            .prog_costs
            .iter()
            .filter(|c| (c.n, c.pod_entry) == (n, pod_entry))
        {
            let per = c.run_cnt as f64 / c.conns.max(1) as f64;
            total += per * c.avg_ns;
            let _ = writeln!(
                md,
                "| {label} | `{}` | {} | {} | {} |",
                c.program,
                num(per, 2),
                num(c.avg_ns, 0),
                num(per * c.avg_ns, 0)
            );
        }
        let _ = writeln!(md, "| {label} | **total** | | | **{}** |", num(total, 0));
    }
    pod_counter_cost(r, md);
    md.push('\n');
}

/// Per-pod counters (#14): connect4 with the workload's `POD_STATS` entry against the same
/// N = 0 sample without it, where the program misses the hash and counts in the node array.
fn pod_counter_cost(r: &Results, md: &mut String) {
    let connect4 = |pod_entry: bool| {
        r.prog_costs
            .iter()
            .filter(|c| c.program == "redirect_connect4" && c.pod_entry == pod_entry)
            .map(|c| c.avg_ns)
            .next_back()
    };
    if let (Some(with), Some(without)) = (connect4(true), connect4(false)) {
        let _ = writeln!(
            md,
            "\nPer-pod counters (a connect counts once: in its workload's `POD_STATS` entry, or in `COUNTERS` without one), connect4 at N = 0, one pass each: {} ns with the entry, {} ns without it, difference {} ns. One pass each says nothing of the sign of a difference smaller than the spread between repeated passes of the table above.",
            num(with, 0),
            num(without, 0),
            num(with - without, 0),
        );
    }
}

pub fn markdown(r: &Results) -> String {
    let m = &r.machine;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# redirect: eBPF vs iptables redirection benchmark\n\n{}`cargo xtask bench{}` at {} (commit {}).\n",
        if r.params.quick {
            "**Quick run (checks that the bench works; the figures are not meaningful).** "
        } else {
            ""
        },
        if r.params.quick { " --quick" } else { "" },
        m.started,
        m.commit
    );
    let _ = writeln!(
        md,
        "| machine | |\n|---|---|\n| CPU | {} × {} |\n| kernel | {} |\n| iptables | {} |\n| load average at start | {} |\n",
        m.cpus, m.cpu_model, m.kernel, m.iptables, m.load_before
    );
    md.push_str(super::METHOD);
    md.push('\n');
    super::targets::targets(r, &mut md);
    for &t in &r.params.threads {
        conn_table(r, t, &mut md);
    }
    md.push_str("![connections per second against N](conn_per_s.png)\n\n");
    for &t in &r.params.threads {
        probe_table(r, t, &mut md);
    }
    cpu_table(r, &mut md);
    latency_table(r, &mut md);
    md.push_str("![connect latency against N](latency.png)\n\n");
    super::report_inbound::section(r, &mut md);
    bulk_table(r, &mut md);
    load_table(r, &mut md);
    super::report_scale::scale_section(r, &mut md);
    super::report_scale::harness_section(r, &mut md);
    prog_section(r, &mut md);
    md.push_str(super::REPRODUCE);
    md.push('\n');
    md.push_str(super::publish::GENERATED_END);
    md.push('\n');
    md
}

/// Writes REPORT.md, the CSVs and the PNGs into `dir`.
pub fn write(r: &Results, dir: &Path) -> Result<String> {
    fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    super::raw::write_all(r, dir)?;
    // A run without the outbound part (`--only`) has nothing to plot.
    if !sizes(r).is_empty() {
        plot::conn_per_s(r, &dir.join("conn_per_s.png"))?;
        plot::latency(r, &dir.join("latency.png"))?;
    }
    let md = markdown(r);
    fs::write(dir.join("REPORT.md"), &md)?;
    Ok(md)
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
