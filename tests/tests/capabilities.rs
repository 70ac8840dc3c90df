//! The agent's capability list (deploy/base/daemonset.yaml adds exactly these), proven in the
//! real kernel with the standalone file source:
//! - with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON and nothing else (bounding, permitted and
//!   effective sets, via `setpriv`) the agent loads, attaches and reconciles: a connect is
//!   redirected, a live exclusion is honoured;
//! - without any one of them it exits with an error that names the missing capability, and
//!   leaves nothing attached;
//! - `cleanup` (the uninstall step) needs no capability at all.
//!
//! Run with `--nocapture` to see what the agent prints in each case.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redirect_tests::{
    Fixture, Reached, Spawned, cgroup2_mount, helper_bin, probe, serve_identity, setpriv_args,
};
use serde_json::Value;

mod common;
mod inbound_support;

/// setpriv names and kernel names of the capabilities the agent needs.
/// Programs the agent links to the --cgroup-root (redirect-agent/src/bpf/loader.rs `PROGRAMS`).
const CGROUP_PROGRAMS: usize = 10;

const NEEDED: [(&str, &str, u32); 3] = [
    ("bpf", "CAP_BPF", 39),
    ("net_admin", "CAP_NET_ADMIN", 12),
    ("perfmon", "CAP_PERFMON", 38),
];

/// The agent, started under `setpriv` with exactly `caps` (setpriv names). As uid 0, exec gives
/// a process its bounding set as permitted and effective set, so `--bounding-set` decides them
/// all; inheritable and ambient sets are cleared so nothing comes back in.
struct CappedAgent {
    child: Option<Child>,
    log: PathBuf,
    config: PathBuf,
    dir: PathBuf,
}

/// Where the agent finds the host's cgroup2 tree and bpffs.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// At their usual paths.
    Direct,
    /// As the DaemonSet mounts them (deploy/base/daemonset.yaml): the cgroup2 tree bind-mounted
    /// read-only and bpffs bind-mounted, both below a `host/` directory, in a private mount
    /// namespace of the agent's own.
    HostMounts,
}

