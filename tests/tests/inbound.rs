//! Inbound interception with sk_lookup, in the real kernel: a client node reaches the pod over a
//! veth pair; the pod has apps on several ports and the proxy's inbound listener. Every test
//! asserts who accepted, and for steered connections getsockname and SO_ORIGINAL_DST on the
//! proxy's accepted socket, plus the counters.
mod inbound_support;

use inbound_support::*;

#[test]
fn included_ports_go_to_the_proxy_with_their_original_destination_v4_v6_dual_stack() {
    let w = world("steer");
    let _apps = w.apps(&[8080, 8081, 15020]);
    let agent = w.agent(&[("traffic.sidecar.istio.io/excludeInboundPorts", "8081")]);
    let _proxy = w.proxy(&["[::]:15006"]);

    // IPv4 to a dual-stack (`::`) listener: the accepted socket is AF_INET6 with v4-mapped
    // addresses, and both SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST answer.
    let v = w.report_from_node(&format!("{POD4}:8080"));
    let p = &v["proxy"];
    assert_eq!(p["local"], format!("[::ffff:{POD4}]:8080"), "{v}");
    assert_eq!(p["origdst4"], answered(&format!("{POD4}:8080"), 16), "{v}");
    assert_eq!(
        p["origdst6"],
        answered(&format!("[::ffff:{POD4}]:8080"), 28),
        "{v}"
    );
    assert_eq!(v["peer"], format!("{POD4}:8080"), "{v}");

    let v = w.report_from_node(&format!("[{POD6}]:8080"));
    let p = &v["proxy"];
    assert_eq!(p["local"], format!("[{POD6}]:8080"), "{v}");
    assert_eq!(
        p["origdst6"],
        answered(&format!("[{POD6}]:8080"), 28),
        "{v}"
    );

    // Excluded by annotation, and the proxy's own port: the app.
    assert_eq!(w.who(&format!("{POD4}:8081")), "app-8081");
    assert_eq!(w.who(&format!("[{POD6}]:8081")), "app-8081");
    assert_eq!(w.who(&format!("{POD4}:15020")), "app-15020");
    assert_eq!(w.who(&format!("{POD4}:8080")), "proxy");

    assert_eq!(counter(&agent, "steered"), 3);
    assert_eq!(counter(&agent, "excluded_port"), 3);
    assert_eq!(counter(&agent, "no_listener"), 0);
}

#[test]
fn include_list_empty_list_and_source_exclusions() {
    let w = world("lists");
    let _apps = w.apps(&[8080, 8081, 9090]);
    // Only 8080 and 9090 are captured; 9090 not from the excluded node subnet (Kuma).
    let agent = w.agent(&[
        ("traffic.sidecar.istio.io/includeInboundPorts", "8080,9090"),
        (
            "traffic.kuma.io/exclude-inbound-ips",
            "fd00:198:19:2::1/128",
        ),
    ]);
    // An IPv4-only listener: IPv4 connections find it under its own family.
    let _proxy = w.proxy(&["0.0.0.0:15006"]);
    assert_eq!(w.who(&format!("{POD4}:8080")), "proxy");
    assert_eq!(w.who(&format!("{POD4}:9090")), "proxy");
    assert_eq!(w.who(&format!("{POD4}:8081")), "app-8081");
    // The node's IPv6 address is an excluded source: the app, even on an included port.
    assert_eq!(w.who(&format!("[{POD6}]:8080")), "app-8080");
    assert_eq!(counter(&agent, "not_included"), 1);
    assert_eq!(counter(&agent, "excluded_source"), 1);
    assert_eq!(counter(&agent, "steered"), 2);

    // An empty include list: no inbound capture at all.
    let mut agent = agent;
    agent
        .reconfigure(&w.config(&[("traffic.sidecar.istio.io/includeInboundPorts", "")]))
        .unwrap();
    assert_eq!(w.who(&format!("{POD4}:8080")), "app-8080");
    assert_eq!(w.who(&format!("[{POD6}]:9090")), "app-9090");
    assert_eq!(counter(&agent, "steered"), 2);
}

#[test]
fn from_inside_the_pod_to_its_own_address_reaches_the_app() {
    let w = world("loopback");
    let _apps = w.apps(&[8080]);
    let agent = w.agent(&[(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "198.19.2.2/32,fd00:198:19:2::2/128",
    )]);
    let _proxy = w.proxy(&["[::]:15006"]);
    // The pod's own address is routed over lo: iptables PREROUTING never sees it.
    assert_eq!(w.who_from_pod(&format!("{POD4}:8080")), "app-8080");
    assert_eq!(w.who_from_pod(&format!("[{POD6}]:8080")), "app-8080");
    assert_eq!(counter(&agent, "loopback"), 2);
    assert_eq!(w.who(&format!("{POD4}:8080")), "proxy");
}

#[test]
fn no_listener_is_refused_never_the_app_then_the_listener_appears() {
    let w = world("nolisten");
    let _apps = w.apps(&[8080]);
    let agent = w.agent(&[]);
    let r = w.who(&format!("{POD4}:8080"));
    assert!(r.starts_with("failed"), "with no proxy listener: {r}");
    assert_eq!(counter(&agent, "no_listener"), 1);
    // The proxy starts: steered at once, with no agent action.
    let generation = agent.generation();
    let _proxy = w.proxy(&["[::]:15006"]);
    assert_eq!(w.who(&format!("{POD4}:8080")), "proxy");
    assert_eq!(w.who(&format!("[{POD6}]:8080")), "proxy");
    assert_eq!(agent.generation(), generation);
    assert_eq!(counter(&agent, "no_listener"), 1);
    // And it stops: refused again.
    drop(_proxy);
    let r = w.who(&format!("{POD4}:8080"));
    assert!(r.starts_with("failed"), "after the proxy exited: {r}");
}

