//! Issue #12, inbound: a client on the "client node" loops connects to a port of the pod that
//! must stay steered to the proxy while the pod's inbound policy is edited, and every test
//! asserts that none of them reached the app (counted by the app's own listener and by the
//! client) and that the loop really ran.
mod escapes_support;
mod inbound_support;

use std::time::Duration;

use escapes_support::inbound::{NetnsLooper, assert_inbound_no_escape};
use inbound_support::{POD4, POD6, world};

const EXCLUDE: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
const INCLUDE: &str = "traffic.sidecar.istio.io/includeInboundPorts";

/// Item (a): port 8080 stays steered in every state while port 8081 flips between included and
/// excluded (by the exclude list, then by the include list), three rounds; after each edit 8081
/// lands where the new state says.
#[test]
fn editing_the_inbound_policy_never_lets_a_steered_port_reach_the_app() {
    let w = world("esc-edit");
    let apps = w.apps(&[8080, 8081]);
    let mut agent = w.agent(&[]);
    let _proxy =
        inbound_support::start_proxy(&w.proxy_cg, w.fx.netns_file(), &["[::]:15006"], true);
    let v4 = NetnsLooper::start(w.node.netns_file(), &format!("{POD4}:8080"));
    let v6 = NetnsLooper::start(w.node.netns_file(), &format!("[{POD6}]:8080"));
    v4.wait_for("proxy", 20);
    v6.wait_for("proxy", 20);
    let states: [(&[(&str, &str)], &str); 4] = [
        (&[(EXCLUDE, "8081")], "app-8081"),
        (&[(INCLUDE, "8080,8081")], "proxy"),
        (&[(INCLUDE, "8080")], "app-8081"),
        (&[], "proxy"),
    ];
    let mut edits = 0;
    for _round in 0..3 {
        for (annotations, want) in states {
            agent.reconfigure(&w.config(annotations)).unwrap();
            edits += 1;
            assert_eq!(
                w.who(&format!("{POD4}:8081")),
                want,
                "8081 after {annotations:?}"
            );
            assert_eq!(w.who(&format!("[{POD6}]:8081")), want, "{annotations:?}");
            // A few looped connects under each state.
            v4.wait_for("proxy", 5);
        }
    }
    v4.wait_for("proxy", 20);
    let app8080 = apps[0].connections();
    let (t4, t6) = (v4.finish(), v6.finish());
    println!("{edits} edits applied");
    assert_inbound_no_escape(&t4, app8080, 100, "v4 loop across inbound edits");
    assert_inbound_no_escape(&t6, 0, 100, "v6 loop across inbound edits");
    // Each state was applied as its own policy id: the agent logged every generation.
    assert!(agent.generation() >= edits, "{}", agent.log());
}

/// Item (b): many edits in a row (each a new inbound rule set, so a new policy id and a retired
/// one) while connects are in flight; the loop keeps going past the grace period so the retired
/// ids' entries are deleted under it too.
#[test]
fn connects_in_flight_across_many_policy_id_swaps_never_reach_the_app() {
    let w = world("esc-swap");
    let apps = w.apps(&[8080]);
    let mut agent = w.agent(&[]);
    let _proxy =
        inbound_support::start_proxy(&w.proxy_cg, w.fx.netns_file(), &["[::]:15006"], true);
    let looper = NetnsLooper::start(w.node.netns_file(), &format!("{POD4}:8080"));
    looper.wait_for("proxy", 20);
    let first = agent.generation();
    let edits = 40u16;
    for i in 0..edits {
        // Another excluded port each time: a distinct entry set, so a swap of the policy id.
        let port = (9000 + i).to_string();
        agent.write_config(&w.config(&[(EXCLUDE, &port)])).unwrap();
        std::thread::sleep(Duration::from_millis(25));
    }
    agent.reconfigure(&w.config(&[])).unwrap();
    let swaps = agent.generation() - first;
    // Past the grace period (2 s): the last retired sets are deleted while the loop runs.
    std::thread::sleep(Duration::from_millis(2500));
    looper.wait_for("proxy", 20);
    let app = apps[0].connections();
    let t = looper.finish();
    println!("{swaps} policy-id swaps applied of {edits} edits written");
    assert!(
        swaps >= 10,
        "too few swaps applied ({swaps}): {}",
        agent.log()
    );
    assert_inbound_no_escape(&t, app, 200, "loop across policy-id swaps");
}
