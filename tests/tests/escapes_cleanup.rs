//! Issue #12, outbound: `redirect-agent cleanup` run beside a live agent is refused (the agent
//! holds the pin directory's lock, datapath_lifecycle.rs) and, while it is tried again and
//! again, no looped connect of a redirected workload escapes the proxy.
mod escapes_support;

use std::time::Duration;

use escapes_support::{Looper, assert_no_escape, both, config, registered, world};
use redirect_tests::{Agent, assert_cleanup_refused};

#[test]
fn a_refused_cleanup_beside_a_live_agent_lets_nothing_escape() {
    let w = world("esc-cleanup");
    let agent = Agent::start(&w.fx, &config(&w)).unwrap();
    let looper = Looper::start(&w, &w.app);
    let pid = agent.pid().unwrap();
    let tries = 5;
    for _ in 0..tries {
        assert_cleanup_refused(w.fx.pin_dir(), pid).unwrap();
        looper.wait_redirected(5);
    }
    // Nothing was removed: both workloads are still registered and the pins are there.
    assert_eq!(registered(&agent), both(&w));
    let c = looper.finish(Duration::from_millis(200));
    println!("{tries} refused cleanups, looped connects: {c:?}");
    assert_no_escape(c, "refused cleanup");
    assert!(c.redirected >= 5 * tries, "the loop ran too little: {c:?}");
}
