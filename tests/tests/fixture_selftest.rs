//! Tests of the fixtures themselves, against the real kernel (root required).

mod common;

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

use common::{connect, start_proxy};
use redirect_tests::{
    Fixture, cgroup_id, cgroup2_mount, ensure_bpffs, serve_identity, sweep_stale,
};

/// What a fixture created, to check after it is gone.
struct Trace {
    cgroup: PathBuf,
    netns: PathBuf,
    pins: PathBuf,
    pids: Vec<u32>,
}

impl Trace {
    fn of(fx: &Fixture) -> Trace {
        Trace {
            cgroup: fx.cgroup_root().to_path_buf(),
            netns: fx.netns_path(),
            pins: fx.pin_dir().to_path_buf(),
            pids: Vec::new(),
        }
    }

    fn assert_gone(&self) {
        assert!(
            !self.cgroup.exists(),
            "{} left behind",
            self.cgroup.display()
        );
        assert!(!self.netns.exists(), "{} left behind", self.netns.display());
        assert!(!self.pins.exists(), "{} left behind", self.pins.display());
        for pid in &self.pids {
            // Our direct children stay zombies until reaped; anything else must be gone.
            let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let alive = state
                .rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'));
            assert!(!alive, "pid {pid} still running: {state}");
        }
    }
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    c
}

#[test]
fn client_in_child_cgroup_reaches_identity_server() {
    let fx = Fixture::new("identity").unwrap();
    fx.add_addr("198.18.0.10/32").unwrap();
    let srv = serve_identity(&fx, "198.18.0.10:80".parse().unwrap(), "backend-a").unwrap();
    let cg = fx.cgroup("pod1/app").unwrap();

    let (v, code) = connect(&fx, &cg, "198.18.0.10:80", &["--send", "hello"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["reply"], "backend-a\n");
    assert_eq!(v["peer"], "198.18.0.10:80");
    assert!(v["error"].is_null());
    assert_eq!(srv.connections(), 1);
    assert_eq!(srv.peers()[0].to_string(), v["local"].as_str().unwrap());
}

#[test]
fn spawned_process_is_in_cgroup_and_netns() {
    let fx = Fixture::new("placement").unwrap();
    let cg = fx.cgroup("pod1/app").unwrap();
    let out = fx
        .run_in(
            &cg,
            &mut sh("cat /proc/self/cgroup; readlink /proc/self/ns/net"),
        )
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let rel = cg.strip_prefix(cgroup2_mount().unwrap()).unwrap();
    let want = format!("0::/{}", rel.display());
    assert!(text.lines().any(|l| l == want), "want {want} in {text}");
    let netns_ino = fx.netns_file().metadata().unwrap().ino();
    assert!(text.contains(&format!("net:[{netns_ino}]")), "{text}");
    assert_eq!(cgroup_id(&cg).unwrap(), fs::metadata(&cg).unwrap().ino());
    // /sys is not remounted, so the process still sees the cgroup2 mount (unlike ip netns exec).
    let out = fx
        .run_in(&cg, &mut sh(&format!("test -d {}", cg.display())))
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn ipv6_and_v4_mapped_destinations() {
    let fx = Fixture::new("ipv6").unwrap();
    fx.add_addr("198.18.0.10/32").unwrap();
    fx.add_addr("fd00:198:18::10/128").unwrap();
    let _v6 = serve_identity(&fx, "[fd00:198:18::10]:80".parse().unwrap(), "six").unwrap();
    let _v4 = serve_identity(&fx, "198.18.0.10:81".parse().unwrap(), "four").unwrap();
    let cg = fx.cgroup("app").unwrap();

    let (v, code) = connect(&fx, &cg, "[fd00:198:18::10]:80", &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["reply"], "six\n");
    assert_eq!(v["peer"], "[fd00:198:18::10]:80");

    // An AF_INET6 socket reaching an IPv4 server: getpeername shows the mapped form.
    let (v, code) = connect(&fx, &cg, "[::ffff:198.18.0.10]:81", &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["reply"], "four\n");
    assert_eq!(v["peer"], "[::ffff:198.18.0.10]:81");
}

#[test]
fn connect_failure_is_reported_as_json() {
    let fx = Fixture::new("refused").unwrap();
    fx.add_addr("198.18.0.11/32").unwrap();
    let cg = fx.cgroup("app").unwrap();
    let (v, code) = connect(&fx, &cg, "198.18.0.11:9", &[]);
    assert_eq!(code, 1);
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().starts_with("connect:"), "{v}");
    assert!(v["peer"].is_null());
}

#[test]
fn in_netns_binds_inside_the_namespace_only() {
    let fx = Fixture::new("in-netns").unwrap();
    fx.add_addr("198.18.0.12/32").unwrap();
    let addr: SocketAddr = "198.18.0.12:0".parse().unwrap();
    let l = fx.in_netns(|| TcpListener::bind(addr)).unwrap().unwrap();
    assert_eq!(l.local_addr().unwrap().ip(), addr.ip());
    // The caller's thread stayed in the host netns, where the address does not exist.
    assert!(TcpListener::bind(addr).is_err());
}

#[test]
fn cgroup_paths_cannot_escape_the_subtree() {
    let fx = Fixture::new("escape").unwrap();
    assert!(fx.cgroup("../outside").is_err());
    assert!(fx.cgroup("/abs").is_err());
    let outside = cgroup2_mount().unwrap();
    assert!(fx.spawn_in(&outside, &mut Command::new("true")).is_err());
}

#[test]
fn drop_removes_cgroups_netns_pins_and_processes() {
    let fx = Fixture::new("drop").unwrap();
    let mut trace = Trace::of(&fx);
    let app = fx.cgroup("pod1/app").unwrap();
    let sidecar = fx.cgroup("pod1/sidecar").unwrap();
    fx.cgroup("pod2/deep/er").unwrap();
    let mut child = fx
        .spawn_in(&app, Command::new("sleep").arg("1000"))
        .unwrap();
    trace.pids.push(child.id());
    // A grandchild orphaned by its shell must be killed too, not leak into the host.
    let out = fx
        .run_in(&sidecar, &mut sh("sleep 1000 >/dev/null 2>&1 & echo $!"))
        .unwrap();
    let orphan: u32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    trace.pids.push(orphan);
    assert!(Path::new(&format!("/proc/{orphan}")).exists());
    fs::create_dir(fx.pin_dir().join("maps")).unwrap();
    fs::write(fx.pin_dir().join("maps").join("not-a-pin"), b"x").ok();
    fx.ip(&["route", "add", "198.19.0.0/16", "dev", "lo"])
        .unwrap();
    drop(fx);
    trace.assert_gone();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

#[test]
fn drop_cleans_up_when_the_test_panics() {
    let trace: Mutex<Option<(Trace, Child)>> = Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let fx = Fixture::new("panics").unwrap();
        let cg = fx.cgroup("app").unwrap();
        let child = fx.spawn_in(&cg, Command::new("sleep").arg("1000")).unwrap();
        let mut t = Trace::of(&fx);
        t.pids.push(child.id());
        *trace.lock().unwrap() = Some((t, child));
        panic!("deliberate panic inside a fixture");
    });
    assert!(result.is_err());
    let (t, mut child) = trace.into_inner().unwrap().unwrap();
    t.assert_gone();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
}

