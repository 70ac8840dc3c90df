//! DNS capture in the real kernel (issue 17): glibc's resolver (`getent hosts`) in a pod whose
//! resolv.conf names a real dnsmasq at 198.18.0.53 / fd00:198:18::53, and a second dnsmasq as
//! the proxy's DNS listener on 127.0.0.1:15053 and [::1]:15053 that answers the same names
//! differently. The answer printed says which server the query reached, and glibc only prints
//! it if the reply's source was the server it asked (so the recvmsg rewrite is proven too).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use redirect_tests::{Agent, Fixture, Spawned};

const PROXY_UID: u32 = 1337;
const REAL: &str = "198.18.1.1";
const FAKE: &str = "198.18.9.9";
/// Records in `big.test`: far more than a 512-byte UDP answer holds, so glibc retries over TCP.
const BIG: u8 = 80;

struct World {
    fx: Fixture,
    app: PathBuf,
    proxy: PathBuf,
    other: PathBuf,
    workdir: PathBuf,
    _servers: Vec<Spawned>,
}

/// dnsmasq answering `svc.test` with `svc` and `big.test` with `BIG` addresses in `big_net`.
fn dnsmasq(
    fx: &Fixture,
    cgroup: &Path,
    listen: &str,
    port: u16,
    svc: &str,
    big_net: &str,
) -> Spawned {
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--log-facility=-",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--pid-file=",
        &format!("--listen-address={listen}"),
        &format!("--port={port}"),
        &format!("--host-record=svc.test,{svc}"),
        "--log-queries",
    ]);
    for i in 1..=BIG {
        cmd.arg(format!("--host-record=big.test,{big_net}.{i}"));
    }
    let s = fx.spawn_logged(cgroup, &mut cmd).unwrap();
    // dnsmasq logs "started" to stderr once its sockets are bound.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !s.stderr().contains("started") {
        assert!(
            std::time::Instant::now() < deadline,
            "dnsmasq did not start: {}",
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s
}

