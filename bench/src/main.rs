//! redirect-bench (`cargo xtask bench`): eBPF redirection against iptables REDIRECT, side by
//! side, on the same proxy, server, client and workload, inside network namespaces the bench
//! creates (destinations in 198.18.0.0/15), outbound and inbound ([`inbound`]), and the agent at
//! node scale ([`scale`]). Writes REPORT.md, CSVs and PNGs; see [`METHOD`].
//!
//! `redirect-bench [--quick] [--out DIR] [--agent PATH]`, as root. The proxy is the tests'
//! redirect-testproxy, found next to this binary; the server and the load client are this binary
//! (`redirect-bench worker …`).
mod agent;
mod client;
mod inbound;
mod iptables;
mod lanes;
mod plot;
mod profile;
mod publish;
mod raw;
mod report;
mod report_inbound;
mod report_scale;
mod results;
mod scale;
mod server;
mod stats;
mod targets;
mod worker;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use lanes::Lane;
use results::{BulkSample, Kind, LoadSample, Machine, Mode, Params, ProgCost, Results};

#[derive(Parser)]
#[command(
    name = "redirect-bench",
    about = "Benchmark eBPF redirection against iptables REDIRECT side by side (needs root)"
)]
struct Cli {
    /// Smoke run (under 3 minutes): checks that the bench works, figures not meaningful.
    #[arg(long)]
    quick: bool,
    /// Results directory (default: target/bench/<timestamp>/; a full run without --out also
    /// refreshes docs/bench/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The redirect-agent binary (default: next to this one).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Only these parts (repeatable; default: all). A partial run never refreshes docs/bench/.
    #[arg(long, value_enum)]
    only: Vec<Part>,
    #[command(subcommand)]
    worker: Option<Worker>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Outbound conn/s, probes, the long transfer, loads and the per-program cost.
    Outbound,
    /// Inbound conn/s.
    Inbound,
    /// The agent at scale (real agent and harness).
    Scale,
}

#[derive(Subcommand)]
enum Worker {
    /// (internal) A process of the benchmark: server or load client.
    #[command(hide = true)]
    Worker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Worker::Worker { args }) = cli.worker {
        return worker::main(args);
    }
    let here = std::env::current_exe().context("locating the redirect-bench binary")?;
    let dir = here.parent().context("redirect-bench has a directory")?;
    let bins = Bins {
        agent: cli.agent.unwrap_or_else(|| dir.join("redirect-agent")),
        proxy: dir.join("redirect-testproxy"),
        worker: here.clone(),
    };
    for b in [&bins.agent, &bins.proxy] {
        if !b.is_file() {
            bail!(
                "{} is missing: build redirect-agent and redirect-tests first (cargo xtask bench does)",
                b.display()
            );
        }
    }
    bench(cli.quick, cli.out, &bins, &cli.only)
}

fn step(msg: &str) {
    eprintln!("\x1b[1m==> {msg}\x1b[0m");
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench lives in the workspace")
        .to_path_buf()
}

/// The proxy's uid, exempted by uid in both the iptables rules and the agent's policy.
pub const PROXY_UID: u32 = 1337;

pub const METHOD: &str = "\
## Method

Everything runs inside network namespaces and cgroups the bench creates (one per mode, so no \
mode's kernel state leaks into another's); outbound destinations are 198.18.0.10:80 on the \
namespace's `lo` (inbound: see its section).

- **Proxy**: one program for every mode, the tests' `redirect-testproxy --mode forward`: accepts \
  on 127.0.0.1:15001, reads the original destination with `getsockopt(SO_ORIGINAL_DST)` exactly \
  as Envoy does under iptables, connects there and splices both directions (splice(2) through a \
  pipe), one thread per direction of each connection. It runs as uid 1337 in the pod's proxy \
  cgroup.
- **Server**: answers a 64-byte request with 64 bytes and closes first (HTTP/1.0 style); for the \
  long transfer it counts an upload until EOF.
- **Client**: blocking sockets, one OS thread per client thread; each connection is opened, used \
  (one request/response) and closed. It runs as its own process in the pod's app cgroup.
- **Interception only** (probes): the same modes with the proxy in close mode \
  (`redirect-testproxy --mode close`: accept, read the original destination, close) and the \
  client connecting and closing with a reset (SO_LINGER 0), as a connect-rate probe does, so \
  that the interception layer is a large share of each connection. Measured right after the \
  proxied samples of each N, with the same runs and threads.
