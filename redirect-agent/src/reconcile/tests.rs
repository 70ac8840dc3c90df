//! The reconcile rules as plain unit tests against the in-memory maps (ztunnel-style: idempotent
//! add, add-delete-add, fail then retry), no root needed.
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use redirect_common::{flags, map_names};

use super::*;
use crate::{metrics::Metrics, proxy::ProxyConfig};

pub(super) const EXCLUDE: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub(super) const PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";

fn spec(name: &str, annotations: &[(&str, &str)]) -> WorkloadSpec {
    spec_in("demo", name, annotations)
}

/// A workload of namespace `ns`, in cgroup /cg/NAME.
pub(super) fn spec_in(ns: &str, name: &str, annotations: &[(&str, &str)]) -> WorkloadSpec {
    WorkloadSpec {
        namespace: ns.into(),
        name: name.into(),
        cgroup: PathBuf::from(format!("/cg/{name}")),
        proxy_cgroup: None,
        proxy_uid: None,
        netns: None,
        inbound_port: None,
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Cgroup ids: the workload's position + 100.
pub(super) fn snap(workloads: Vec<WorkloadSpec>) -> Snapshot {
    let mut s = Snapshot {
        proxy: ProxyConfig {
            uid: Some(1337),
            ..ProxyConfig::default()
        },
        ..Snapshot::default()
    };
    for (i, w) in workloads.iter().enumerate() {
        s.cgroups.insert(w.cgroup.clone(), 100 + i as u64);
    }
    s.workloads = workloads;
    s
}

pub(super) fn rec(capacity: usize, grace: Duration) -> Reconciler<MemMaps> {
    Reconciler::new(
        Applier::adopt(MemMaps::new(capacity))
            .unwrap()
            .with_grace(grace),
    )
}

fn maps(r: &Reconciler<MemMaps>) -> &MemMaps {
    r.applier.maps()
}

fn entries_of(r: &Reconciler<MemMaps>, cgroup: u64) -> crate::bpf::PolicyEntries {
    let id = maps(r).records[&cgroup].policy_id;
    maps(r).rules.get(&id).cloned().unwrap_or_default()
}

fn v4_fill(r: &Reconciler<MemMaps>) -> usize {
    maps(r).fill().0
}

#[test]
fn idempotent_add() {
    let mut r = rec(1000, Duration::ZERO);
    let s = snap(vec![spec("a", &[(EXCLUDE, "10.1.0.0/16")])]);
    let first = r.reconcile(&s);
    assert_eq!(first.report.added, 1);
    let writes = maps(&r).writes;
    let again = r.reconcile(&s);
    assert_eq!(
        (
            again.report.added,
            again.report.updated,
            again.report.unchanged
        ),
        (0, 0, 1)
    );
    assert_eq!(
        maps(&r).writes,
        writes,
        "an unchanged pass wrote to the maps"
    );
    assert_eq!(
        r.memo.computed, 0,
        "an unchanged workload was resolved again"
    );
}

#[test]
fn add_delete_add_leaves_nothing_behind() {
    let mut r = rec(1000, Duration::ZERO);
    let empty_fill = maps(&r).fill();
    let s = snap(vec![spec("a", &[(EXCLUDE, "10.1.0.0/16")])]);
    r.reconcile(&s);
    assert!(maps(&r).records.contains_key(&100));
    let gone = r.reconcile(&snap(vec![]));
    assert_eq!(gone.report.removed, 1);
    assert!(maps(&r).records.is_empty());
    r.applier.collect(Instant::now());
    assert_eq!(maps(&r).fill(), empty_fill, "entries leaked");
    let back = r.reconcile(&s);
    assert_eq!(back.report.added, 1);
    assert!(entries_of(&r, 100).v4.contains_key(&(16, [10, 1, 0, 0])));
}

#[test]
fn fail_then_retry() {
    let mut r = rec(1000, Duration::ZERO);
    // Every write of this pass fails: own entries, mesh-default entries, the last-resort record.
    r.applier.maps_mut().fail_writes = 3;
    let s = snap(vec![spec("a", &[(EXCLUDE, "10.1.0.0/16")])]);
    let failed = r.reconcile(&s);
    assert_eq!(failed.report.errors.len(), 1);
    let e = &failed.report.errors[0];
    assert_eq!(e.workload, "demo/a");
    assert_eq!(e.fallback, Fallback::Nothing);
    assert!(!e.error.is_map_full());
    assert!(maps(&r).records.is_empty());
    let retried = r.reconcile(&s);
    assert!(retried.report.errors.is_empty());
    assert_eq!(retried.report.added, 1);
    assert!(retried.report.fallbacks.is_empty());
}

#[test]
fn a_failed_write_is_retried_by_the_owner_without_a_new_event() {
    let mut applier = Applier::adopt(MemMaps::new(1000)).unwrap();
    applier.maps_mut().fail_writes = 3;
    let (owner, thread) = Owner::spawn(applier, Arc::new(Metrics::new(None))).unwrap();
    let mut reports = owner.reports();
    owner.submit(snap(vec![spec("a", &[])]), Instant::now());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut saw_error = false;
    loop {
        assert!(Instant::now() < deadline, "never retried");
        let r = reports.borrow_and_update().clone();
        if !r.apply_errors.is_empty() {
            saw_error = true;
            assert!(!owner.health().ready(), "ready with a failed write pending");
        } else if saw_error && r.generation >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(owner.health().ready());
    drop(reports);
    drop(owner);
    thread.join().unwrap();
}

#[test]
fn an_invalid_policy_keeps_the_last_good_one() {
    let mut r = rec(1000, Duration::ZERO);
    r.reconcile(&snap(vec![spec("a", &[(EXCLUDE, "10.1.0.0/16")])]));
    let before = maps(&r).records[&100];
    let bad = r.reconcile(&snap(vec![spec("a", &[(PORTS, "70000")])]));
    assert_eq!(bad.issues.len(), 1);
    assert_eq!(bad.issues[0].fallback, Fallback::LastGood);
    assert!(
        bad.issues[0].error.contains("70000"),
        "{}",
        bad.issues[0].error
    );
    assert_eq!(maps(&r).records[&100], before);
    assert!(entries_of(&r, 100).v4.contains_key(&(16, [10, 1, 0, 0])));
}

/// A typo in an inbound key (#11): the outbound edit in the same change is applied, and the
/// issue says that only inbound kept its last good policy.
#[test]
fn a_bad_inbound_value_does_not_stop_the_outbound_policy() {
    let mut r = rec(1000, Duration::ZERO);
    r.reconcile(&snap(vec![spec("a", &[(EXCLUDE, "10.1.0.0/16")])]));
    let inbound = "traffic.sidecar.istio.io/excludeInboundPorts";
    let out = r.reconcile(&snap(vec![spec(
        "a",
        &[(EXCLUDE, "10.2.0.0/16"), (inbound, "70O1")],
    )]));
    assert_eq!(out.issues.len(), 1, "{:?}", out.issues);
    let i = &out.issues[0];
    assert_eq!(i.fallback, Fallback::InboundLastGood);
    assert_eq!((i.key.as_str(), i.value.as_str()), (inbound, "70O1"));
    assert!(i.error.contains("pod demo/a"), "{}", i.error);
    let e = entries_of(&r, 100);
    assert!(
        e.v4.contains_key(&(16, [10, 2, 0, 0])),
        "outbound edit applied"
    );
    assert!(!e.v4.contains_key(&(16, [10, 1, 0, 0])));
}

#[test]
fn a_pending_proxy_cgroup_keeps_the_last_good_policy() {
    let mut r = rec(1000, Duration::ZERO);
    let mut w = spec("a", &[(EXCLUDE, "10.1.0.0/16")]);
    w.proxy_cgroup = Some(PathBuf::from("/cg/a-proxy"));
    let mut s = snap(vec![w]);
    s.cgroups.insert(PathBuf::from("/cg/a-proxy"), 7);
    r.reconcile(&s);
    let before = maps(&r).records[&100];
    assert_eq!(before.proxy_cgroup, 7);
    // The proxy cgroup disappears (or the file names one that does not exist yet).
    s.cgroups.remove(&PathBuf::from("/cg/a-proxy"));
    s.workloads[0].annotations.clear();
    let out = r.reconcile(&s);
    assert_eq!(out.pending, vec!["demo/a".to_string()]);
    assert_eq!(
        out.report.removed, 0,
        "a pending proxy cgroup removed the policy"
    );
    assert_eq!(maps(&r).records[&100], before);
    // A new workload whose proxy cgroup is pending gets nothing yet (its proxy would loop).
    let mut n = spec("b", &[]);
    n.proxy_cgroup = Some(PathBuf::from("/cg/b-proxy"));
    s.cgroups.insert(n.cgroup.clone(), 200);
    s.workloads.push(n);
    let out = r.reconcile(&s);
    assert!(!maps(&r).records.contains_key(&200));
    assert_eq!(out.pending.len(), 2);
}

#[test]
fn a_workload_without_a_good_policy_follows_the_current_mesh_default() {
    let mut r = rec(1000, Duration::ZERO);
    let mut s = snap(vec![spec("a", &[(PORTS, "70000")])]);
    let first = r.reconcile(&s);
    assert_eq!(first.issues[0].fallback, Fallback::MeshDefault);
    assert!(maps(&r).records[&100].flags & flags::ENABLED != 0);
    // A later MeshConfig edit reaches it, and the second report says the same thing.
    Arc::make_mut(&mut s.mesh).outbound_ip_range_exclusion_list = vec!["10.9.0.0/16".into()];
    let second = r.reconcile(&s);
    assert_eq!(second.issues[0].fallback, Fallback::MeshDefault);
    assert!(entries_of(&r, 100).v4.contains_key(&(16, [10, 9, 0, 0])));
    Arc::make_mut(&mut s.mesh).interception_mode = Some("none".into());
    r.reconcile(&s);
    assert_eq!(maps(&r).records[&100].flags & flags::ENABLED, 0);
}

#[test]
fn make_before_break_needs_room_for_old_and_new_and_frees_the_old_after_grace() {
    let grace = Duration::from_secs(60);
    let mut r = rec(1000, grace);
    r.reconcile(&snap(vec![spec("a", &[(EXCLUDE, "10.1.0.0/16")])]));
    let old_id = maps(&r).records[&100].policy_id;
    let old = maps(&r).rules[&old_id].clone();
    let out = r.reconcile(&snap(vec![spec("a", &[(EXCLUDE, "10.2.0.0/16")])]));
    assert_eq!(out.report.updated, 1);
    let new_id = maps(&r).records[&100].policy_id;
    assert_ne!(new_id, old_id);
    // A connect that read the old record a moment ago still finds the whole old rule set.
    assert_eq!(maps(&r).rules[&old_id], old);
    assert_eq!(r.applier.collect(Instant::now()), 0);
    assert_eq!(r.applier.collect(Instant::now() + grace), 1);
    assert!(!maps(&r).rules.contains_key(&old_id));
    assert!(maps(&r).rules.contains_key(&new_id));
}

#[test]
fn does_not_fit_names_the_flag_the_map_its_fill_and_the_need() {
    // Reserved last-resort set (1 v4) + the mesh default (1 v4) + a's 2 v4 entries.
    let mut r = rec(4, Duration::from_secs(60));
    r.reconcile(&snap(vec![spec("a", &[(EXCLUDE, "10.1.0.0/16")])]));
    let before = maps(&r).records[&100];
    let out = r.reconcile(&snap(vec![spec(
        "a",
        &[(EXCLUDE, "10.2.0.0/16,10.4.0.0/16,10.6.0.0/16")],
    )]));
    assert_eq!(out.report.errors.len(), 1, "{:?}", out.report);
    let e = &out.report.errors[0];
    assert!(e.error.is_map_full());
    assert_eq!(e.fallback, Fallback::LastGood);
    let msg = e.error.to_string();
    for part in [
        "--max-rule-entries",
        map_names::CIDR_V4,
        "of its 4 entries",
        "needs 4 more",
        "make before break",
    ] {
        assert!(msg.contains(part), "{part:?} missing: {msg}");
    }
    assert_eq!(
        maps(&r).records[&100],
        before,
        "the last good policy changed"
    );
}

#[test]
fn a_new_workload_that_does_not_fit_gets_the_mesh_default_else_redirects_everything() {
    let mut r = rec(4, Duration::ZERO);
    let out = r.reconcile(&snap(vec![
        spec("a", &[]),
        spec(
            "b",
            &[(EXCLUDE, "10.2.0.0/16,10.4.0.0/16,10.6.0.0/16,10.8.0.0/16")],
        ),
    ]));
    assert_eq!(out.report.errors.len(), 1);
    assert_eq!(out.report.errors[0].workload, "demo/b");
    assert_eq!(out.report.errors[0].fallback, Fallback::MeshDefault);
    assert_eq!(
        maps(&r).records[&101].policy_id,
        maps(&r).records[&100].policy_id,
        "b should run the mesh default a runs"
    );
    // The mesh default itself does not fit: the last resort redirects everything.
    let mut big = snap(vec![spec(
        "c",
        &[(EXCLUDE, "10.2.0.0/16,10.4.0.0/16,10.6.0.0/16")],
    )]);
    Arc::make_mut(&mut big.mesh).outbound_ip_range_exclusion_list = vec![
        "10.12.0.0/16".into(),
        "10.14.0.0/16".into(),
        "10.16.0.0/16".into(),
    ];
    let mut r = rec(3, Duration::ZERO);
    let out = r.reconcile(&big);
    assert_eq!(out.report.errors[0].fallback, Fallback::RedirectAll);
    let c = maps(&r).records[&100];
    assert_ne!(c.flags & flags::ENABLED, 0);
    assert_ne!(
        c.flags & flags::HAS_PROXY_UID,
        0,
        "the proxy must stay exempt"
    );
    let e = entries_of(&r, 100);
    assert_eq!(
        e.v4.get(&(0, [0; 4])),
        Some(&redirect_common::action::INCLUDE)
    );
    assert_eq!(e.v4.len(), 1);
}

#[test]
fn a_rejected_workload_is_retried_when_room_appears() {
    // Same pass: a's removal frees its set (zero grace) and b gets in.
    let big = "10.2.0.0/16,10.4.0.0/16,10.6.0.0/16";
    let mut r = rec(6, Duration::ZERO);
    r.reconcile(&snap(vec![spec(
        "a",
        &[(EXCLUDE, "10.1.0.0/16,10.3.0.0/16,10.5.0.0/16")],
    )]));
    let mut s = snap(vec![spec("b", &[(EXCLUDE, big)])]);
    s.cgroups.insert(s.workloads[0].cgroup.clone(), 101);
    let out = r.reconcile(&s);
    assert!(out.report.errors.is_empty(), "{:?}", out.report.errors);
    assert!(entries_of(&r, 101).v4.contains_key(&(16, [10, 2, 0, 0])));
    // Later pass: with a grace period, room appears when it ends.
    let grace = Duration::from_millis(50);
    let mut r = rec(6, grace);
    r.reconcile(&snap(vec![spec(
        "a",
        &[(EXCLUDE, "10.1.0.0/16,10.3.0.0/16,10.5.0.0/16")],
    )]));
    let out = r.reconcile(&s);
    assert_eq!(out.report.errors[0].fallback, Fallback::MeshDefault);
    let due = r.applier.next_collect().expect("a set is retired");
    std::thread::sleep(due.saturating_duration_since(Instant::now()));
    let out = r.reconcile(&s);
    assert!(out.report.errors.is_empty(), "{:?}", out.report.errors);
    assert!(entries_of(&r, 101).v4.contains_key(&(16, [10, 2, 0, 0])));
}

#[test]
fn identical_policies_share_one_id_and_one_set_of_entries() {
    let grace = Duration::from_secs(60);
    let mut r = rec(1000, grace);
    let same = [(EXCLUDE, "10.1.0.0/16")];
    let s = snap(vec![spec("a", &same), spec("b", &same), spec("c", &same)]);
    r.reconcile(&s);
    let ids: Vec<u32> = (100..103).map(|c| maps(&r).records[&c].policy_id).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    let fill = v4_fill(&r);
    // One workload moves to its own set; the shared one stays for the others.
    let mut s2 = s.clone();
    s2.workloads[1]
        .annotations
        .insert(EXCLUDE.into(), "10.7.0.0/16".into());
    r.reconcile(&s2);
    let b = maps(&r).records[&101].policy_id;
    assert_ne!(b, ids[0]);
    assert_eq!(maps(&r).records[&100].policy_id, ids[0]);
    assert!(v4_fill(&r) > fill);
    // The last references go: the shared set is freed after the grace period only.
    r.reconcile(&snap(vec![]));
    assert!(maps(&r).rules.contains_key(&ids[0]));
    r.applier.collect(Instant::now() + grace);
    assert!(!maps(&r).rules.contains_key(&ids[0]));
    assert!(!maps(&r).rules.contains_key(&b));
}

#[test]
fn adopted_records_are_kept_without_rewrites() {
    let mut r = rec(1000, Duration::ZERO);
    let s = snap(vec![spec("a", &[(EXCLUDE, "10.1.0.0/16")])]);
    r.reconcile(&s);
    let mut maps = r.applier.maps().clone();
    maps.writes = 0;
    let mut again = Reconciler::new(Applier::adopt(maps).unwrap());
    let out = again.reconcile(&s);
    assert_eq!(
        (out.report.unchanged, out.report.added, out.report.updated),
        (1, 0, 0)
    );
    assert_eq!(again.applier.maps().writes, 0);
}