#[test]
fn the_proxy_forwards_to_the_app_and_the_bytes_arrive() {
    let w = world("forward");
    let apps = w.apps(&[8080]);
    let _agent = w.agent(&[]);
    // The test proxy in forward mode connects to the SO_ORIGINAL_DST it reads (the pod IP and
    // port), as Envoy does; from inside the pod that arrives over lo and reaches the app.
    let proxy =
        w.fx.spawn_logged(
            &w.proxy_cg,
            std::process::Command::new(env!("CARGO_BIN_EXE_redirect-testproxy")).args([
                "--listen",
                "[::]:15006",
                "--mode",
                "forward",
            ]),
        )
        .unwrap();
    proxy
        .wait_for_prefix("listening ", std::time::Duration::from_secs(10))
        .unwrap();
    assert_eq!(w.who(&format!("{POD4}:8080")), "app-8080");
    assert_eq!(w.who(&format!("[{POD6}]:8080")), "app-8080");
    // Through the proxy: the app's peer is the pod itself, not the client node.
    let peers: Vec<String> = apps[0].peers().iter().map(|p| p.ip().to_string()).collect();
    assert_eq!(
        peers,
        vec![format!("::ffff:{POD4}"), POD6.to_string()],
        "the app was reached directly, not through the proxy"
    );
    proxy
        .wait_for_line(
            |l| l.starts_with(&format!("orig=[::ffff:{POD4}]:8080 ")),
            std::time::Duration::from_secs(5),
        )
        .unwrap();
}

#[test]
fn haproxy_as_inbound_proxy_forwards_to_the_original_destination() {
    let w = world("haproxy");
    let apps = w.apps(&[8080, 8443]);
    let agent = w.agent(&[]);
    let dir = std::env::temp_dir().join(format!("{}-haproxy", w.fx.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        "global\n    maxconn 64\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 10s\n    timeout server 10s\n\
         listen inbound\n    bind 0.0.0.0:15006\n    server orig 0.0.0.0:0\n",
    )
    .unwrap();
    let mut cmd = std::process::Command::new("haproxy");
    cmd.args(["-db", "-f"]).arg(&cfg);
    let hap =
        w.fx.spawn_logged(&w.proxy_cg, &mut cmd)
            .expect("haproxy is not installed (cargo xtask test installs it)");
    // Ready once its listener is in the SOCKHASH (the listener_added counter of this netns's
    // sockops callback; HAProxy prints nothing in -db mode).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while counter(&agent, "listener_added") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "haproxy did not listen: {}",
            hap.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for port in [8080, 8443] {
        assert_eq!(w.who(&format!("{POD4}:{port}")), format!("app-{port}"));
    }
    for a in &apps {
        let peers = a.peers();
        assert_eq!(peers.len(), 1);
        assert_eq!(
            peers[0].ip().to_string(),
            format!("::ffff:{POD4}"),
            "not via HAProxy"
        );
    }
    assert_eq!(counter(&agent, "steered"), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_live_annotation_change_flips_a_port_with_no_restart() {
    let w = world("live");
    let _apps = w.apps(&[8080]);
    let mut agent = w.agent(&[]);
    let _proxy = w.proxy(&["[::]:15006"]);
    assert_eq!(w.who(&format!("{POD4}:8080")), "proxy");
    agent
        .reconfigure(&w.config(&[("traffic.sidecar.istio.io/excludeInboundPorts", "8080")]))
        .unwrap();
    assert_eq!(w.who(&format!("{POD4}:8080")), "app-8080");
    agent.reconfigure(&w.config(&[])).unwrap();
    assert_eq!(w.who(&format!("{POD4}:8080")), "proxy");
}

fn sk_lookup_links() -> Vec<serde_json::Value> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .unwrap();
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.into_iter().filter(|l| l["type"] == "netns").collect()
}

fn netns_inode(w: &World) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(w.fx.netns_path()).unwrap().ino()
}

#[test]
fn kill9_keeps_inbound_and_restart_adopts_then_cleanup_leaves_no_link() {
    let w = world("restart");
    let _apps = w.apps(&[8080]);
    let mut agent = w.agent(&[]);
    let _proxy = w.proxy(&["[::]:15006"]);
    let ino = netns_inode(&w);
    let ours = |links: &[serde_json::Value]| links.iter().filter(|l| l["netns_ino"] == ino).count();
    assert_eq!(ours(&sk_lookup_links()), 1);
    agent.kill9().unwrap();
    // Interception continues with no agent.
    assert_eq!(w.who(&format!("{POD4}:8080")), "proxy");
    agent.restart().unwrap();
    let line = agent.log();
    assert!(
        !line.contains("sk_lookup linked"),
        "restart re-linked instead of adopting:\n{line}"
    );
    assert_eq!(ours(&sk_lookup_links()), 1);
    assert_eq!(w.who(&format!("{POD4}:8080")), "proxy");
    agent.kill9().unwrap();
    redirect_tests::agent_cleanup(agent.bpffs()).unwrap();
    assert_eq!(
        ours(&sk_lookup_links()),
        0,
        "cleanup left an sk_lookup link"
    );
    assert_eq!(w.who(&format!("{POD4}:8080")), "app-8080");
}