- **Modes**: `none` (client → server, no proxy: reference); `direct-to-proxy` (client → \
  127.0.0.1:15001, no interception: the physical limit; the proxy forwards to the server because \
  there is no original destination to read); `iptables` (nat OUTPUT, istio-iptables' layout: \
  `-p tcp -j ISTIO_OUTPUT`, uid and gid 1337 RETURN, 127.0.0.1 RETURN, one `-d CIDR -j RETURN` per \
  exclusion, then REDIRECT --to-ports 15001; Istio's `-o lo` rules are left out because every \
  destination here is on `lo`); `ebpf` (`redirect-agent run` in standalone mode with the same \
  policy: mesh exclusion list, proxy uid 1337 and proxy cgroup).
- **Exclusions**: N disjoint CIDRs in 10.0.0.0/8 (/25 to /32), none covering the destination, so \
  iptables walks the whole list on every new connection.
- **Noise**: every run measures all modes back to back in rotating order (A B C D, B C D A, …); \
  tables show medians over runs, and ratios are taken within each run before the median.
- **2 client threads** share the machine's cores with the proxy's and the server's threads: on a \
  2-core machine that measures a saturated machine, not parallel scaling.
- The bench's own processes are release builds; the machine is whatever ran it (see above), \
  including whatever else it was running: compare ratios, not absolute figures.
";

pub const REPRODUCE: &str = "\
## Reproduce

As root on a Debian machine with rustup, from a clone of the repository:

```sh
cargo xtask bench            # full run (about 20 min on 2 cores); also refreshes docs/bench/
cargo xtask bench --quick    # smoke run on the debug build (< 3 min), figures not meaningful
cargo xtask bench --out DIR  # results into DIR instead of target/bench/<timestamp>/
```

It installs what is missing (iptables, bpftool, the eBPF toolchain), builds the agent and the \
bench processes in release mode, and removes every namespace, cgroup and pin it created, also on \
Ctrl-C. Raw samples: `conn.csv` (one row per kind × mode × N × run × client threads), `bulk.csv`, \
`loads.csv`, `scale.csv`, `harness.csv`, `progs.csv`.
";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// The binaries the bench runs.
pub struct Bins {
    pub agent: PathBuf,
    /// redirect-testproxy, in forward (or close) mode.
    pub proxy: PathBuf,
    /// This binary, for `worker server|client`.
    pub worker: PathBuf,
}

fn bench(quick: bool, out: Option<PathBuf>, bins: &Bins, only: &[Part]) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "redirect-bench needs root (it loads eBPF programs and creates cgroups and network namespaces)"
        );
    }
    // Ctrl-C reaches the whole process group: the bench processes die, this one notices the
    // flag (or a failed sample), unwinds, and the fixtures' Drop removes everything.
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))?;
    let started = Instant::now();
    let params = Params::new(quick);
    // Under target/ by default, which git already ignores.
    let dir = out.unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("bench")
            .join(utc_stamp(false))
    });
    let results = measure(bins, params, only);
    let results = match results {
        Ok(r) => r,
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
            bail!("interrupted; everything the bench created has been removed")
        }
        Err(e) => {
            eprintln!("bench stopped: {e:#}\n(everything it created has been removed)");
            return Err(e);
        }
    };
    let md = report::write(&results, &dir)?;
    println!("{md}");
    step(&format!(
        "results in {} ({:.0} s)",
        dir.display(),
        started.elapsed().as_secs_f64()
    ));
    if !quick && only.is_empty() && !dir.starts_with(workspace_root().join("docs")) {
        let docs = workspace_root().join("docs/bench");
        publish::publish(&dir, &docs)?;
        step(&format!("copied to {}", docs.display()));
    }
    Ok(())
}

fn measure(bins: &Bins, params: Params, only: &[Part]) -> Result<Results> {
    let want = |p: Part| only.is_empty() || only.contains(&p);
    let mut r = Results {
        machine: machine(),
        params,
        conn: vec![],
        bulk: vec![],
        loads: vec![],
        iptables_stop: None,
        prog_costs: vec![],
        scale: None,
        harness: None,
    };
    if want(Part::Outbound) {
        outbound(bins, &mut r)?;
    }
    if want(Part::Inbound) {
        inbound::measure(bins, &mut r)?;
    }
    if want(Part::Scale) {
        scale_part(bins, &mut r)?;
    }
    Ok(r)
}

