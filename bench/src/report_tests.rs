//! The report's arithmetic and files, on made-up samples.
use std::time::Duration;

use super::*;
use crate::results::{BulkSample, Harness, LoadSample, Machine, Params, ProgCost, Scale};

fn fake() -> Results {
    let mut conn = vec![];
    for (kind, n) in [Kind::Proxied, Kind::Probe]
        .into_iter()
        .flat_map(|k| [0, 10, 10_000, 100_000].map(|n| (k, n)))
    {
        for run in 0..3 {
            for threads in [1, 2] {
                for (mode, base) in [
                    (Mode::None, 9000.0),
                    (Mode::DirectToProxy, 4000.0),
                    (Mode::Iptables, 4000.0 / (1.0 + n as f64 / 1000.0)),
                    (Mode::Ebpf, 3950.0),
                ] {
                    if mode == Mode::Iptables && n == 100_000 {
                        continue;
                    }
                    let probe = if kind == Kind::Probe { 3.0 } else { 1.0 };
                    let x = probe * base * threads as f64 * (1.0 + run as f64 / 100.0);
                    conn.push(ConnSample {
                        n,
                        run,
                        kind,
                        mode,
                        threads,
                        conns_per_s: x,
                        connect_p50_us: 1e6 / x,
                        connect_p99_us: 3e6 / x,
                        txn_p50_us: 2e6 / x,
                        txn_p99_us: 5e6 / x,
                        cpu_us_per_conn: 2e6 / x,
                        errors: 0,
                    });
                }
            }
        }
    }
    // Inbound probes: ebpf at 0.98 × direct-proxy, iptables slowing down with N.
    for n in [0, 1000] {
        for run in 0..3 {
            for (mode, base) in [
                (Mode::None, 9000.0),
                (Mode::DirectToProxy, 8000.0),
                (Mode::Iptables, 8000.0 / (1.0 + n as f64 / 1000.0)),
                (Mode::Ebpf, 7840.0),
            ] {
                conn.push(ConnSample {
                    n,
                    run,
                    kind: Kind::InboundProbe,
                    mode,
                    threads: 1,
                    conns_per_s: base * (1.0 + run as f64 / 100.0),
                    connect_p50_us: f64::NAN,
                    connect_p99_us: f64::NAN,
                    txn_p50_us: f64::NAN,
                    txn_p99_us: f64::NAN,
                    cpu_us_per_conn: f64::NAN,
                    errors: 0,
                });
            }
        }
    }
    Results {
        params: Params::new(false),
        machine: Machine::default(),
        conn,
        bulk: vec![BulkSample {
            run: 0,
            mode: Mode::Ebpf,
            bytes_per_s: 1e9,
        }],
        loads: vec![LoadSample {
            n: 10,
            mode: Mode::Iptables,
            wall: Duration::from_millis(20),
            reconcile_us: None,
        }],
        iptables_stop: Some((100_000, "too slow".into())),
        prog_costs: vec![
            ProgCost {
                n: 0,
                program: "redirect_connect4".into(),
                run_cnt: 200,
                avg_ns: 1000.0,
                conns: 100,
                pod_entry: true,
            },
            ProgCost {
                n: 0,
                program: "redirect_connect4".into(),
                run_cnt: 200,
                avg_ns: 960.0,
                conns: 100,
                pod_entry: false,
            },
        ],
        scale: Some(Scale {
            workloads: 1000,
            cidrs_per_workload: 100,
            initial_us: 300_000,
            edits: vec![(Duration::from_millis(150), 80_000)],
            ..Scale::default()
        }),
        harness: Some(Harness {
            config: Default::default(),
            workloads: 1050,
            registered: 1050,
            on_fallback: 41,
            v4_entries: 1_000_101,
            policy_sets: 11,
            first_reconcile_us: 1_500_000,
            edit_p99_us: 4_000,
            ..Harness::default()
        }),
    }
}

#[test]
fn ratios_are_taken_within_runs() {
    let r = fake();
    let x = ratio(&r, 0, 1, Mode::Ebpf, Mode::DirectToProxy);
    assert!((x - 3950.0 / 4000.0).abs() < 1e-9, "{x}");
    assert!(ratio(&r, 100_000, 1, Mode::Ebpf, Mode::Iptables).is_nan());
}

#[test]
fn writes_report_csv_and_plots() {
    let r = fake();
    let dir = std::env::temp_dir().join(format!("redirect-bench-report-{}", std::process::id()));
    let md = write(&r, &dir).unwrap();
    // Medians over runs 0..3 (× 1.00, 1.01, 1.02): run 1.
    assert!(md.contains("| 10000 | 9\u{202f}090 |"), "{md}");
    assert!(
        md.contains("ebpf ≥ 10 × iptables at N = 10000 (1 thr.) | 10.86 × | met"),
        "{md}"
    );
    assert!(md.contains("| 0 | **total** | | | **2000** |"), "{md}");
    assert!(
        md.contains("| 0, no per-pod entry | **total** | | | **1920** |"),
        "{md}"
    );
    assert!(
        md.contains("one pass each: 1000 ns with the entry, 960 ns without it, difference 40 ns."),
        "{md}"
    );
    // Probes: 3 × the proxied rates, ratios within runs as before.
    assert!(
        md.contains("| 10000 | 27\u{202f}270 | 12\u{202f}120 | 1\u{202f}102 | ")
            && md.contains(" | 10.86 | 11.00 |"),
        "{md}"
    );
    assert!(
        md.contains("interception only: ebpf ≥ 0.97 × direct-to-proxy probes/s at every N (1 client thread) | lowest 0.98"),
        "{md}"
    );
    assert!(
        md.contains("iptables stops at N = 100000: too slow"),
        "{md}"
    );
    // Inbound: its own table and target, and the outbound tables keep their own N.
    assert!(
        md.contains("| 1000 | 9\u{202f}090 | 8\u{202f}080 | 4\u{202f}040 | 7\u{202f}918 | 0.980 | 1.96 | 2.00 |"),
        "{md}"
    );
    assert!(
        md.contains("ebpf ≥ 0.97 × direct-proxy conn/s at every N excluded ports (1 thr.) | lowest 0.980 (N = 0); at N = 1000 ebpf / iptables 1.96 (limit direct-proxy / iptables 2.00) | met |"),
        "{md}"
    );
    assert!(!md.contains("| 1000 | – |"), "{md}");
    // Issue #13's node, from a (made-up) run where 41 workloads ran a fallback.
    assert!(
        md.contains("every workload registered with its own policy | 1050 registered, 41 on a fallback | **missed** |"),
        "{md}"
    );
    assert!(md.contains("gets only an overlay (its 10 extras)"), "{md}");
    assert!(md.contains("reconcile p99 < 5 ms | 4.00 ms"), "{md}");
    for f in [
        "REPORT.md",
        "conn.csv",
        "bulk.csv",
        "loads.csv",
        "scale.csv",
        "harness.csv",
        "progs.csv",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    for f in ["conn_per_s.png", "latency.png"] {
        assert!(fs::metadata(dir.join(f)).unwrap().len() > 10_000, "{f}");
    }
    let conn = fs::read_to_string(dir.join("conn.csv")).unwrap();
    assert_eq!(conn.lines().count(), 1 + r.conn.len());
    if std::env::var_os("KEEP_BENCH_REPORT").is_none() {
        fs::remove_dir_all(&dir).unwrap();
    }
}
