//! Issue #12, file source: bad input, hostile files, bad cgroup paths and a recreated cgroup never
//! let a redirected workload's traffic escape. Each test loops connects from the workload while
//! the bad thing happens and asserts 0 escaped.
mod escapes_support;

use std::{fs, io::Write as _, os::unix::fs::symlink, time::Duration};

use escapes_support::{Looper, assert_no_escape, both, config, eventually, registered, world};
use nix::sys::signal::Signal;
use redirect_tests::Agent;

/// Item 1: an empty file, a file without `workloads`, a top-level typo and an unknown nested key
/// are refused with an error naming the file and the key; nothing is removed.
#[test]
fn empty_typo_and_unknown_keys_change_nothing() {
    let w = world("esc-empty");
    let agent = Agent::start(&w.fx, &config(&w)).unwrap();
    let looper = Looper::start(&w, &w.app);
    let path = agent.config_path().to_path_buf();
    let good = config(&w);

    // `: > cfg.yaml`, in place.
    fs::File::create(&path).unwrap();
    let line = agent.wait_log("no `workloads` key").unwrap();
    assert!(line.contains(&path.display().to_string()), "{line}");
    looper.wait_redirected(20);

    agent
        .write_config(&good.replace("workloads:", "workload:"))
        .unwrap();
    let line = agent.wait_log("unknown key `workload`").unwrap();
    assert!(line.contains(&path.display().to_string()), "{line}");
    looper.wait_redirected(20);

    agent
        .write_config(&good.replace(
            "outboundIPRangeExclusionList",
            "outboundIPRangeExclusionLst",
        ))
        .unwrap();
    agent
        .wait_log("unknown key `mesh.outboundIPRangeExclusionLst`")
        .unwrap();
    agent
        .write_config(&good.replace("    proxyCgroup:", "    annotatons: {}\n    proxyCgroup:"))
        .unwrap();
    agent.wait_log("`workloads.0.annotatons`").unwrap();
    looper.wait_redirected(20);

    assert_eq!(registered(&agent), both(&w));
    assert_no_escape(looper.finish(Duration::from_millis(300)), "bad configs");

    // Saying so explicitly does remove everything.
    agent.write_config("workloads: []\n").unwrap();
    eventually("every workload removed", || registered(&agent).is_empty());
}

/// Item 1: an in-place write that truncates, writes half, then the rest (one open, pauses in
/// between) is applied only once the writer closes the file.
#[test]
fn a_slow_in_place_write_is_applied_only_when_complete() {
    let w = world("esc-inplace");
    let mut agent = Agent::start(&w.fx, &config(&w)).unwrap();
    let looper = Looper::start(&w, &w.app);
    let good = config(&w);
    // The rewrite changes the excluded CIDR, so it applies as a new generation.
    let next = good.replace("198.18.0.11/32", "198.18.0.12/32");
    let (half, rest) = next.split_at(next.find("  - name: other").unwrap());
    let generation = agent.generation();
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(agent.config_path())
            .unwrap();
        std::thread::sleep(Duration::from_millis(400));
        f.write_all(half.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        f.write_all(rest.as_bytes()).unwrap();
    }
    agent.wait_generation(generation + 1).unwrap();
    assert_eq!(registered(&agent), both(&w));
    // No pass ever removed a workload on the way.
    for line in agent.log().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        assert_eq!(v["removed"].as_u64().unwrap_or(0), 0, "{line}");
    }
    assert_no_escape(looper.finish(Duration::from_millis(300)), "in-place write");
}