/// Outbound: every mode's lane, the long transfer, conn/s and probes at every N, the
/// per-program cost.
fn outbound(bins: &Bins, r: &mut Results) -> Result<()> {
    let p = r.params.clone();
    step("starting one namespace per mode: server, proxy, iptables rules, agent");
    let mut lanes = Mode::ALL
        .iter()
        .map(|&m| Lane::new(m, bins))
        .collect::<Result<Vec<_>>>()?;
    configure(&mut lanes, r, 0)?;

    step(&format!(
        "long transfer: {} MiB upload per mode, {} run(s)",
        p.bulk_bytes >> 20,
        p.bulk_runs
    ));
    for run in 0..p.bulk_runs {
        for lane in rotated(&lanes, run) {
            check_interrupt()?;
            let bps = lane.bulk(p.bulk_bytes)?;
            eprintln!(
                "    run {run}: {:<16} {:>8.0} MiB/s",
                lane.mode.name(),
                bps / (1 << 20) as f64
            );
            r.bulk.push(BulkSample {
                run,
                mode: lane.mode,
                bytes_per_s: bps,
            });
        }
    }

    for &n in &p.sizes {
        if n > 0 {
            configure(&mut lanes, r, n)?;
        }
        step(&format!(
            "N = {n}: {} run(s) × {:?} client threads × {} s per mode",
            p.runs,
            p.threads,
            p.duration.as_secs_f64()
        ));
        for kind in Kind::ALL {
            for lane in lanes.iter_mut() {
                lane.set_kind(kind)?;
            }
            let active: Vec<&Lane> = lanes
                .iter()
                .filter(|l| l.mode != Mode::Iptables || r.iptables_stop.is_none())
                .collect();
            sample_kind(&active, r, n, kind, p.runs)?;
        }
    }

    profile_pass(&mut lanes, r)?;
    Ok(())
}

/// The agent at scale: the real agent, then the harness.
fn scale_part(bins: &Bins, r: &mut Results) -> Result<()> {
    let p = r.params.clone();

    step(&format!(
        "agent at scale: {} workloads × {} CIDRs, {} edits",
        p.scale_workloads, p.scale_cidrs, p.scale_edits
    ));
    r.scale = Some(scale::run(
        bins,
        p.scale_workloads,
        p.scale_cidrs,
        p.scale_edits,
    )?);
    let h = &p.harness;
    step(&format!(
        "agent at scale, the harness: {} workloads sharing {} mesh CIDRs + {} with {} of their own, {} rule entries",
        h.shared_workloads, h.mesh_cidrs, h.own_workloads, h.own_extra_cidrs, h.max_rule_entries
    ));
    let h = scale::harness(bins, h)?;
    eprintln!(
        "    registered {} of {} ({} on a fallback), {} v4 entries, first reconcile {:.1} ms, edit p99 {:.2} ms, mesh edit {:.1} ms",
        h.registered,
        h.workloads,
        h.on_fallback,
        h.v4_entries,
        h.first_reconcile_us as f64 / 1e3,
        h.edit_p99_us as f64 / 1e3,
        h.mesh_edit_us as f64 / 1e3
    );
    r.harness = Some(h);
    Ok(())
}

/// `runs` runs of every lane × client thread count at N = `n`, the lanes in rotating order.
fn sample_kind(lanes: &[&Lane], r: &mut Results, n: usize, kind: Kind, runs: usize) -> Result<()> {
    let p = r.params.clone();
    for run in 0..runs {
        let mut line = format!("    {} run {run}:", kind.name());
        let k = lanes.len();
        for i in 0..k {
            let lane = lanes[(i + run) % k];
            for &t in &p.threads {
                check_interrupt()?;
                let before = lane.probe_counters();
                let s = lane.sample(n, run, t, p.warmup, p.duration)?;
                if kind.probe() && run == 0 {
                    lane.check_probes(before)?;
                }
                line.push_str(&format!(
                    " {}/{t}t {:.0}",
                    lane.mode.label(kind),
                    s.conns_per_s
                ));
                r.conn.push(s);
            }
        }
        eprintln!("{line}");
    }
    Ok(())
}

/// Lanes in this run's rotated order (A B C D, B C D A, …).
fn rotated(lanes: &[Lane], run: usize) -> impl Iterator<Item = &Lane> {
    let k = lanes.len();
    (0..k).map(move |i| &lanes[(i + run) % k])
}

