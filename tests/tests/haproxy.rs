//! Interop with a real, unmodified third-party proxy: HAProxy from Debian as a transparent
//! forwarder (`server orig 0.0.0.0:0` in a `mode tcp` section, which connects to the address
//! HAProxy reads with getsockopt(SOL_IP, SO_ORIGINAL_DST)). HAProxy runs as its own uid, named
//! as the proxy uid in the agent config so that its upstream connects are not redirected back
//! to itself. The same config is first checked against iptables REDIRECT, the mechanism it was
//! written for. `cargo xtask test` installs haproxy and iptables.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use redirect_tests::{
    Agent, Fixture, IdentityServer, Reached, Spawned, probe_json, serve_identity,
};

const HAPROXY_UID: u32 = 1338;
/// HAProxy's upstream connects leave from here, so a server can tell they came through HAProxy.
const HAPROXY_SOURCE: &str = "198.18.0.99";

/// Where HAProxy's config lives; removed on drop.
struct ConfigDir(PathBuf);

impl Drop for ConfigDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn haproxy_config() -> String {
    format!(
        "global\n    maxconn 64\n    uid {HAPROXY_UID}\n    gid {HAPROXY_UID}\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 10s\n    timeout server 10s\n\
         listen outbound\n    bind 127.0.0.1:15001\n    server orig 0.0.0.0:0 source {HAPROXY_SOURCE}\n"
    )
}

/// True once the netns of `pid` has a TCP listener on 127.0.0.1:15001.
fn listening(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/net/tcp")).is_ok_and(|t| {
        t.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == "0100007F:3A99" && f[3] == "0A"
        })
    })
}

/// Starts `haproxy -db` in `cgroup` and waits until it listens. HAProxy drops to HAPROXY_UID
/// itself (global `uid`/`gid`) once bound, the way it is normally deployed. A missing haproxy
/// fails the test: a skipped interop test proves nothing.
fn start_haproxy(fx: &Fixture, cgroup: &Path) -> (Spawned, ConfigDir) {
    let dir = ConfigDir(std::env::temp_dir().join(format!("{}-haproxy", fx.name())));
    fs::create_dir_all(&dir.0).unwrap();
    let cfg = dir.0.join("haproxy.cfg");
    fs::write(&cfg, haproxy_config()).unwrap();
    let mut cmd = Command::new("haproxy");
    cmd.args(["-db", "-f"]).arg(&cfg);
    let mut hap = fx
        .spawn_logged(cgroup, &mut cmd)
        .expect("haproxy is not installed (cargo xtask test installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(hap.pid()) {
        if let Ok(Some(status)) = hap.child_mut().try_wait() {
            panic!("haproxy exited ({status}): {}", hap.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "haproxy did not listen: {}",
            hap.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (hap, dir)
}

/// Two destinations, each a server answering its own name.
fn destinations(fx: &Fixture) -> Vec<(String, IdentityServer)> {
    for a in ["198.18.0.10/32", "198.18.0.11/32", "198.18.0.99/32"] {
        fx.add_addr(a).unwrap();
    }
    ["198.18.0.10:80", "198.18.0.11:80"]
        .iter()
        .map(|d| {
            let name = format!("backend {d}");
            (
                d.to_string(),
                serve_identity(fx, d.parse().unwrap(), &name).unwrap(),
            )
        })
        .collect()
}

/// Each request reaches the server it was addressed to, through HAProxy.
fn assert_forwarded(fx: &Fixture, app: &Path, dests: &[(String, IdentityServer)]) {
    for (dst, server) in dests {
        let before = server.connections();
        let (r, v) = probe_json(fx, app, dst, &["--send", "GET / HTTP/1.0\r\n\r\n"]).unwrap();
        assert_eq!(r, Reached::Server(format!("backend {dst}")), "{dst}: {v}");
        assert_eq!(v["peer"], dst.as_str(), "getpeername: {v}");
        let peers = server.peers();
        assert_eq!(peers.len(), before + 1, "{dst}");
        assert_eq!(
            peers.last().unwrap().ip().to_string(),
            HAPROXY_SOURCE,
            "{dst} was reached directly, not through HAProxy"
        );
    }
}

#[test]
fn haproxy_config_forwards_with_iptables_redirect() {
    let fx = Fixture::new("haproxy-iptables").unwrap();
    let dests = destinations(&fx);
    let tools = fx.cgroup("tools").unwrap();
    let uid = HAPROXY_UID.to_string();
    let rule = [
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "198.18.0.0/24",
        "--dport",
        "80",
        "-m",
        "owner",
        "!",
        "--uid-owner",
        &uid,
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ];
    let out = fx
        .run_in(&tools, Command::new("iptables").args(rule))
        .expect("iptables unavailable (cargo xtask test installs it)");
    assert!(
        out.status.success(),
        "iptables: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_hap, _dir) = start_haproxy(&fx, &fx.cgroup("pod1/haproxy").unwrap());
    assert_forwarded(&fx, &fx.cgroup("pod1/app").unwrap(), &dests);
}

#[test]
fn haproxy_forwards_to_the_original_destination() {
    let fx = Fixture::new("haproxy-ebpf").unwrap();
    let dests = destinations(&fx);
    let pod = fx.cgroup("pod1").unwrap();
    let config = format!(
        "proxy: {{mode: sidecar, outboundPort: 15001, uid: {HAPROXY_UID}}}\n\
         workloads:\n  - {{name: pod1, namespace: test, cgroup: {}}}\n",
        pod.display()
    );
    let agent = Agent::start(&fx, &config).unwrap();
    let (_hap, _dir) = start_haproxy(&fx, &fx.cgroup("pod1/haproxy").unwrap());
    assert_forwarded(&fx, &fx.cgroup("pod1/app").unwrap(), &dests);

    // The kernel side of the story: two redirects, two upstream connects exempted by HAProxy's
    // uid, and the original destinations answered to HAProxy's getsockopt.
    let v = agent.inspect().unwrap();
    assert_eq!(v["counters"]["redirected"], 2, "{v}");
    assert_eq!(v["counters"]["bypass_proxy"], 2, "{v}");
    let answered = v["original_destinations"]["counters"]["answered"]
        .as_u64()
        .unwrap();
    assert!(answered >= 2, "{v}");
}
