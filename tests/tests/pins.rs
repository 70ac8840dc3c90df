//! What lives in the pin directory (issues #16, #13): `inspect` says so, and exits non-zero,
//! when maps are pinned but nothing is attached; `inspect | head` exits quietly; a restart
//! releases link pins of programs this build does not have; `cleanup` removes only the names
//! redirect creates, so a shared directory keeps other software's pins.
use std::{
    fs,
    io::Read as _,
    path::Path,
    process::{Command, Stdio},
};

use redirect_tests::{Agent, Fixture, helper_bin};

fn config(pod: &Path) -> String {
    format!(
        "proxy: {{mode: sidecar, outboundPort: 15001, uid: 1337}}\nworkloads:\n  - {{name: app, namespace: t, cgroup: {}}}\n",
        pod.display()
    )
}

fn agent_cmd(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(helper_bin("redirect-agent").unwrap())
        .args(args)
        .arg("--bpffs-dir")
        .arg(dir)
        .output()
        .unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn inspect_says_when_nothing_is_attached_and_survives_a_closed_pipe() {
    let fx = Fixture::new("pins-inspect").unwrap();
    let pod = fx.cgroup("pod").unwrap();
    let mut agent = Agent::start(&fx, &config(&pod)).unwrap();
    let dir = agent.bpffs().to_path_buf();
    let ok = agent_cmd(&["inspect"], &dir);
    assert!(ok.status.success(), "{ok:?}");
    assert!(!String::from_utf8_lossy(&ok.stdout).contains("not attached"));

    // `inspect | head -1`: the pipe closes after one line.
    let mut child = Command::new(helper_bin("redirect-agent").unwrap())
        .arg("inspect")
        .arg("--bpffs-dir")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(status.success(), "{status:?} {err}");

    // Detach everything by hand (what a failed start on an old kernel used to leave): maps stay.
    agent.kill9().unwrap();
    for n in names(&dir).iter().filter(|n| n.starts_with("link_")) {
        fs::remove_file(dir.join(n)).unwrap();
    }
    let out = agent_cmd(&["inspect"], &dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.starts_with("WARNING: not attached: redirect_"),
        "{stdout}"
    );
    assert!(stderr.contains("interception is OFF"), "{stderr}");
    assert!(stdout.contains("WORKLOADS (1)"), "{stdout}");
}

#[test]
fn restart_releases_links_of_programs_this_build_does_not_have() {
    let fx = Fixture::new("pins-unowned").unwrap();
    let pod = fx.cgroup("pod").unwrap();
    let mut agent = Agent::start(&fx, &config(&pod)).unwrap();
    let dir = agent.bpffs().to_path_buf();
    agent.kill9().unwrap();
    // An upgrade renamed connect4: the old build's link is pinned under a name this build does
    // not have. It stays attached until the new agent releases it.
    let old = names(&dir)
        .into_iter()
        .find(|n| n.starts_with("link_redirect_connect4_"))
        .unwrap();
    let renamed = old.replace("connect4", "old_connect4");
    fs::rename(dir.join(&old), dir.join(&renamed)).unwrap();
    agent.restart().unwrap();
    let after = names(&dir);
    assert!(!after.contains(&renamed), "{after:?}");
    assert!(after.contains(&old), "{after:?}");
}

#[test]
fn cleanup_leaves_other_softwares_pins_alone() {
    let fx = Fixture::new("pins-cleanup").unwrap();
    let pod = fx.cgroup("pod").unwrap();
    let mut agent = Agent::start(&fx, &config(&pod)).unwrap();
    let dir = agent.bpffs().to_path_buf();
    agent.kill9().unwrap();
    // Another program's map pinned in the same directory.
    let foreign = dir.join("other_software_map");
    let st = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&foreign)
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "1", "name", "other",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let out = agent_cmd(&["cleanup"], &dir);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(names(&dir), vec!["other_software_map".to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("left 1 other"), "{text}");
    fs::remove_file(&foreign).unwrap();
}
