//! Issue #12 item 11: the policy record is read through a pointer into `POLICY`. In a
//! preallocated hash map an update of an existing key parks the old element in a per-CPU spare
//! slot, and the next update of an existing key on that CPU reuses it at once, with no RCU grace
//! period (kernel/bpf/hashtab.c, `alloc_htab_elem` with `old_elem`). A connect that looked up
//! the old element could then copy another key's record. The storm below does exactly that
//! pairing, as fast as userspace can: rewrite the workload's own (redirecting) record, then a
//! disabled record of another key, over and over, while the workload loops connects. A torn or
//! recycled read shows as a connect that went direct (the disabled record's answer).
mod escapes_support;

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use escapes_support::{Looper, assert_no_escape, config, world};
use redirect_agent::bpf::PinnedMaps;
use redirect_common::flags;
use redirect_tests::{Agent, cgroup_id};

#[test]
fn a_storm_of_record_rewrites_never_lets_a_connect_escape() {
    let w = world("slot-reuse");
    let mut agent = Agent::start(&w.fx, &config(&w)).unwrap();
    // The agent registers both workloads and goes away: the test is the only writer now, and the
    // pinned links keep deciding.
    agent.kill9().unwrap();
    let (app, other) = (cgroup_id(&w.pod1).unwrap(), cgroup_id(&w.pod2).unwrap());
    let mut maps = PinnedMaps::open(w.fx.pin_dir()).unwrap();
    let own = maps.policy(app).expect("demo/app registered");
    assert_ne!(own.flags & flags::ENABLED, 0);
    let mut disabled = maps.policy(other).expect("demo/other registered");
    disabled.flags = 0;

    let looper = Looper::start(&w, &w.app);
    let stop = AtomicBool::new(false);
    let writes = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                maps.set_policy(app, &own).unwrap();
                maps.set_policy(other, &disabled).unwrap();
                n += 2;
            }
            n
        });
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            looper.wait_redirected(1);
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap()
    });
    let c = looper.finish(Duration::ZERO);
    println!("{writes} POLICY writes while the workload looped: {c:?}");
    assert!(writes > 10_000, "the storm was too small: {writes} writes");
    assert_no_escape(c, "record rewrite storm");
    assert!(c.redirected >= 50, "the loop ran too little: {c:?}");
}
