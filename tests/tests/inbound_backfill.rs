//! A proxy that was already listening before the agent's first install never passed sockops
//! `TCP_LISTEN_CB`, so it is not in `IN_LISTEN`; the agent backfills it from the proxy cgroup's
//! processes (pidfd_getfd of the listening socket). Real kernel, file source, the inbound test
//! world (tests/tests/inbound_support).
mod inbound_support;

use inbound_support::*;

#[test]
fn a_proxy_listening_before_the_agent_starts_gets_its_inbound_connections() {
    let w = world("backfill");
    let _apps = w.apps(&[8080]);
    // The proxy listens first (dual stack), with no program attached yet.
    let proxy = w.proxy(&["[::]:15006"]);
    let agent = w.agent(&[]);
    let v = w.report_from_node(&format!("{POD4}:8080"));
    assert_eq!(v["proxy"]["local"], format!("[::ffff:{POD4}]:8080"), "{v}");
    assert_eq!(w.who(&format!("[{POD6}]:8080")), "proxy");
    assert_eq!(counter(&agent, "no_listener"), 0);
    assert_eq!(counter(&agent, "steered"), 2);
    // Backfilled entries are the listener's own: they leave when it closes (fail closed).
    drop(proxy);
    assert!(w.who(&format!("{POD4}:8080")).starts_with("failed"));
}