fn world(name: &str) -> World {
    let fx = Fixture::new(name).unwrap();
    fx.add_addr("198.18.0.53/32").unwrap();
    fx.add_addr("fd00:198:18::53/128").unwrap();
    let app = fx.cgroup("pod1/app").unwrap();
    let proxy = fx.cgroup("pod1/proxy").unwrap();
    let other = fx.cgroup("pod2").unwrap();
    let server = fx.cgroup("server").unwrap();
    let real = dnsmasq(
        &fx,
        &server,
        "198.18.0.53,fd00:198:18::53",
        53,
        REAL,
        "198.18.2",
    );
    let fake = dnsmasq(&fx, &proxy, "127.0.0.1,::1", 15053, FAKE, "198.18.3");
    let workdir = std::env::temp_dir().join(format!("{}-dns", fx.name()));
    fs::create_dir_all(&workdir).unwrap();
    fs::write(workdir.join("resolv4"), "nameserver 198.18.0.53\n").unwrap();
    fs::write(workdir.join("resolv6"), "nameserver fd00:198:18::53\n").unwrap();
    World {
        fx,
        app,
        proxy,
        other,
        workdir,
        _servers: vec![real, fake],
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

/// The file config: app (pod1, proxy exempt by cgroup and uid) with `app_annotations`, pod2
/// with none, and the mesh-wide `dns:` section.
fn config(w: &World, dns: &str, app_annotations: &str) -> String {
    format!(
        r#"
proxy: {{mode: sidecar, outboundPort: 15001, uid: {PROXY_UID}}}
dns: {dns}
workloads:
  - name: app
    namespace: demo
    cgroup: {pod1}
    proxyCgroup: {proxy}
    annotations: {{{app_annotations}}}
  - name: other
    namespace: demo
    cgroup: {other}
"#,
        pod1 = w.app.parent().unwrap().display(),
        proxy = w.proxy.display(),
        other = w.other.display(),
    )
}

/// `getent hosts NAME` in `cgroup` + the pod netns, with `resolv` bind-mounted over
/// /etc/resolv.conf in a private mount namespace, optionally as `uid`. Returns the addresses.
fn getent(w: &World, cgroup: &Path, resolv: &str, name: &str, uid: Option<u32>) -> Vec<String> {
    let setpriv = match uid {
        Some(u) => format!("setpriv --reuid {u} --regid {u} --clear-groups "),
        None => String::new(),
    };
    let script = format!(
        "mount --bind {rc} /etc/resolv.conf && exec {setpriv}getent hosts {name}",
        rc = w.workdir.join(resolv).display()
    );
    let out =
        w.fx.run_in(
            cgroup,
            Command::new("unshare").args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ]),
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut addrs: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    addrs.sort();
    assert!(
        !addrs.is_empty(),
        "getent hosts {name} ({resolv}) answered nothing: status {} stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    addrs
}

fn dns_counter(agent: &Agent, name: &str) -> u64 {
    let v = agent.inspect().unwrap();
    v["dns_counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no dns counter {name} in {v}"))
}

const ON: &str = "{capture: true, port: 15053}";
const OFF: &str = "{capture: false}";

#[test]
fn glibc_queries_go_to_the_proxy_v4_and_v6_but_not_the_proxys_own() {
    let w = world("dns-basic");
    let agent = Agent::start(&w.fx, &config(&w, ON, "")).unwrap();
    for rc in ["resolv4", "resolv6"] {
        assert_eq!(getent(&w, &w.app, rc, "svc.test", None), [FAKE], "{rc}");
        // The proxy's own queries (its cgroup, or its uid anywhere in the pod) go out.
        assert_eq!(getent(&w, &w.proxy, rc, "svc.test", None), [REAL], "{rc}");
        assert_eq!(
            getent(&w, &w.app, rc, "svc.test", Some(PROXY_UID)),
            [REAL],
            "{rc}"
        );
    }
    // getpeername on connected UDP and TCP sockets shows the server, not the listener.
    for (fam, host) in [
        ("AF_INET", "'198.18.0.53'"),
        ("AF_INET6", "'fd00:198:18::53'"),
    ] {
        for kind in ["SOCK_DGRAM", "SOCK_STREAM"] {
            let script = format!(
                "import socket; s = socket.socket(socket.{fam}, socket.{kind}); \
                 s.connect(({host}, 53)); print(s.getpeername()[0], s.getpeername()[1])"
            );
            let out =
                w.fx.run_in(&w.app, Command::new("python3").args(["-c", &script]))
                    .unwrap();
            let peer = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                peer.trim(),
                format!("{} 53", host.trim_matches('\'')),
                "{fam} {kind}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert!(dns_counter(&agent, "peername") >= 4);
    // /metrics reads the same pinned counters at scrape time.
    let page = redirect_agent::metrics::Metrics::new(Some(agent.bpffs())).encode();
    let line = format!(
        "redirect_dns_events_total{{event=\"peername\"}} {}",
        dns_counter(&agent, "peername")
    );
    assert!(page.contains(&line), "/metrics lacks {line}:\n{page}");
    // explain asks the kernel's record and agrees with the config.
    let mut args: Vec<&std::ffi::OsStr> = [
        "explain",
        "--workload",
        "demo/app",
        "--dest",
        "198.18.0.53:53",
        "--output",
        "json",
        "--config",
    ]
    .map(std::ffi::OsStr::new)
    .to_vec();
    args.push(agent.config_path().as_os_str());
    args.extend([
        std::ffi::OsStr::new("--bpffs-dir"),
        agent.bpffs().as_os_str(),
    ]);
    let out = redirect_tests::agent_cli(args).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["step"], "dns_captured", "{v}");
    assert_eq!(v["evaluated"], "kernel", "{v}");
    assert_eq!(v["dns_target"], "127.0.0.1:15053", "{v}");
    assert!(dns_counter(&agent, "udp_connect_captured") >= 2);
    assert!(dns_counter(&agent, "restored") >= 2);
    assert!(dns_counter(&agent, "bypass_proxy") >= 4);
}

#[test]
fn capture_off_by_default_and_per_dialect() {
    let w = world("dns-dialects");
    // Mesh default off; Istio's ProxyConfig turns it on for app only.
    let istio = r#"proxy.istio.io/config: "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\"}""#;
    let mut agent = Agent::start(&w.fx, &config(&w, OFF, istio)).unwrap();
    assert_eq!(getent(&w, &w.app, "resolv4", "svc.test", None), [FAKE]);
    assert_eq!(getent(&w, &w.other, "resolv4", "svc.test", None), [REAL]);
    // Kuma's annotation, with its port.
    let kuma = r#"kuma.io/builtin-dns: enabled, kuma.io/builtin-dns-port: "15053""#;
    agent.reconfigure(&config(&w, OFF, kuma)).unwrap();
    assert_eq!(getent(&w, &w.app, "resolv6", "svc.test", None), [FAKE]);
    // A pod annotation turns the mesh default off for that pod only.
    let kuma_off = r#"kuma.io/builtin-dns: disabled"#;
    agent.reconfigure(&config(&w, ON, kuma_off)).unwrap();
    assert_eq!(getent(&w, &w.app, "resolv4", "svc.test", None), [REAL]);
    assert_eq!(getent(&w, &w.other, "resolv4", "svc.test", None), [FAKE]);
}

#[test]
fn tcp_fallback_for_a_large_answer_is_captured() {
    let w = world("dns-tcp");
    let agent = Agent::start(&w.fx, &config(&w, ON, "")).unwrap();
    for rc in ["resolv4", "resolv6"] {
        let addrs = getent(&w, &w.app, rc, "big.test", None);
        assert_eq!(addrs.len(), BIG as usize, "{rc}: {addrs:?}");
        assert!(
            addrs.iter().all(|a| a.starts_with("198.18.3.")),
            "{rc}: {addrs:?}"
        );
        let addrs = getent(&w, &w.proxy, rc, "big.test", None);
        assert!(
            addrs.iter().all(|a| a.starts_with("198.18.2.")),
            "{rc}: {addrs:?}"
        );
    }
    assert!(dns_counter(&agent, "tcp_captured") >= 2);
}

#[test]
fn live_toggle_without_restart() {
    let w = world("dns-toggle");
    let mut agent = Agent::start(&w.fx, &config(&w, OFF, "")).unwrap();
    assert_eq!(getent(&w, &w.app, "resolv4", "svc.test", None), [REAL]);
    agent.reconfigure(&config(&w, ON, "")).unwrap();
    assert_eq!(getent(&w, &w.app, "resolv4", "svc.test", None), [FAKE]);
    assert_eq!(getent(&w, &w.app, "resolv6", "svc.test", None), [FAKE]);
    agent.reconfigure(&config(&w, OFF, "")).unwrap();
    assert_eq!(getent(&w, &w.app, "resolv6", "svc.test", None), [REAL]);
    assert!(dns_counter(&agent, "off") >= 2);
}
