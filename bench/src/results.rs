//! What a benchmark run measured: raw samples, kept as they came, and the machine they came from.
use std::time::Duration;

use redirect_agent::reconcile::scale::ScaleConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// The client connects straight to the destination: no proxy at all (reference).
    None,
    /// The client connects straight to the proxy: no interception (the physical limit).
    DirectToProxy,
    /// iptables REDIRECT in the nat OUTPUT chain, istio-iptables' layout.
    Iptables,
    /// redirect-agent's cgroup programs.
    Ebpf,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::DirectToProxy, Mode::Iptables, Mode::Ebpf, Mode::None];

    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::DirectToProxy => "direct-to-proxy",
            Mode::Iptables => "iptables",
            Mode::Ebpf => "ebpf",
        }
    }

    /// The name in the report and the CSV: inbound, no proxy means the app answers
    /// (`direct-app`), and the client connecting to the proxy's port is `direct-proxy`.
    pub fn label(self, kind: Kind) -> &'static str {
        match (kind.inbound(), self) {
            (true, Mode::None) => "direct-app",
            (true, Mode::DirectToProxy) => "direct-proxy",
            _ => self.name(),
        }
    }
}

/// What each connection of a sample does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// One request and response through the proxy to the server, all closed.
    Proxied,
    /// Interception only: the client connects and closes with a reset, and the proxy accepts,
    /// reads the original destination and closes (a connect-rate probe). The interception layer
    /// is then a large share of each connection.
    Probe,
    /// Inbound, interception only: a client on another node connects to the pod's app port and
    /// resets; the proxy's inbound listener accepts, reads the original destination, closes.
    InboundProbe,
    /// Inbound, through the proxy: one request and response, the proxy forwarding to the app.
    InboundProxied,
}

impl Kind {
    /// The outbound kinds (the outbound lanes measure these).
    pub const ALL: [Kind; 2] = [Kind::Proxied, Kind::Probe];
    pub const INBOUND: [Kind; 2] = [Kind::InboundProbe, Kind::InboundProxied];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Proxied => "proxied",
            Kind::Probe => "probe",
            Kind::InboundProbe => "inbound-probe",
            Kind::InboundProxied => "inbound-proxied",
        }
    }

    pub fn inbound(self) -> bool {
        matches!(self, Kind::InboundProbe | Kind::InboundProxied)
    }

    /// Connect and reset, the proxy closing at once (rather than an exchange it forwards).
    pub fn probe(self) -> bool {
        matches!(self, Kind::Probe | Kind::InboundProbe)
    }
}

/// One client run of `seconds` against one lane.
#[derive(Clone, Debug)]
pub struct ConnSample {
    pub n: usize,
    pub run: usize,
    pub kind: Kind,
    pub mode: Mode,
    pub threads: usize,
    pub conns_per_s: f64,
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
    pub txn_p50_us: f64,
    pub txn_p99_us: f64,
    /// CPU time of all the mode's processes (client, proxy, server) per connection.
    pub cpu_us_per_conn: f64,
    pub errors: u64,
}

#[derive(Clone, Debug)]
pub struct BulkSample {
    pub run: usize,
    pub mode: Mode,
    pub bytes_per_s: f64,
}

/// Loading N exclusions into a mode: iptables-restore's wall time, or the agent's
/// change-to-applied latency and its own reconcile time.
#[derive(Clone, Debug)]
pub struct LoadSample {
    pub n: usize,
    pub mode: Mode,
    pub wall: Duration,
    pub reconcile_us: Option<u64>,
}

/// Average cost of each eBPF program per invocation, from kernel.bpf_stats_enabled.
#[derive(Clone, Debug)]
pub struct ProgCost {
    pub n: usize,
    pub program: String,
    pub run_cnt: u64,
    pub avg_ns: f64,
    /// Connections the client completed during the profiled sample.
    pub conns: u64,
    /// Whether the workload had its `POD_STATS` entry (per-pod counters): the pass measures
    /// N = 0 once more after deleting it, for the cost of counting per pod.
    pub pod_entry: bool,
}

