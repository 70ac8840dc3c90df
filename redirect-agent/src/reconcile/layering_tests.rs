//! Overlays over a shared base, against the in-memory maps: who references the base, that it
//! outlives its last overlay's user only as long as one applies it, and that a base change is
//! make before break.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use redirect_common::decide::{NO_RULE, layered};

use super::*;
use crate::{
    policy::{self, Step},
    proxy::ProxyConfig,
};

/// FSM's union key: the pod's CIDRs are added to the mesh list.
const EXTRA: &str = "flomesh.io/outbound-ip-range-exclusion-list";
const MESH_CIDRS: u32 = 100;

fn spec(name: &str, extra: Option<&str>) -> WorkloadSpec {
    WorkloadSpec {
        namespace: "demo".into(),
        name: name.into(),
        cgroup: PathBuf::from(format!("/cg/{name}")),
        proxy_cgroup: None,
        proxy_uid: None,
        netns: None,
        inbound_port: None,
        annotations: extra
            .map(|v| (EXTRA.to_string(), v.to_string()))
            .into_iter()
            .collect(),
    }
}

/// `shared` workloads with the mesh default, then one per `extras` item with those CIDRs added;
/// cgroup ids are the position + 100. The mesh excludes 10.0.0.0 + 2i /32 (none merge).
fn snap(shared: usize, extras: &[&str], mesh_offset: u32) -> Snapshot {
    let mut s = Snapshot {
        proxy: ProxyConfig {
            uid: Some(1337),
            ..ProxyConfig::default()
        },
        ..Snapshot::default()
    };
    Arc::make_mut(&mut s.mesh).outbound_ip_range_exclusion_list = (0..MESH_CIDRS)
        .map(|i| {
            format!(
                "{}/32",
                std::net::Ipv4Addr::from(0x0a00_0000 + 2 * (i + mesh_offset))
            )
        })
        .collect();
    let names = (0..shared).map(|i| (format!("s{i}"), None));
    let names = names.chain(
        extras
            .iter()
            .enumerate()
            .map(|(i, e)| (format!("o{i}"), Some(*e))),
    );
    for (i, (name, extra)) in names.enumerate() {
        let w = spec(&name, extra);
        s.cgroups.insert(w.cgroup.clone(), 100 + i as u64);
        s.workloads.push(w);
    }
    s
}

fn rec(grace: Duration) -> Reconciler<MemMaps> {
    Reconciler::new(
        Applier::adopt(MemMaps::new(1 << 20))
            .unwrap()
            .with_grace(grace),
    )
}

/// The kernel's decision for `cgroup` over the in-memory maps, layered as connect4 layers it.
fn decide(r: &Reconciler<MemMaps>, cgroup: u64, dest: &str) -> (bool, Step) {
    let m = r.applier.maps();
    let p = m.records[&cgroup];
    let v4 = |id: u32, a: [u8; 4]| -> u32 {
        let Some(e) = m.rules.get(&id) else {
            return NO_RULE;
        };
        let key = u32::from_be_bytes(a);
        e.v4.iter()
            .filter(|((bits, net), _)| {
                *bits == 0 || (u32::from_be_bytes(*net) ^ key) >> (32 - bits) == 0
            })
            .max_by_key(|((bits, _), _)| *bits)
            .map_or(NO_RULE, |(_, v)| *v)
    };
    let dest: SocketAddr = dest.parse().unwrap();
    policy::evaluate_rules(
        p.flags & redirect_common::flags::ENABLED != 0,
        dest,
        false,
        |_| NO_RULE,
        |ip| match ip {
            std::net::IpAddr::V4(a) => layered(v4(p.policy_id, a.octets()), p.base_id, |b| {
                v4(b, a.octets())
            }),
            std::net::IpAddr::V6(_) => NO_RULE,
        },
    )
}

#[test]
fn overlays_share_the_mesh_default_and_decide_like_their_own_table() {
    let mut r = rec(Duration::ZERO);
    let out = r.reconcile(&snap(
        3,
        &["172.16.0.0/24,172.17.0.1/32", "192.168.0.0/16"],
        0,
    ));
    assert!(out.report.errors.is_empty(), "{:?}", out.report.errors);
    let m = r.applier.maps();
    let base = m.records[&100].policy_id;
    assert_eq!(
        m.records[&100].base_id, 0,
        "the mesh default is not layered"
    );
    assert_eq!(m.records[&101].policy_id, base);
    for (cg, extra) in [(103u64, 2usize), (104, 1)] {
        let p = m.records[&cg];
        assert_eq!(p.base_id, base, "cgroup {cg} overlays the mesh default");
        assert_eq!(
            m.rules[&p.policy_id].v4.len(),
            extra,
            "cgroup {cg}'s overlay"
        );
    }
    // The base (100 exclusions + include-all), two overlays, the reserved redirect-all set.
    assert_eq!(r.applier.fill().v4, 101 + 3 + 1);
    assert_eq!(r.applier.refs(base), Some(5), "3 own uses and 2 as a base");
    let bypass = (false, Step::ExcludedCidr);
    let redirect = (true, Step::IncludedCidr);
    assert_eq!(decide(&r, 100, "10.0.0.2:80"), bypass);
    assert_eq!(decide(&r, 100, "172.16.0.9:80"), redirect);
    assert_eq!(decide(&r, 103, "10.0.0.2:80"), bypass, "from the base");
    assert_eq!(decide(&r, 103, "172.16.0.9:80"), bypass, "from the overlay");
    assert_eq!(decide(&r, 103, "172.17.0.1:80"), bypass);
    assert_eq!(decide(&r, 103, "192.168.1.1:80"), redirect);
    assert_eq!(decide(&r, 104, "192.168.1.1:80"), bypass);
    assert_eq!(decide(&r, 104, "10.0.0.3:80"), redirect);
}