impl CappedAgent {
    fn start(fx: &Fixture, caps: &[&str], config: &str, layout: Layout) -> CappedAgent {
        let dir = std::env::temp_dir().join(format!("{}-agent", fx.name()));
        fs::create_dir_all(&dir).unwrap();
        let mut agent = CappedAgent {
            child: None,
            log: dir.join("agent.log"),
            config: dir.join("config.yaml"),
            dir,
        };
        fs::write(&agent.config, config).unwrap();
        let mount = cgroup2_mount().unwrap();
        let (mut cmd, bpffs_dir, cgroup_root) = match layout {
            Layout::Direct => (
                Command::new("setpriv"),
                fx.pin_dir().to_path_buf(),
                fx.cgroup_root().to_path_buf(),
            ),
            Layout::HostMounts => {
                let host = agent.dir.join("host");
                let (cg, bpf) = (host.join("sys/fs/cgroup"), host.join("sys/fs/bpf"));
                fs::create_dir_all(&cg).unwrap();
                fs::create_dir_all(&bpf).unwrap();
                // The agent sees the cgroups through its own bind mount (as a DaemonSet sees the
                // host's), and refuses workload paths outside its --cgroup-root: name them there.
                fs::write(
                    &agent.config,
                    config.replace(mount.to_str().unwrap(), cg.to_str().unwrap()),
                )
                .unwrap();
                // The mounts are made as full root; then setpriv drops to `caps` and execs.
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .arg(r#"mount --bind -o ro "$1" "$2" && mount --bind "$3" "$4" && shift 4 && exec setpriv "$@""#)
                    .arg("sh")
                    .arg(&mount)
                    .arg(&cg)
                    .arg(fx.pin_dir().parent().unwrap())
                    .arg(&bpf);
                let pins = bpf.join(fx.pin_dir().file_name().unwrap());
                let root = cg.join(fx.cgroup_root().strip_prefix(&mount).unwrap());
                (c, pins, root)
            }
        };
        let log = fs::File::create(&agent.log).unwrap();
        let child = cmd
            .args(setpriv_args(caps))
            .arg(helper_bin("redirect-agent").unwrap())
            .args(["run", "--source", "file", "--log-format", "json"])
            .arg("--config")
            .arg(&agent.config)
            .arg("--bpffs-dir")
            .arg(bpffs_dir)
            .arg("--cgroup-root")
            .arg(cgroup_root)
            .args(["--admin-addr", "127.0.0.1:0"])
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("setpriv and unshare (util-linux) run");
        agent.child = Some(child);
        agent
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn generation(&self) -> u64 {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "applied")
            .filter_map(|v| v["generation"].as_u64())
            .max()
            .unwrap_or(0)
    }

    fn wait_generation(&mut self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.generation() < n {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "agent exited ({status}) before generation {n}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent did not apply generation {n}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn reconfigure(&mut self, config: &str) {
        let next = self.generation() + 1;
        let tmp = self.dir.join("config.yaml.tmp");
        fs::write(&tmp, config).unwrap();
        fs::rename(&tmp, &self.config).unwrap();
        self.wait_generation(next);
    }

    /// Waits for the agent to exit on its own and returns (success, everything it printed).
    fn wait_exit(&mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return (status.success(), self.log());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "agent kept running although a capability is missing:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CappedAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// CapEff and CapBnd of a running process.
fn cap_sets(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
        u64::from_str_radix(v.trim(), 16).unwrap()
    };
    (field("CapEff:"), field("CapBnd:"))
}

fn config(pod: &Path, proxy: &Path, exclude: &[&str]) -> String {
    format!(
        "mesh:\n  outboundIPRangeExclusionList: {exclude:?}\n\
         proxy: {{mode: sidecar, outboundPort: 15001, uid: 1337}}\n\
         workloads:\n  - name: app\n    namespace: caps\n    cgroup: {}\n    proxyCgroup: {}\n",
        pod.display(),
        proxy.display()
    )
}

fn link_pins(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("link_"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn exactly_bpf_net_admin_perfmon_load_attach_and_reconcile() {
    let fx = Fixture::new("caps_exact").unwrap();
    fx.add_addr("198.18.0.10/32").unwrap();
    fx.add_addr("198.18.0.11/32").unwrap();
    let _api = serve_identity(&fx, "198.18.0.10:80".parse().unwrap(), "api").unwrap();
    let _db = serve_identity(&fx, "198.18.0.11:80".parse().unwrap(), "db").unwrap();
    let pod = fx.cgroup("pod").unwrap();
    let app = fx.cgroup("pod/app").unwrap();
    let proxy_cg = fx.cgroup("pod/proxy").unwrap();
    let _proxy: Spawned = common::start_proxy(&fx, &proxy_cg, &["--listen", "127.0.0.1:15001"]);

    let caps: Vec<&str> = NEEDED.iter().map(|(c, _, _)| *c).collect();
    let mut agent = CappedAgent::start(&fx, &caps, &config(&pod, &proxy_cg, &[]), Layout::Direct);
    agent.wait_generation(1);

    // The process really holds these three and nothing else, in every set that matters.
    let want: u64 = NEEDED.iter().map(|(_, _, bit)| 1u64 << bit).sum();
    let (eff, bnd) = cap_sets(agent.pid());
    assert_eq!(eff, want, "CapEff {eff:016x}, expected exactly {want:016x}");
    assert_eq!(bnd, want, "CapBnd {bnd:016x}, expected exactly {want:016x}");

    // Loaded and attached: every cgroup program (sock_create, sockops, getsockopt, getpeername
    // 4/6, DNS recvmsg/getpeername/sendmsg 4/6, connect 4/6) has a pinned link on the cgroup.
    assert_eq!(
        link_pins(fx.pin_dir()).len(),
        CGROUP_PROGRAMS,
        "{:?}",
        link_pins(fx.pin_dir())
    );
    // Reconciled: the workload is redirected.
    for (dest, ip) in [
        ("198.18.0.10:80", "198.18.0.10"),
        ("198.18.0.11:80", "198.18.0.11"),
    ] {
        let reached = probe(&fx, &app, dest, &[]).unwrap();
        assert_eq!(
            reached,
            Reached::Proxy {
                orig: format!("{ip}:80")
            },
            "{dest}"
        );
    }
    // And a live change is applied with the same three capabilities.
    agent.reconfigure(&config(&pod, &proxy_cg, &["198.18.0.11/32"]));
    assert_eq!(
        probe(&fx, &app, "198.18.0.11:80", &[]).unwrap(),
        Reached::Server("db".into())
    );
    assert!(probe(&fx, &app, "198.18.0.10:80", &[]).unwrap().is_proxy());
    eprintln!(
        "with exactly {:?}: loaded, attached and reconciled (CapEff={eff:016x})",
        NEEDED.map(|(_, n, _)| n)
    );

    // A restart with the same three capabilities adopts the pinned links: telling that a link
    // runs the very program about to be loaded needs only the pins, not CAP_SYS_ADMIN.
    drop(agent);
    let cfg = config(&pod, &proxy_cg, &["198.18.0.11/32"]);
    let again = CappedAgent::start(&fx, &caps, &cfg, Layout::Direct);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !again.log().contains("datapath ready") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        again.log().matches("adopted pinned link").count(),
        CGROUP_PROGRAMS,
        "{}",
        again.log()
    );
    assert!(!again.log().contains("\"attached\""), "{}", again.log());
    drop(again);

    // The uninstall step (deploy/uninstall) runs cleanup with no capability at all: removing
    // the pins is what detaches, and that is plain file removal for their owner.
    let out = Command::new("setpriv")
        .args(setpriv_args::<&str>(&[]))
        .arg(helper_bin("redirect-agent").unwrap())
        .args(["cleanup", "--bpffs-dir"])
        .arg(fx.pin_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cleanup without capabilities: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(link_pins(fx.pin_dir()).is_empty());
    assert_eq!(
        probe(&fx, &app, "198.18.0.10:80", &[]).unwrap(),
        Reached::Server("api".into()),
        "detached after cleanup"
    );
}

#[test]
fn each_missing_capability_is_named_and_nothing_is_attached() {
    for (dropped, name, _) in NEEDED {
        let fx = Fixture::new(&format!("caps_no_{dropped}")).unwrap();
        let pod = fx.cgroup("pod").unwrap();
        let proxy_cg = fx.cgroup("pod/proxy").unwrap();
        let caps: Vec<&str> = NEEDED
            .iter()
            .map(|(c, _, _)| *c)
            .filter(|c| *c != dropped)
            .collect();
        let mut agent =
            CappedAgent::start(&fx, &caps, &config(&pod, &proxy_cg, &[]), Layout::Direct);
        let (ok, out) = agent.wait_exit();
        eprintln!("--- without {name}, the agent printed:\n{}", out.trim_end());
        assert!(!ok, "the agent must fail without {name}:\n{out}");
        assert!(
            out.contains(&format!("missing capability {name}")),
            "the error must name {name}:\n{out}"
        );
        for (_, other, _) in NEEDED.iter().filter(|(c, _, _)| *c != dropped) {
            assert!(
                !out.contains(&format!("- {other}:")),
                "{other} is present and must not be reported missing:\n{out}"
            );
        }
        // It stopped before touching the kernel: no half-attached datapath.
        assert!(
            link_pins(fx.pin_dir()).is_empty(),
            "links left attached after failing without {name}: {:?}",
            link_pins(fx.pin_dir())
        );
    }
}

/// The DaemonSet's mounts work with the same three capabilities: programs attach through a
/// read-only bind mount of the cgroup2 tree, and the pins go to bpffs mounted below /host.
#[test]
fn daemonset_mount_layout_read_only_cgroup2_and_bpffs_below_host() {
    let fx = Fixture::new("caps_host_mounts").unwrap();
    fx.add_addr("198.18.0.10/32").unwrap();
    let _api = serve_identity(&fx, "198.18.0.10:80".parse().unwrap(), "api").unwrap();
    let pod = fx.cgroup("pod").unwrap();
    let app = fx.cgroup("pod/app").unwrap();
    let proxy_cg = fx.cgroup("pod/proxy").unwrap();
    let _proxy: Spawned = common::start_proxy(&fx, &proxy_cg, &["--listen", "127.0.0.1:15001"]);
    let caps: Vec<&str> = NEEDED.iter().map(|(c, _, _)| *c).collect();
    let mut agent = CappedAgent::start(
        &fx,
        &caps,
        &config(&pod, &proxy_cg, &[]),
        Layout::HostMounts,
    );
    agent.wait_generation(1);
    // The pins are in the real bpffs (seen here through /sys/fs/bpf), the links on the real
    // cgroup, and the workload is redirected.
    assert_eq!(
        link_pins(fx.pin_dir()).len(),
        CGROUP_PROGRAMS,
        "{}",
        agent.log()
    );
    assert_eq!(
        probe(&fx, &app, "198.18.0.10:80", &[]).unwrap(),
        Reached::Proxy {
            orig: "198.18.0.10:80".into()
        }
    );
}

/// Inbound interception adds CAP_SYS_PTRACE, CAP_SYS_ADMIN and the host's PID namespace, and
/// nothing else. The pod's netns is named as the Kubernetes source finds it, `/proc/PID/ns/net`
/// of the pod's sandbox process, which runs as another user (65535, as the pause image does); the
/// proxy (uid 1337) listens before the agent starts, so reaching it needs the backfill
/// (pidfd_getfd). With all five: steered. Without CAP_SYS_PTRACE: /proc/PID/ns/net is refused
/// (a ptrace read check). Without CAP_SYS_ADMIN: setns is refused. From another PID namespace the
/// pod's pids read as 0 in cgroup.procs (hence hostPID). The kubernetes source refuses to start
/// without the two, naming them, unless `--inbound=false`, with which the three base ones do.
#[test]
fn inbound_adds_sys_ptrace_sys_admin_and_host_pid() {
    let w = inbound_support::world("caps");
    let _apps = w.apps(&[8080]);
    let as_user = |uid: &str, cg: &Path, args: &[&str]| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid", uid, "--regid", uid, "--clear-groups", "--"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Spawned::new(inbound_support::spawn_in_netns(
            cg,
            w.fx.netns_file(),
            &mut cmd,
        ))
    };
    let sandbox = as_user("65535", &w.pod, &["sleep", "600"]);
    let sockprobe = inbound_support::origdst_support::SOCKPROBE;
    let proxy = as_user(
        "1337",
        &w.proxy_cg,
        &[sockprobe, "proxy", "--listen", "[::]:15006"],
    );
    proxy
        .wait_for_prefix("listening ", Duration::from_secs(10))
        .expect("proxy");
    let netns = format!("/proc/{}/ns/net", sandbox.pid());
    let cfg = format!(
        "proxy: {{mode: sidecar, outboundPort: 15001, inboundPort: 15006, uid: 1337}}\n\
         workloads:\n  - {{name: pod1, namespace: caps, cgroup: {}, proxyCgroup: {}, netns: {netns}}}\n",
        w.pod.display(),
        w.proxy_cg.display()
    );
    let base: Vec<&str> = NEEDED.iter().map(|(c, _, _)| *c).collect();
    let with =
        |extra: &[&'static str]| -> Vec<&str> { base.iter().chain(extra).copied().collect() };
    let dest = format!("{}:8080", inbound_support::POD4);

    // Each one missing: the workload's inbound is refused with the capability named, and its
    // connections reach the app untouched (the rest of the agent runs on).
    for (missing, has, says) in [
        ("CAP_SYS_PTRACE", "sys_admin", "needs CAP_SYS_PTRACE"),
        ("CAP_SYS_ADMIN", "sys_ptrace", "needs CAP_SYS_ADMIN"),
    ] {
        let agent = CappedAgent::start(&w.fx, &with(&[has]), &cfg, Layout::Direct);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agent.log().contains(says) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = agent.log();
        eprintln!(
            "--- without {missing}: {}",
            log.lines().find(|l| l.contains(says)).unwrap_or("?")
        );
        assert!(log.contains(says), "without {missing}:\n{log}");
        assert_eq!(w.who(&dest), "app-8080", "without {missing}");
        drop(agent);
    }

    // All five: the netns is linked and the pre-existing listener backfilled: steered.
    let agent = CappedAgent::start(
        &w.fx,
        &with(&["sys_admin", "sys_ptrace"]),
        &cfg,
        Layout::Direct,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.log().contains("sk_lookup linked") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut who = w.who(&dest);
    while who != "proxy" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        who = w.who(&dest);
    }
    assert_eq!(who, "proxy", "{}", agent.log());
    assert!(
        agent.log().contains("backfilled a listener"),
        "{}",
        agent.log()
    );
    drop(agent);

    // hostPID: from a PID namespace of its own, the pod's process reads as pid 0.
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "cat"])
        .arg(w.pod.join("cgroup.procs"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");

    // The kubernetes source checks at start: the two are named; --inbound=false needs neither.
    let kube = |caps: &[&str], extra: &[&str]| {
        let out = Command::new("setpriv")
            .args(setpriv_args(caps))
            .arg(helper_bin("redirect-agent").unwrap())
            .args([
                "run",
                "--source",
                "kubernetes",
                "--node-name",
                "n1",
                "--admin-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .arg("--bpffs-dir")
            .arg(w.fx.pin_dir())
            .arg("--cgroup-root")
            .arg(w.fx.cgroup_root())
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
    };
    let out = kube(&base, &[]);
    eprintln!(
        "--- kubernetes source with the base three:\n{}",
        out.trim_end()
    );
    assert!(
        out.contains("missing capabilities CAP_SYS_ADMIN, CAP_SYS_PTRACE"),
        "{out}"
    );
    assert!(out.contains("--inbound=false"), "{out}");
    let out = kube(&base, &["--inbound=false"]);
    assert!(!out.contains("missing capabilit"), "{out}");
    assert!(out.contains("datapath ready"), "{out}");
}
