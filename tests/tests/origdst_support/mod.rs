//! Helpers of the original-destination tests: redirect-sockprobe proxies and clients, spawned in
//! a fixture's cgroup and in any network namespace (two pods, or a pod and a node).
#![allow(dead_code)] // each test binary uses a different subset

use std::fs::File;
use std::io::{BufRead, BufReader, Lines, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use redirect_tests::{Agent, Fixture, Spawned};
use serde_json::Value;

pub const SOCKPROBE: &str = env!("CARGO_BIN_EXE_redirect-sockprobe");
pub const EINVAL: i64 = libc::EINVAL as i64;

/// What SO_ORIGINAL_DST answered with a full buffer.
pub fn answered(addr: &str, optlen: u64) -> Value {
    serde_json::json!({"rc": 0, "errno": 0, "optlen": optlen, "addr": addr, "tail_untouched": true})
}

/// [`redirect_tests::spawn_in_cgroup_netns`], panicking on failure (test helpers).
pub fn spawn_in_netns(cgroup: &Path, netns: &File, cmd: &mut Command) -> Child {
    redirect_tests::spawn_in_cgroup_netns(cgroup, netns, cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A redirect-sockprobe proxy listening on `listen`, ready when this returns.
pub fn start_proxy(cgroup: &Path, netns: &File, listen: &[&str], quiet: bool) -> Spawned {
    let mut cmd = Command::new(SOCKPROBE);
    cmd.arg("proxy");
    for l in listen {
        cmd.args(["--listen", l]);
    }
    if quiet {
        cmd.arg("--quiet");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let p = Spawned::new(spawn_in_netns(cgroup, netns, &mut cmd));
    p.wait_for_prefix("listening ", Duration::from_secs(10))
        .expect("sockprobe proxy did not start");
    p
}

/// One connection from `cgroup` to `addr`; returns the client's final report: `peer` and
/// `local` (getpeername/getsockname), `client` (getsockopt on its own socket) and `proxy`
/// (what the proxy's accepted socket reported, if a sockprobe proxy answered).
pub fn client(cgroup: &Path, netns: &File, addr: &str) -> Value {
    let mut cmd = Command::new(SOCKPROBE);
    cmd.args(["client", addr])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = spawn_in_netns(cgroup, netns, &mut cmd)
        .wait_with_output()
        .expect("waiting for sockprobe client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "done")
        .unwrap_or_else(|| {
            panic!(
                "sockprobe client {addr} did not finish: stdout={stdout:?} stderr={:?}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// A client that connects, reports, and waits for [`HeldClient::finish`] before the proxy gets
/// its request: the connection (and its records) stay open meanwhile.
pub struct HeldClient {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    pub connected: Value,
}

impl HeldClient {
    pub fn start(cgroup: &Path, netns: &File, addr: &str, bind: &str) -> HeldClient {
        let mut cmd = Command::new(SOCKPROBE);
        cmd.args(["client", addr, "--bind", bind, "--wait-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = spawn_in_netns(cgroup, netns, &mut cmd);
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines
            .next()
            .unwrap_or_else(|| panic!("client {addr} from {bind} exited before connecting"))
            .unwrap();
        let connected: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(connected["event"], "connected", "{first}");
        HeldClient {
            child,
            stdin,
            lines,
            connected,
        }
    }

    /// Lets the client send its request and returns its final report.
    pub fn finish(mut self) -> Value {
        let mut stdin = self.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        drop(stdin);
        let line = self
            .lines
            .next()
            .expect("client exited without a report")
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "done", "{line}");
        v
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sidecar-mode agent config for `workloads` (name, pod cgroup).
pub fn sidecar_config(workloads: &[(&str, &Path)], proxy_uid: u32) -> String {
    let mut s =
        format!("proxy: {{mode: sidecar, outboundPort: 15001, uid: {proxy_uid}}}\nworkloads:\n");
    for (name, cg) in workloads {
        s += &format!(
            "  - {{name: {name}, namespace: test, cgroup: {}}}\n",
            cg.display()
        );
    }
    s
}

/// ORIG_TUPLE entries (hand-offs no proxy socket has taken yet) as `inspect` reports them. The
/// per-socket records live in socket-local storage and go with their sockets.
pub fn record_fill(agent: &Agent) -> u64 {
    let v = agent.inspect().expect("inspect");
    v["original_destinations"]["maps"]["ORIG_TUPLE"]["entries"]
        .as_u64()
        .unwrap_or_else(|| panic!("inspect shows no fill level for ORIG_TUPLE: {v}"))
}

/// One `OrigEvent` counter as `inspect` reports it.
pub fn orig_counter(agent: &Agent, name: &str) -> u64 {
    let v = agent.inspect().expect("inspect");
    v["original_destinations"]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("inspect shows no counter {name}: {v}"))
}

/// Asserts that `hooked` (a report made under the programs) equals `baseline` (the same calls
/// with no programs attached) for `keys`: same return code, errno, optlen, result and untouched
/// buffer tail.
pub fn assert_same_as_kernel(what: &str, hooked: &Value, baseline: &Value, keys: &[&str]) {
    for k in keys {
        assert_eq!(
            hooked[k], baseline[k],
            "{what}: {k} differs from the kernel's own answer\nhooked:   {}\nbaseline: {}",
            hooked, baseline
        );
    }
}

/// The getsockopt calls that pass through on any socket: TCP_INFO (full and short buffer) and
/// SO_ERROR.
pub const ALWAYS_KERNEL: [&str; 3] = ["tcp_info", "tcp_info_short", "so_error"];

/// Fixture with an agent-less twin: the same probes run in `base` give the kernel's own answers.
pub fn baseline_reports(base: &Fixture) -> Baseline {
    let cg = base.cgroup("base").unwrap();
    let _proxy = start_proxy(
        &cg,
        base.netns_file(),
        &["127.0.0.1:15001", "[::1]:15001"],
        false,
    );
    let v4 = client(&cg, base.netns_file(), "127.0.0.1:15001");
    let v6 = client(&cg, base.netns_file(), "[::1]:15001");
    Baseline { v4, v6 }
}

/// Kernel answers for an IPv4 and an IPv6 connection, client and proxy side.
pub struct Baseline {
    pub v4: Value,
    pub v6: Value,
}
