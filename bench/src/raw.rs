//! The raw samples as CSV (the `csv` crate), one file per kind of measurement.
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::results::Results;

#[derive(Serialize)]
struct ConnRow {
    n: usize,
    run: usize,
    kind: &'static str,
    mode: &'static str,
    threads: usize,
    conns_per_s: f64,
    connect_p50_us: f64,
    connect_p99_us: f64,
    txn_p50_us: f64,
    txn_p99_us: f64,
    cpu_us_per_conn: f64,
    errors: u64,
}

#[derive(Serialize)]
struct BulkRow {
    run: usize,
    mode: &'static str,
    bytes: u64,
    bytes_per_s: f64,
}

#[derive(Serialize)]
struct LoadRow {
    n: usize,
    mode: &'static str,
    wall_ms: f64,
    reconcile_us: Option<u64>,
}

#[derive(Serialize)]
struct ScaleRow {
    workloads: usize,
    cidrs: usize,
    kind: &'static str,
    latency_ms: Option<f64>,
    reconcile_us: u64,
    rss_kib: u64,
    hwm_kib: u64,
}

#[derive(Serialize)]
struct HarnessRow {
    shared_workloads: usize,
    mesh_cidrs: usize,
    own_workloads: usize,
    own_extra_cidrs: usize,
    max_rule_entries: usize,
    edits: usize,
    workloads: usize,
    registered: usize,
    on_fallback: usize,
    v4_entries: usize,
    policy_sets: usize,
    first_reconcile_us: u64,
    rss_kib: u64,
    peak_rss_kib: u64,
    edit_p50_us: u64,
    edit_p99_us: u64,
    edit_recomputed: usize,
    unchanged_pass_us: u64,
    mesh_edit_us: u64,
    mesh_edit_on_fallback: usize,
}

#[derive(Serialize)]
struct ProgRow<'a> {
    n: usize,
    program: &'a str,
    run_cnt: u64,
    avg_ns: f64,
    conns: u64,
    pod_entry: bool,
}

fn write<T: Serialize>(path: &Path, rows: impl IntoIterator<Item = T>) -> Result<()> {
    let mut w = csv::Writer::from_path(path).with_context(|| format!("{}", path.display()))?;
    for row in rows {
        w.serialize(row)?;
    }
    w.flush()?;
    Ok(())
}

/// Writes every raw sample: conn.csv, bulk.csv, loads.csv, scale.csv, harness.csv, progs.csv.
pub fn write_all(r: &Results, dir: &Path) -> Result<()> {
    write(
        &dir.join("conn.csv"),
        r.conn.iter().map(|s| ConnRow {
            n: s.n,
            run: s.run,
            kind: s.kind.name(),
            mode: s.mode.label(s.kind),
            threads: s.threads,
            conns_per_s: s.conns_per_s,
            connect_p50_us: s.connect_p50_us,
            connect_p99_us: s.connect_p99_us,
            txn_p50_us: s.txn_p50_us,
            txn_p99_us: s.txn_p99_us,
            cpu_us_per_conn: s.cpu_us_per_conn,
            errors: s.errors,
        }),
    )?;
    write(
        &dir.join("bulk.csv"),
        r.bulk.iter().map(|b| BulkRow {
            run: b.run,
            mode: b.mode.name(),
            bytes: r.params.bulk_bytes,
            bytes_per_s: b.bytes_per_s,
        }),
    )?;
    write(
        &dir.join("loads.csv"),
        r.loads.iter().map(|l| LoadRow {
            n: l.n,
            mode: l.mode.name(),
            wall_ms: l.wall.as_secs_f64() * 1e3,
            reconcile_us: l.reconcile_us,
        }),
    )?;
    if let Some(s) = &r.scale {
        // Memory is sampled after the first reconcile and at the end.
        let row = |kind, latency_ms, reconcile_us, (rss_kib, hwm_kib)| ScaleRow {
            workloads: s.workloads,
            cidrs: s.cidrs_per_workload,
            kind,
            latency_ms,
            reconcile_us,
            rss_kib,
            hwm_kib,
        };
        let after = (s.rss_after_kib, s.hwm_after_kib);
        let rows = std::iter::once(row("initial", None, s.initial_us, (s.rss_kib, s.hwm_kib)))
            .chain(
                s.edits
                    .iter()
                    .map(|(l, us)| row("edit-one", Some(l.as_secs_f64() * 1e3), *us, after)),
            )
            .chain(
                s.mesh_edit
                    .map(|(l, us)| row("edit-mesh", Some(l.as_secs_f64() * 1e3), us, after)),
            );
        write(&dir.join("scale.csv"), rows)?;
    }
    if let Some(h) = &r.harness {
        let c = &h.config;
        let row = HarnessRow {
            shared_workloads: c.shared_workloads,
            mesh_cidrs: c.mesh_cidrs,
            own_workloads: c.own_workloads,
            own_extra_cidrs: c.own_extra_cidrs,
            max_rule_entries: c.max_rule_entries,
            edits: c.edits,
            workloads: h.workloads,
            registered: h.registered,
            on_fallback: h.on_fallback,
            v4_entries: h.v4_entries,
            policy_sets: h.policy_sets,
            first_reconcile_us: h.first_reconcile_us,
            rss_kib: h.rss_kib,
            peak_rss_kib: h.peak_rss_kib,
            edit_p50_us: h.edit_p50_us,
            edit_p99_us: h.edit_p99_us,
            edit_recomputed: h.edit_recomputed,
            unchanged_pass_us: h.unchanged_pass_us,
            mesh_edit_us: h.mesh_edit_us,
            mesh_edit_on_fallback: h.mesh_edit_on_fallback,
        };
        write(&dir.join("harness.csv"), [row])?;
    }
    if !r.prog_costs.is_empty() {
        write(
            &dir.join("progs.csv"),
            r.prog_costs.iter().map(|c| ProgRow {
                n: c.n,
                program: &c.program,
                run_cnt: c.run_cnt,
                avg_ns: c.avg_ns,
                conns: c.conns,
                pod_entry: c.pod_entry,
            }),
        )?;
    }
    Ok(())
}
