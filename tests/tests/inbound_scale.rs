//! Reconcile passes with N netns workloads (real kernel, real namespaces, the real inbound
//! applier on the pinned maps), each snapshot resolved as a source resolves it: the first pass
//! reads each cookie and links each namespace; a later pass of the same workloads reads no
//! cookie and makes no link, it only diffs. It prints what each pass took (no timing assert;
//! set REDIRECT_TEST_INBOUND_N for another N).
use std::time::Instant;

use redirect_agent::{
    bpf::{self, AttachOptions, netns},
    cgroup::netns_ids::NetnsIds,
    reconcile::{Snapshot, WorkloadSpec, inbound::InboundApplier},
};
use redirect_tests::Fixture;

#[test]
fn passes_after_the_first_only_diff() {
    let n: usize = std::env::var("REDIRECT_TEST_INBOUND_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let fx = Fixture::new("inscale").unwrap();
    let pods: Vec<Fixture> = (0..n)
        .map(|i| Fixture::new(&format!("inscale-{i}")).unwrap())
        .collect();
    let maps = bpf::load_and_attach(&AttachOptions {
        bpffs_dir: fx.pin_dir().to_path_buf(),
        cgroup_root: fx.cgroup_root().to_path_buf(),
        max_rule_entries: None,
        inbound: true,
    })
    .unwrap();
    let dir = maps.dir().to_path_buf();
    let mut inbound = InboundApplier::adopt(&dir);
    let workloads = pods
        .iter()
        .enumerate()
        .map(|(i, p)| WorkloadSpec {
            namespace: "scale".into(),
            name: format!("pod{i}"),
            cgroup: fx.cgroup(&format!("pod{i}")).unwrap(),
            proxy_cgroup: None,
            proxy_uid: None,
            netns: Some(p.netns_path()),
            inbound_port: None,
            annotations: Default::default(),
        })
        .collect();
    let source = Snapshot {
        workloads,
        ..Default::default()
    };
    let mut ids = NetnsIds::default();
    let mut times = Vec::new();
    for pass in 0..3 {
        let t = Instant::now();
        let mut snapshot = source.clone();
        snapshot.resolve_netns(&mut ids);
        let report = inbound.apply(&snapshot);
        times.push(t.elapsed());
        assert!(report.errors.is_empty(), "pass {pass}: {:?}", report.errors);
        assert_eq!(report.applied, n, "pass {pass}");
        assert_eq!(netns::linked(&dir).len(), n, "pass {pass}");
        // Every cookie was read by the first pass, and every namespace linked there.
        assert_eq!(ids.cookie_reads, n as u64, "pass {pass}");
        assert_eq!(report.linked, if pass == 0 { n } else { 0 }, "pass {pass}");
    }
    // A namespace no workload names is let go.
    let mut fewer = source.clone();
    fewer.workloads.truncate(n - 1);
    fewer.resolve_netns(&mut ids);
    assert_eq!(ids.len(), n - 1);
    let report = inbound.apply(&fewer);
    assert_eq!((report.applied, report.removed), (n - 1, 1));
    assert_eq!(netns::linked(&dir).len(), n - 1);
    println!(
        "inbound reconcile, {n} netns workloads: first pass {:?}, then {:?} and {:?}",
        times[0], times[1], times[2]
    );
}
