//! The dirty set (slots.rs): a pass recomputes only the workloads whose inputs changed, and
//! what it applies is what a reconciler with the dirty set off applies after the same passes.
use std::time::Duration;

use super::{
    tests::{EXCLUDE, PORTS, snap, spec_in as spec},
    *,
};

fn rec() -> Reconciler<MemMaps> {
    super::tests::rec(10_000, Duration::ZERO)
}

fn six() -> Snapshot {
    let mut s = snap(vec![
        spec("a", "p0", &[]),
        spec("a", "p1", &[(EXCLUDE, "10.1.0.0/16")]),
        spec("a", "p2", &[]),
        spec("b", "p3", &[(PORTS, "5432")]),
        spec("b", "p4", &[]),
        spec("b", "p5", &[(EXCLUDE, "not-a-cidr")]),
    ]);
    std::sync::Arc::make_mut(&mut s.mesh).outbound_ip_range_exclusion_list =
        vec!["192.0.2.0/24".into()];
    s
}

/// Per cgroup: the record without its ids, and the entries it names (its own and its base's).
fn state(r: &Reconciler<MemMaps>) -> Vec<(u64, redirect_common::Policy, String)> {
    let m = r.applier.maps();
    m.records
        .iter()
        .map(|(&cg, p)| {
            let own = m.rules.get(&p.policy_id).cloned().unwrap_or_default();
            let base = m.rules.get(&p.base_id).cloned().unwrap_or_default();
            let record = redirect_common::Policy {
                policy_id: 0,
                base_id: 0,
                ..*p
            };
            (cg, record, format!("{own:?} over {base:?}"))
        })
        .collect()
}

/// What a reconciler that has seen nothing before applies for `s`.
fn fresh(s: &Snapshot) -> Vec<(u64, redirect_common::Policy, String)> {
    let mut r = rec();
    r.reconcile(s);
    state(&r)
}

#[test]
fn a_one_workload_edit_recomputes_that_workload_only() {
    let mut r = rec();
    let mut s = six();
    r.reconcile(&s);
    assert_eq!(r.memo.recomputed, 6);
    let again = r.reconcile(&s);
    assert_eq!((r.memo.recomputed, r.memo.computed), (0, 0));
    // The bad annotation is reported on every pass, reused or not.
    assert_eq!(again.issues.len(), 1, "{:?}", again.issues);
    assert!(again.issues[0].error.contains("not-a-cidr"));
    s.workloads[1]
        .annotations
        .insert(EXCLUDE.into(), "10.2.0.0/16".into());
    let edit = r.reconcile(&s);
    assert_eq!((r.memo.recomputed, r.memo.computed), (1, 1));
    assert_eq!((edit.report.updated, edit.report.unchanged), (1, 5));
    assert_eq!(state(&r), fresh(&s));
}

#[test]
fn a_namespace_edit_recomputes_its_workloads_and_a_mesh_edit_all() {
    let mut r = rec();
    let mut s = six();
    r.reconcile(&s);
    s.namespaces
        .insert("b".into(), [(PORTS.to_string(), "6379".to_string())].into());
    r.reconcile(&s);
    assert_eq!(r.memo.recomputed, 3, "namespace b has three workloads");
    assert_eq!(state(&r), fresh(&s));
    std::sync::Arc::make_mut(&mut s.mesh)
        .outbound_ip_range_exclusion_list
        .push("198.51.100.0/24".into());
    r.reconcile(&s);
    assert_eq!(r.memo.recomputed, 6);
    assert_eq!(state(&r), fresh(&s));
    s.proxy.outbound_port = 15006;
    r.reconcile(&s);
    assert_eq!(
        (r.memo.recomputed, r.memo.computed),
        (6, 0),
        "a proxy change recompiles nothing"
    );
    assert_eq!(state(&r), fresh(&s));
}

#[test]
fn a_recreated_cgroup_is_recomputed_under_its_new_id() {
    let mut r = rec();
    let mut s = six();
    r.reconcile(&s);
    s.cgroups.insert(s.workloads[3].cgroup.clone(), 999);
    let pass = r.reconcile(&s);
    assert_eq!(r.memo.recomputed, 1);
    assert_eq!((pass.report.added, pass.report.removed), (1, 1));
    assert!(r.applier.maps().records.contains_key(&999));
    assert!(!r.applier.maps().records.contains_key(&103));
    assert_eq!(state(&r), fresh(&s));
}

#[test]
fn removed_workloads_let_go_of_their_results_and_the_memo_stays_bounded() {
    let mut r = rec();
    let mut s = six();
    r.reconcile(&s);
    let entries = r.memo.entries();
    for i in 0..50 {
        s.workloads[1]
            .annotations
            .insert(EXCLUDE.into(), format!("10.{i}.0.0/16"));
        r.reconcile(&s);
    }
    assert_eq!(
        r.memo.entries(),
        entries,
        "50 edits of one workload grew the memo"
    );
    s.workloads.truncate(2);
    r.reconcile(&s);
    assert_eq!(r.memo.slots(), 2);
    // Namespace a's mesh default and p1's own resolution.
    assert_eq!(r.memo.entries(), 2);
    assert_eq!(state(&r), fresh(&s));
}

/// A long run of mixed edits, each pass compared with a reconciler fed the same passes that
/// recomputes every workload every time (the fallbacks depend on what was applied before, so a
/// reconcile from nothing is not the reference here).
#[test]
fn every_pass_applies_what_a_full_recompute_would() {
    let mut r = rec();
    let mut full = rec();
    full.memo.never_reuse();
    let mut s = six();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for step in 0..300 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % s.workloads.len() as u64) as usize;
        match (x >> 8) % 7 {
            0 => {
                s.workloads[i]
                    .annotations
                    .insert(EXCLUDE.into(), format!("10.{}.0.0/16", x % 4));
            }
            1 => {
                s.workloads[i].annotations.clear();
            }
            2 => {
                s.workloads[i].annotations.insert(
                    PORTS.into(),
                    if x.is_multiple_of(5) {
                        "bad".into()
                    } else {
                        "5432".into()
                    },
                );
            }
            3 => {
                let ns = if x.is_multiple_of(2) { "a" } else { "b" };
                s.namespaces.insert(
                    ns.into(),
                    [(PORTS.to_string(), format!("{}", 1000 + x % 3))].into(),
                );
            }
            4 => {
                s.cgroups.insert(s.workloads[i].cgroup.clone(), 1000 + step);
            }
            5 => {
                s.workloads[i].proxy_uid = Some((x % 3) as u32 + 2000);
            }
            _ => {
                std::sync::Arc::make_mut(&mut s.mesh).outbound_port_exclusion_list =
                    vec![serde_json::json!((x % 3) + 9000)];
            }
        }
        let (a, b) = (r.reconcile(&s), full.reconcile(&s));
        assert_eq!(state(&r), state(&full), "step {step}");
        let issues = |o: &Outcome| format!("{:?} {:?}", o.issues, o.warnings);
        assert_eq!(issues(&a), issues(&b), "step {step}");
        assert_eq!(full.memo.recomputed, s.workloads.len());
    }
}