#[test]
fn a_base_stays_while_an_overlay_names_it() {
    let mut r = rec(Duration::ZERO);
    r.reconcile(&snap(2, &["172.16.0.0/24"], 0));
    let base = r.applier.maps().records[&100].policy_id;
    // Only the overlay workload is left: nobody runs the base as its own policy.
    let mut s = snap(2, &["172.16.0.0/24"], 0);
    s.workloads.drain(..2);
    r.reconcile(&s);
    r.applier
        .collect(std::time::Instant::now() + Duration::from_secs(60));
    assert_eq!(r.applier.refs(base), Some(1));
    assert_eq!(r.applier.maps().rules[&base].v4.len(), 101, "base kept");
    assert_eq!(decide(&r, 102, "10.0.0.2:80"), (false, Step::ExcludedCidr));
    // The overlay goes too: the base is freed after the grace.
    s.workloads.clear();
    r.reconcile(&s);
    r.applier
        .collect(std::time::Instant::now() + Duration::from_secs(60));
    assert!(!r.applier.maps().rules.contains_key(&base));
    assert_eq!(r.applier.fill().v4, 1, "only the reserved redirect-all set");
}

#[test]
fn a_base_change_is_make_before_break() {
    let grace = Duration::from_secs(3600);
    let mut r = rec(grace);
    r.reconcile(&snap(2, &["172.16.0.0/24"], 0));
    let (old_base, old_overlay) = {
        let p = r.applier.maps().records[&102];
        (p.base_id, p.policy_id)
    };
    // A mesh-wide edit: every workload, the overlay's base included, moves.
    let out = r.reconcile(&snap(2, &["172.16.0.0/24"], 1));
    assert!(out.report.errors.is_empty(), "{:?}", out.report.errors);
    let m = r.applier.maps();
    let new_base = m.records[&100].policy_id;
    assert_ne!(new_base, old_base);
    assert_eq!(m.records[&102].base_id, new_base);
    // The overlay's own entries did not change, so it keeps its set.
    assert_eq!(m.records[&102].policy_id, old_overlay);
    // The old base is retired, not gone: a connect that read the old record may still use it.
    assert_eq!(r.applier.refs(old_base), Some(0));
    assert_eq!(m.rules[&old_base].v4.len(), 101);
    assert_eq!(decide(&r, 102, "10.0.0.0:80"), (true, Step::IncludedCidr));
    assert_eq!(
        decide(&r, 102, "10.0.0.200:80"),
        (false, Step::ExcludedCidr)
    );
    r.applier.collect(std::time::Instant::now() + grace * 2);
    assert!(!r.applier.maps().rules.contains_key(&old_base));
}

#[test]
fn a_restart_adopts_overlays_and_their_base() {
    let mut r = rec(Duration::ZERO);
    let s = snap(2, &["172.16.0.0/24"], 0);
    r.reconcile(&s);
    let maps = r.applier.maps().clone();
    let base = maps.records[&100].policy_id;
    let mut again = Reconciler::new(Applier::adopt(maps).unwrap().with_grace(Duration::ZERO));
    assert_eq!(
        again.applier.refs(base),
        Some(3),
        "two records and one overlay"
    );
    let writes = again.applier.maps().writes;
    let out = again.reconcile(&s);
    assert_eq!(out.report.unchanged, 3, "{:?}", out.report);
    assert_eq!(again.applier.maps().writes, writes, "nothing rewritten");
}

#[test]
fn small_tables_are_written_whole() {
    let mut r = rec(Duration::ZERO);
    let mut s = snap(1, &["172.16.0.0/24"], 0);
    Arc::make_mut(&mut s.mesh)
        .outbound_ip_range_exclusion_list
        .truncate(3);
    r.reconcile(&s);
    let p = r.applier.maps().records[&101];
    assert_eq!(p.base_id, 0);
    assert_eq!(r.applier.maps().rules[&p.policy_id].v4.len(), 5);
}
