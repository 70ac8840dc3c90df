//! Issue #12, the agent process: a second agent on the same pin directory and SIGHUP never
//! let a redirected workload's traffic escape.
mod escapes_support;

use std::{process::Command, time::Duration};

use escapes_support::{Looper, assert_no_escape, both, config, registered, world};
use nix::sys::signal::Signal;
use redirect_tests::{Agent, helper_bin};

/// Item 4: a second agent with another config on the same --bpffs-dir exits non-zero naming
/// the first one's pid and changes nothing; `inspect` works meanwhile; after kill -9 the lock
/// is gone and a restart adopts.
#[test]
fn a_second_agent_exits_naming_the_holder_and_changes_nothing() {
    let w = world("esc-second");
    let mut agent = Agent::start(&w.fx, &config(&w)).unwrap();
    let looper = Looper::start(&w, &w.app);
    let other_config = std::env::temp_dir().join(format!("{}-second.yaml", w.fx.name()));
    std::fs::write(&other_config, "workloads: []\n").unwrap();
    let out = Command::new(helper_bin("redirect-agent").unwrap())
        .args(["run", "--config"])
        .arg(&other_config)
        .arg("--bpffs-dir")
        .arg(w.fx.pin_dir())
        .arg("--cgroup-root")
        .arg(w.fx.cgroup_root())
        .env("REDIRECT_ADMIN_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    std::fs::remove_file(&other_config).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second agent ran: {stderr}");
    let pid = agent.pid().unwrap();
    assert!(stderr.contains(&format!("pid {pid}")), "{stderr}");
    assert!(
        stderr.contains(&w.fx.pin_dir().display().to_string()),
        "{stderr}"
    );
    // Read-only commands work while the lock is held.
    assert_eq!(registered(&agent), both(&w));
    assert_no_escape(looper.finish(Duration::from_millis(300)), "second agent");

    agent.kill9().unwrap();
    agent.restart().unwrap();
    assert_eq!(registered(&agent), both(&w));
}

/// Item 10: SIGHUP re-reads the config and is logged; the agent keeps running.
#[test]
fn sighup_rereads_and_never_exits() {
    let w = world("esc-hup");
    let mut agent = Agent::start(&w.fx, &config(&w)).unwrap();
    let looper = Looper::start(&w, &w.app);
    let pid = nix::unistd::Pid::from_raw(agent.pid().unwrap() as i32);
    for _ in 0..3 {
        nix::sys::signal::kill(pid, Signal::SIGHUP).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.wait_log("SIGHUP: re-reading the config").unwrap();
    looper.wait_redirected(10);
    assert!(agent.running(), "agent exited on SIGHUP:\n{}", agent.log());
    assert_eq!(registered(&agent), both(&w));
    assert_no_escape(looper.finish(Duration::from_millis(200)), "SIGHUP");
}
