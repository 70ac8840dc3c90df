//! The e2e scenarios (tests/src/e2e/scenarios) on this machine: real netns, cgroups, proxy and the
//! real agent binary with the kubernetes source, run with the DaemonSet's capabilities against the
//! fake API of kube_support served over a socket. `cargo xtask e2e-kind` runs the same scenarios
//! in a kind cluster. Needs root, and the agent and helper binaries built (`cargo build`).
mod e2e_local_support;
mod kube_support;

use e2e_local_support::{names, run};

/// The scenario of each test below, in file order.
const TESTED: [&str; 6] = [
    "fsm-000-ip-range-exclusion",
    "asm-003-pod-over-namespace",
    "istio-001-include-ranges",
    "bad-annotation",
    "agent-rollout",
    "asm-003-exclude-inbound-ports",
];

fn scenario(name: &str) {
    if let Err(e) = run(name) {
        panic!("scenario {name}: {e:#}");
    }
}

#[test]
fn every_scenario_file_has_a_test() {
    assert_eq!(names().unwrap(), TESTED);
}

#[test]
fn fsm_000_ip_range_exclusion() {
    scenario(TESTED[0]);
}

#[test]
fn asm_003_pod_over_namespace() {
    scenario(TESTED[1]);
}

#[test]
fn istio_001_include_ranges() {
    scenario(TESTED[2]);
}

#[test]
fn bad_annotation() {
    scenario(TESTED[3]);
}

#[test]
fn agent_rollout() {
    scenario(TESTED[4]);
}

#[test]
fn asm_003_exclude_inbound_ports() {
    scenario(TESTED[5]);
}