/// The agent at scale: many workloads with many CIDRs each.
#[derive(Clone, Debug, Default)]
pub struct Scale {
    pub workloads: usize,
    pub cidrs_per_workload: usize,
    /// Reconcile time of the first generation (empty maps → everything).
    pub initial_us: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// Change-to-applied latency and reconcile time of single-workload edits.
    pub edits: Vec<(Duration, u64)>,
    /// The same for one mesh-wide edit that changes every workload's policy.
    pub mesh_edit: Option<(Duration, u64)>,
    pub rss_after_kib: u64,
    pub hwm_after_kib: u64,
}

/// The agent's node-scale harness (`redirect_agent::reconcile::scale`, issue #13's scenario)
/// against in-memory maps of the kernel maps' capacity: `shared` workloads with no policy of their
/// own sharing a `mesh_cidrs` exclusion list, plus `own` workloads with `extra` CIDRs of their own.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct Harness {
    #[serde(skip)]
    pub config: ScaleConfig,
    pub workloads: usize,
    pub registered: usize,
    pub on_fallback: usize,
    pub v4_entries: usize,
    pub policy_sets: usize,
    pub first_reconcile_us: u64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
    pub edit_p50_us: u64,
    pub edit_p99_us: u64,
    /// Workloads recomputed by an edit pass, at most (the others reused their last result).
    #[serde(default)]
    pub edit_recomputed: usize,
    pub unchanged_pass_us: u64,
    pub mesh_edit_us: u64,
    pub mesh_edit_on_fallback: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub iptables: String,
    pub commit: String,
    pub started: String,
    pub load_before: String,
}

#[derive(Clone, Debug)]
pub struct Params {
    pub quick: bool,
    pub sizes: Vec<usize>,
    pub runs: usize,
    pub threads: Vec<usize>,
    pub warmup: Duration,
    pub duration: Duration,
    pub bulk_bytes: u64,
    pub bulk_runs: usize,
    pub iptables_limit: Duration,
    /// Inbound: excluded inbound ports, and runs per N.
    pub inbound_sizes: Vec<usize>,
    pub inbound_runs: usize,
    pub scale_workloads: usize,
    pub scale_cidrs: usize,
    pub scale_edits: usize,
    /// The agent's node-scale harness (issue #13's scenario by default).
    pub harness: ScaleConfig,
}

impl Params {
    pub fn new(quick: bool) -> Params {
        if quick {
            Params {
                quick,
                // The largest N, so that CI exercises the heaviest configs of both modes.
                sizes: vec![0, 100_000],
                runs: 1,
                threads: vec![1, 2],
                warmup: Duration::from_millis(50),
                duration: Duration::from_millis(300),
                bulk_bytes: 64 << 20,
                bulk_runs: 1,
                iptables_limit: Duration::from_secs(30),
                inbound_sizes: vec![0, 1_000],
                inbound_runs: 1,
                scale_workloads: 1_000,
                scale_cidrs: 100,
                scale_edits: 5,
                // A fiftieth of the mesh list and of the tries: the same fit, in seconds.
                harness: ScaleConfig {
                    mesh_cidrs: 2_000,
                    edits: 10,
                    max_rule_entries: ScaleConfig::default().max_rule_entries / 50,
                    ..ScaleConfig::default()
                },
            }
        } else {
            Params {
                quick,
                sizes: vec![0, 10, 100, 1_000, 10_000, 100_000],
                // Many short runs rather than a few long ones: other load on the machine comes
                // and goes over seconds, so short samples taken back to back pair better, and
                // more pairs make the ratios' medians steadier for the same total time.
                runs: 24,
                threads: vec![1, 2],
                warmup: Duration::from_millis(50),
                duration: Duration::from_millis(500),
                bulk_bytes: 4 << 30,
                bulk_runs: 3,
                iptables_limit: Duration::from_secs(120),
                inbound_sizes: vec![0, 10, 100, 1_000],
                inbound_runs: 10,
                scale_workloads: 1_000,
                scale_cidrs: 100,
                scale_edits: 30,
                harness: ScaleConfig::default(),
            }
        }
    }
}

#[derive(Debug)]
pub struct Results {
    pub params: Params,
    pub machine: Machine,
    pub conn: Vec<ConnSample>,
    pub bulk: Vec<BulkSample>,
    pub loads: Vec<LoadSample>,
    /// The first N iptables could not be loaded for, and why.
    pub iptables_stop: Option<(usize, String)>,
    pub prog_costs: Vec<ProgCost>,
    pub scale: Option<Scale>,
    pub harness: Option<Harness>,
}