/// Loads N exclusions into the iptables and ebpf lanes, then checks every lane's path.
fn configure(lanes: &mut [Lane], r: &mut Results, n: usize) -> Result<()> {
    let list = iptables::exclusions(n);
    for lane in lanes.iter_mut() {
        check_interrupt()?;
        if lane.mode == Mode::Iptables && r.iptables_stop.is_some() {
            continue;
        }
        let limit = if lane.mode == Mode::Iptables {
            r.params.iptables_limit
        } else {
            Duration::from_secs(120)
        };
        match lane.configure(&list, limit) {
            Ok(Some((wall, reconcile_us))) => {
                eprintln!(
                    "    {:<9} N = {n}: loaded in {:.1} ms{}",
                    lane.mode.name(),
                    wall.as_secs_f64() * 1e3,
                    reconcile_us.map_or(String::new(), |us| format!(
                        " (agent reconcile {:.1} ms)",
                        us as f64 / 1e3
                    ))
                );
                r.loads.push(LoadSample {
                    n,
                    mode: lane.mode,
                    wall,
                    reconcile_us,
                });
            }
            Ok(None) => {}
            Err(e) if lane.mode == Mode::Iptables => {
                eprintln!("    iptables stops at N = {n}: {e:#}");
                r.iptables_stop = Some((n, format!("{e:#}")));
                continue;
            }
            Err(e) => return Err(e),
        }
        // The check is one exchange through the forwarding proxy.
        lane.set_kind(Kind::Proxied)?;
        lane.verify()?;
    }
    Ok(())
}

/// Per-program eBPF cost at the largest and the smallest N, with kernel BPF stats on only for
/// this pass (the accounting itself costs time, so the main samples run without it).
fn profile_pass(lanes: &mut [Lane], r: &mut Results) -> Result<()> {
    let Some(lane) = lanes.iter_mut().find(|l| l.mode == Mode::Ebpf) else {
        return Ok(());
    };
    let (Some(&first), Some(&last)) = (r.params.sizes.first(), r.params.sizes.last()) else {
        return Ok(());
    };
    step("eBPF per-program cost (kernel BPF stats)");
    lane.set_kind(Kind::Proxied)?;
    let stats = profile::enable_stats()?;
    // Last: N = 0 again without the workload's per-pod counters entry (#14: their cost).
    for (n, pod_entry) in [(last, true), (first, true), (first, false)] {
        check_interrupt()?;
        if n != last {
            lane.configure(&iptables::exclusions(n), Duration::from_secs(120))?;
        }
        if !pod_entry {
            profile::drop_pod_entry(lane.fx.pin_dir(), lane.pod())?;
        }
        let before = profile::snapshot(lane.fx.pin_dir())?;
        // No warm-up: the kernel counts every connection of the client process.
        let sample = lane.sample(n, 0, 1, Duration::ZERO, r.params.duration)?;
        let after = profile::snapshot(lane.fx.pin_dir())?;
        let conns = (sample.conns_per_s * r.params.duration.as_secs_f64()).round() as u64;
        let mut per_conn = 0.0;
        for (program, (cnt, ns)) in after {
            let (c0, n0) = before.get(&program).copied().unwrap_or((0, 0));
            let run_cnt = cnt.saturating_sub(c0);
            if run_cnt == 0 {
                continue;
            }
            let total = ns.saturating_sub(n0) as f64;
            per_conn += total / conns.max(1) as f64;
            let avg_ns = total / run_cnt as f64;
            let pod = if pod_entry { "" } else { " (no pod entry)" };
            eprintln!("    N = {n}{pod}: {program:<22} {run_cnt:>8} runs {avg_ns:>6.0} ns/run");
            r.prog_costs.push(ProgCost {
                n,
                program,
                run_cnt,
                avg_ns,
                conns,
                pod_entry,
            });
        }
        eprintln!("    N = {n}: {per_conn:.0} ns of eBPF per connection ({conns} connections)");
    }
    drop(stats);
    Ok(())
}

fn machine() -> Machine {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let dirty = !git(&["status", "--porcelain"]).is_empty();
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|x| x.1.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into()),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        iptables: iptables::version(),
        commit: format!(
            "{}{}",
            git(&["rev-parse", "--short", "HEAD"]),
            if dirty { " + uncommitted changes" } else { "" }
        ),
        started: utc_stamp(true),
        load_before: read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Now in UTC: "2025-11-23 03:55:00 UTC" (`pretty`) or "20251123T035500Z" (a directory name).
fn utc_stamp(pretty: bool) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (hh, mm, ss) = (rem / 3600, rem / 60 % 60, rem % 60);
    if pretty {
        format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02} UTC")
    } else {
        format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
    }
}
