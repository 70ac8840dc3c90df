//! The report's agent-at-scale sections: the real agent on the file source ([`scale_section`])
//! and issue #13's node in the agent's own harness ([`harness_section`]).
use std::fmt::Write as _;

use super::{
    report::num,
    results::{Harness, Results},
};

pub fn scale_section(r: &Results, md: &mut String) {
    let Some(s) = &r.scale else { return };
    let mut lat: Vec<u64> = s.edits.iter().map(|e| e.0.as_micros() as u64).collect();
    lat.sort_unstable();
    let mut rec: Vec<u64> = s.edits.iter().map(|e| e.1).collect();
    rec.sort_unstable();
    let p = |v: &[u64], q: f64| num(super::stats::percentile(v, q) / 1e3, 1);
    let _ = writeln!(
        md,
        "## The agent at scale: {} workloads × {} CIDRs ({} LPM entries)\n",
        s.workloads,
        s.cidrs_per_workload,
        s.workloads * s.cidrs_per_workload
    );
    let _ = writeln!(md, "| what | value | target |\n|---|---:|---|");
    let _ = writeln!(
        md,
        "| first reconcile (empty maps → all workloads) | {} ms | < 1 s |",
        num(s.initial_us as f64 / 1e3, 1)
    );
    let _ = writeln!(
        md,
        "| RSS after it / peak (VmRSS / VmHWM) | {:.1} / {:.1} MiB | < 50 MiB |",
        s.rss_kib as f64 / 1024.0,
        s.hwm_kib as f64 / 1024.0
    );
    let _ = writeln!(
        md,
        "| file source: one workload's CIDR edited, change-to-applied p50 / p99 ({} edits; from the file's replacement to the map holding the change) | {} / {} ms | p99 < 100 ms |",
        s.edits.len(),
        p(&lat, 0.5),
        p(&lat, 0.99)
    );
    let _ = writeln!(
        md,
        "| … of which the agent's reconcile p50 / p99 | {} / {} ms | |",
        p(&rec, 0.5),
        p(&rec, 0.99)
    );
    if let Some((l, us)) = s.mesh_edit {
        let _ = writeln!(
            md,
            "| mesh-wide edit (every workload changes): change-to-applied / reconcile | {} / {} ms | |",
            num(l.as_secs_f64() * 1e3, 1),
            num(us as f64 / 1e3, 1)
        );
    }
    let _ = writeln!(
        md,
        "| RSS / peak at the end | {:.1} / {:.1} MiB | < 50 MiB |\n",
        s.rss_after_kib as f64 / 1024.0,
        s.hwm_after_kib as f64 / 1024.0
    );
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn grouped(x: usize) -> String {
    let s = x.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Ideal trie use: one shared mesh list with its include entry, the extras once each (as
/// overlays over it) and the reserved set.
pub fn ideal_entries(h: &Harness) -> usize {
    let c = &h.config;
    c.mesh_cidrs + c.own_workloads * c.own_extra_cidrs + 2
}

pub fn harness_section(r: &Results, md: &mut String) {
    let Some(h) = &r.harness else { return };
    let c = &h.config;
    let ms = |us: u64| num(us as f64 / 1e3, 1);
    let _ = writeln!(
        md,
        "## The agent at scale: issue #13's node ({} + {} workloads, a {}-CIDR mesh list)

\
         The agent's own harness (`redirect_agent::reconcile::scale`, run as `redirect-bench worker scale` in a process of its own): {} workloads with no annotations share the mesh exclusion list ({} /32s, none adjacent, so none merge); {} more add {} CIDRs of their own each (FSM's union annotation). \
         The maps are the in-memory stand-ins of the reconcile unit tests, with tries of {} entries (the agent's default `--max-rule-entries` is 1,048,576; a quick run scales it with the mesh list), so the figures are the agent's own work (resolve, compile, diff, write) without the bpf(2) calls; the RSS is the harness process's, the in-memory maps included. \
         The one-workload edits give one shared workload an excluded port of its own (so it leaves the shared set: its own entries are a one-port overlay over the shared base); the mesh-wide edit adds one CIDR to the mesh list.\n",
        c.shared_workloads,
        c.own_workloads,
        grouped(c.mesh_cidrs),
        c.shared_workloads,
        grouped(c.mesh_cidrs),
        c.own_workloads,
        c.own_extra_cidrs,
        grouped(c.max_rule_entries),
    );
    let _ = writeln!(md, "| what | value | target (issue #13) |\n|---|---:|---|");
    let _ = writeln!(
        md,
        "| workloads registered | {} of {} | all |",
        h.registered, h.workloads
    );
    let _ = writeln!(
        md,
        "| … on a fallback (their own entries did not fit) | {} | 0 |",
        h.on_fallback
    );
    let _ = writeln!(
        md,
        "| IPv4 trie entries used / capacity | {} / {} ({} policy sets) | ≈ {} |",
        grouped(h.v4_entries),
        grouped(c.max_rule_entries),
        h.policy_sets,
        grouped(ideal_entries(h))
    );
    let _ = writeln!(
        md,
        "| first reconcile (empty maps → all workloads) | {} ms | < 2 s |",
        ms(h.first_reconcile_us)
    );
    let _ = writeln!(
        md,
        "| RSS after it / peak (VmRSS / VmHWM) | {} / {} MiB | < 100 MiB |",
        mib(h.rss_kib),
        mib(h.peak_rss_kib)
    );
    let _ = writeln!(
        md,
        "| a pass with nothing changed | {} ms | |",
        num(h.unchanged_pass_us as f64 / 1e3, 2)
    );
    let _ = writeln!(
        md,
        "| one workload edited: reconcile p50 / p99 ({} edits) | {} / {} ms | p99 < 5 ms |",
        c.edits,
        num(h.edit_p50_us as f64 / 1e3, 2),
        num(h.edit_p99_us as f64 / 1e3, 2)
    );
    let _ = writeln!(
        md,
        "| … workloads recomputed by such a pass, at most (the rest reuse their last result) | {} of {} | 1 |",
        h.edit_recomputed, h.workloads
    );
    let _ = writeln!(
        md,
        "| mesh-wide edit (every workload changes): reconcile | {} ms | < 1 s |",
        ms(h.mesh_edit_us)
    );
    let _ = writeln!(
        md,
        "| … workloads on a fallback after it | {} | 0 |\n",
        h.mesh_edit_on_fallback
    );
    let _ = writeln!(
        md,
        "A workload with CIDRs of its own gets only an overlay (its {} extras) under its own policy id, layered over the mesh default's shared set (`Policy::base_id`: the kernel asks the overlay first, then the base). \
         A mesh-wide edit needs room for the old and the new entries at once (make before break), so on a full trie the changed sets that do not fit keep their last good policy.\n",
        c.own_extra_cidrs
    );
}
