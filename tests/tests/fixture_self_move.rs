//! A test that moves the test process itself into a fixture cgroup. It lives in its own test
//! binary: while the process sits in the fixture's cgroup every process it forks starts there,
//! and the fixture's teardown would kill helpers of concurrently running tests.

use redirect_tests::{Fixture, cgroup_of, move_pid};

#[test]
fn drop_moves_the_test_process_out_instead_of_killing_it() {
    let before = cgroup_of(std::process::id()).unwrap();
    let fx = Fixture::new("self").unwrap();
    let (root, netns, pins) = (
        fx.cgroup_root().to_path_buf(),
        fx.netns_path(),
        fx.pin_dir().to_path_buf(),
    );
    let cg = fx.cgroup("self").unwrap();
    move_pid(std::process::id(), &cg).unwrap();
    assert_eq!(cgroup_of(std::process::id()).unwrap(), cg);
    drop(fx);
    // Still alive (we are running this), back where we started, and nothing left behind.
    assert_eq!(cgroup_of(std::process::id()).unwrap(), before);
    assert!(!root.exists() && !netns.exists() && !pins.exists());
}