/// Item 7: a FIFO, a symlink to /dev/zero, a file over 16 MiB and an alias bomb are refused
/// quickly and change nothing, and SIGTERM still stops the agent.
#[test]
fn hostile_files_are_refused_and_sigterm_still_works() {
    let w = world("esc-hostile");
    let mut agent = Agent::start(&w.fx, &config(&w)).unwrap();
    let looper = Looper::start(&w, &w.app);
    let path = agent.config_path().to_path_buf();
    let dir = path.parent().unwrap().to_path_buf();

    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    fs::rename(&fifo, &path).unwrap();
    agent.wait_log("is a FIFO, not a regular file").unwrap();
    looper.wait_redirected(10);

    let link = dir.join("zero");
    symlink("/dev/zero", &link).unwrap();
    fs::rename(&link, &path).unwrap();
    agent.wait_log("is a character device").unwrap();
    looper.wait_redirected(10);

    let big = dir.join("big");
    fs::File::create(&big)
        .unwrap()
        .set_len((16 << 20) + 1)
        .unwrap();
    fs::rename(&big, &path).unwrap();
    agent.wait_log("the limit is 16777216 bytes").unwrap();
    looper.wait_redirected(10);

    let mut bomb = String::from("a0: &a0 [\"lol\"]\n");
    for i in 1..=9 {
        let refs = vec![format!("*a{}", i - 1); 10].join(",");
        bomb.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    agent.write_config(&bomb).unwrap();
    agent.wait_log("alias bomb").unwrap();

    assert_eq!(registered(&agent), both(&w));
    assert_no_escape(looper.finish(Duration::from_millis(300)), "hostile files");

    // A FIFO again, then SIGTERM: the source must not be stuck in a read.
    let fifo = dir.join("fifo2");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    fs::rename(&fifo, &path).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let status = agent
        .signal_and_wait(Signal::SIGTERM, Duration::from_secs(10))
        .unwrap();
    assert!(status.success(), "{status}");
}

/// Items 5 and 6: a cgroup path outside --cgroup-root, a regular file, and a cgroup deeper than
/// the datapath's ancestor walk are refused naming file, workload, key and value.
#[test]
fn bad_cgroup_paths_are_refused_and_change_nothing() {
    let w = world("esc-paths");
    let agent = Agent::start(&w.fx, &config(&w)).unwrap();
    let looper = Looper::start(&w, &w.app);
    let good = config(&w);
    let pod2 = w.pod2.display().to_string();

    let outside = format!("{pod2}/../../x");
    agent.write_config(&good.replace(&pod2, &outside)).unwrap();
    let line = agent.wait_log("workloads[1].cgroup").unwrap();
    for part in ["demo/other", &outside, "`.` or `..`"] {
        assert!(line.contains(part), "{part}: {line}");
    }

    let file = w.fx.cgroup_root().join("pod1/cgroup.procs");
    agent
        .write_config(&good.replace(&pod2, &file.display().to_string()))
        .unwrap();
    agent
        .wait_log("exists but is not a directory on the cgroup2 filesystem")
        .unwrap();

    // The fixture root is level 1 below the cgroup2 mount: 16 more levels make 17.
    let deep = w.fx.cgroup(&vec!["d"; 16].join("/")).unwrap();
    agent
        .write_config(&good.replace(&pod2, &deep.display().to_string()))
        .unwrap();
    let line = agent.wait_log("MAX_CGROUP_DEPTH").unwrap();
    assert!(line.contains("17 levels"), "{line}");
    looper.wait_redirected(20);

    assert_eq!(registered(&agent), both(&w));
    assert_no_escape(
        looper.finish(Duration::from_millis(300)),
        "bad cgroup paths",
    );
}

/// Item 3: a workload cgroup removed and created again at the same path is registered again by
/// its new inode, the stale key goes, and the new cgroup's connects are redirected.
#[test]
fn a_recreated_cgroup_is_registered_again() {
    let w = world("esc-recreate");
    let agent = Agent::start(&w.fx, &config(&w)).unwrap();
    let old = redirect_tests::cgroup_id(&w.pod2).unwrap();
    assert!(registered(&agent).contains(&old));
    fs::remove_dir(&w.pod2).unwrap();
    fs::create_dir(&w.pod2).unwrap();
    let new = redirect_tests::cgroup_id(&w.pod2).unwrap();
    assert_ne!(old, new);
    eventually("the new inode registered and the stale key removed", || {
        let r = registered(&agent);
        r.contains(&new) && !r.contains(&old)
    });
    let looper = Looper::start(&w, &w.pod2);
    assert_no_escape(
        looper.finish(Duration::from_millis(500)),
        "recreated cgroup",
    );
}
