//! The raw samples as CSV, one file per kind of measurement.
use std::{fmt::Write as _, fs, path::Path};

use anyhow::Result;

use super::results::Results;

/// Writes every raw sample: conn.csv, bulk.csv, loads.csv, scale.csv, progs.csv.
pub fn write(r: &Results, dir: &Path) -> Result<()> {
    let mut conn = String::from(
        "n,run,mode,threads,conns_per_s,connect_p50_us,connect_p99_us,txn_p50_us,txn_p99_us,cpu_us_per_conn,errors\n",
    );
    for s in &r.conn {
        let _ = writeln!(
            conn,
            "{},{},{},{},{:.1},{:.2},{:.2},{:.2},{:.2},{:.2},{}",
            s.n,
            s.run,
            s.mode.name(),
            s.threads,
            s.conns_per_s,
            s.connect_p50_us,
            s.connect_p99_us,
            s.txn_p50_us,
            s.txn_p99_us,
            s.cpu_us_per_conn,
            s.errors
        );
    }
    fs::write(dir.join("conn.csv"), conn)?;
    let mut bulk = String::from("run,mode,bytes,bytes_per_s\n");
    for b in &r.bulk {
        let _ = writeln!(
            bulk,
            "{},{},{},{:.0}",
            b.run,
            b.mode.name(),
            r.params.bulk_bytes,
            b.bytes_per_s
        );
    }
    fs::write(dir.join("bulk.csv"), bulk)?;
    let mut loads = String::from("n,mode,wall_ms,reconcile_us\n");
    for l in &r.loads {
        let _ = writeln!(
            loads,
            "{},{},{:.3},{}",
            l.n,
            l.mode.name(),
            l.wall.as_secs_f64() * 1e3,
            l.reconcile_us.map_or(String::new(), |u| u.to_string())
        );
    }
    fs::write(dir.join("loads.csv"), loads)?;
    if let Some(s) = &r.scale {
        let mut out = String::from("workloads,cidrs,kind,latency_ms,reconcile_us\n");
        let mut row = |kind: &str, lat: f64, us: u64| {
            let _ = writeln!(
                out,
                "{},{},{kind},{lat:.3},{us}",
                s.workloads, s.cidrs_per_workload
            );
        };
        row("initial", f64::NAN, s.initial_us);
        for (l, us) in &s.edits {
            row("edit-one", l.as_secs_f64() * 1e3, *us);
        }
        if let Some((l, us)) = s.mesh_edit {
            row("edit-mesh", l.as_secs_f64() * 1e3, us);
        }
        let _ = writeln!(
            out,
            "# rss_kib={} hwm_kib={} rss_after_kib={} hwm_after_kib={}",
            s.rss_kib, s.hwm_kib, s.rss_after_kib, s.hwm_after_kib
        );
        fs::write(dir.join("scale.csv"), out)?;
    }
    if !r.prog_costs.is_empty() {
        let mut out = String::from("n,program,run_cnt,avg_ns,conns\n");
        for c in &r.prog_costs {
            let _ = writeln!(
                out,
                "{},{},{},{:.1},{}",
                c.n, c.program, c.run_cnt, c.avg_ns, c.conns
            );
        }
        fs::write(dir.join("progs.csv"), out)?;
    }
    Ok(())
}