#[test]
fn sweep_removes_leftovers_of_dead_processes_only() {
    let fx = Fixture::new("live").unwrap();
    // A pid that certainly existed and is now dead (reaped), standing in for a crashed run.
    let mut c = Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let name = format!("redirect-test-crashed-{dead}-0");
    let cg = cgroup2_mount().unwrap().join(&name);
    fs::create_dir_all(cg.join("pod/app")).unwrap();
    redirect_tests::ip(&["netns", "add", &name]).unwrap();
    let pins = ensure_bpffs().unwrap().join(&name);
    fs::create_dir_all(pins.join("sub")).unwrap();

    let removed = sweep_stale().unwrap();
    assert!(!cg.exists(), "swept: {removed:?}");
    assert!(!redirect_tests::netns_path(&name).exists());
    assert!(!pins.exists());
    // The live fixture of this process is untouched.
    assert!(fx.cgroup_root().exists());
    assert!(fx.netns_path().exists());
    assert!(fx.pin_dir().exists());
}

#[test]
fn testproxy_tag_mode_without_redirect_reports_unknown() {
    let fx = Fixture::new("proxy-tag").unwrap();
    let proxy_cg = fx.cgroup("pod1/proxy").unwrap();
    let app_cg = fx.cgroup("pod1/app").unwrap();
    let proxy = start_proxy(&fx, &proxy_cg, &["--v6"]);
    // All listeners are bound before the first line; the second may still be in the pipe.
    proxy
        .wait_for_line(|l| l == "listening [::1]:15001", Duration::from_secs(5))
        .unwrap();
    assert_eq!(proxy.lines()[0], "listening 127.0.0.1:15001");

    let (v, code) = connect(&fx, &app_cg, "127.0.0.1:15001", &["--send", "GET /"]);
    assert_eq!(code, 0, "{v}");
    let reply = v["reply"].as_str().unwrap();
    let want = format!("proxy orig=unknown peer={}\n", v["local"].as_str().unwrap());
    assert_eq!(reply, want);

    let (v, code) = connect(&fx, &app_cg, "[::1]:15001", &[]);
    assert_eq!(code, 0, "{v}");
    assert!(
        v["reply"]
            .as_str()
            .unwrap()
            .starts_with("proxy orig=unknown peer=[::1]:")
    );
    let log = proxy.wait_for_line(
        |l| l.starts_with("orig=unknown peer=[::1]"),
        Duration::from_secs(5),
    );
    assert!(log.is_ok(), "{:?}", proxy.lines());
}
