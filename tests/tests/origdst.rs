//! Original destination of redirected connections, in the real kernel with the real agent:
//! getsockopt(SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST) on the proxy's accepted socket and
//! getpeername on the application's socket, for IPv4, IPv6 and v4-mapped IPv6; every other
//! getsockopt untouched; two pods with identical loopback tuples; a node proxy in another netns;
//! and the demo proxy. Answers are compared with what the same calls return in a twin fixture
//! with no programs attached (the kernel's own answers).
mod origdst_support;

use std::time::Duration;

use origdst_support::*;
use redirect_tests::{Agent, Fixture, Reached, helper_bin, probe, veth_pair};

const PROXY_UID: u32 = 1337;
const BOTH_LOOPBACKS: [&str; 2] = ["127.0.0.1:15001", "[::1]:15001"];

#[test]
fn proxy_and_application_see_the_original_destination_v4_v6_and_mapped() {
    let base = Fixture::new("origdst-base").unwrap();
    let kernel = baseline_reports(&base);
    let fx = Fixture::new("origdst-sidecar").unwrap();
    let pod = fx.cgroup("pod1").unwrap();
    let app = fx.cgroup("pod1/app").unwrap();
    let agent = Agent::start(&fx, &sidecar_config(&[("pod1", &pod)], PROXY_UID)).unwrap();
    let _proxy = start_proxy(
        &fx.cgroup("pod1/proxy").unwrap(),
        fx.netns_file(),
        &BOTH_LOOPBACKS,
        false,
    );
    let ns = fx.netns_file();

    // IPv4: the proxy (AF_INET socket) reads a sockaddr_in, exactly the destination.
    let v = client(&app, ns, "198.18.0.10:80");
    let p = &v["proxy"];
    assert_eq!(
        p["peer"], v["local"],
        "the proxy accepted this connection: {v}"
    );
    assert_eq!(v["peer"], "198.18.0.10:80", "getpeername: {v}");
    assert_eq!(p["origdst4"], answered("198.18.0.10:80", 16), "{v}");
    // A buffer shorter than a sockaddr_in gets netfilter's EINVAL.
    assert_eq!(p["origdst4_short"]["errno"], EINVAL, "{v}");
    let k4 = &kernel.v4;
    let mut untouched = vec!["origdst6", "origdst6_short"];
    untouched.extend(ALWAYS_KERNEL);
    assert_same_as_kernel("v4 proxy socket", p, &k4["proxy"], &untouched);
    // The application's own socket has no answer to give: the kernel's, unchanged.
    let mut all = vec!["origdst4", "origdst6", "origdst4_short", "origdst6_short"];
    all.extend(ALWAYS_KERNEL);
    assert_same_as_kernel("v4 client socket", &v["client"], &k4["client"], &all);

    // IPv6: the proxy (AF_INET6 socket) reads a sockaddr_in6.
    let v = client(&app, ns, "[fd00:198:18::10]:443");
    let p = &v["proxy"];
    assert_eq!(p["peer"], v["local"], "{v}");
    assert_eq!(v["peer"], "[fd00:198:18::10]:443", "getpeername: {v}");
    assert_eq!(p["origdst6"], answered("[fd00:198:18::10]:443", 28), "{v}");
    assert_eq!(p["origdst6_short"]["errno"], EINVAL, "{v}");
    let k6 = &kernel.v6;
    let mut untouched = vec!["origdst4", "origdst4_short"];
    untouched.extend(ALWAYS_KERNEL);
    assert_same_as_kernel("v6 proxy socket", p, &k6["proxy"], &untouched);
    assert_same_as_kernel("v6 client socket", &v["client"], &k6["client"], &all);

    // v4-mapped: an IPv4 connection from an AF_INET6 socket. It reaches the IPv4 listener, whose
    // socket family expects a sockaddr_in; the application sees its mapped peer.
    let v = client(&app, ns, "[::ffff:198.18.0.10]:8080");
    let p = &v["proxy"];
    assert_eq!(p["local"], "127.0.0.1:15001", "{v}");
    assert_eq!(v["peer"], "[::ffff:198.18.0.10]:8080", "getpeername: {v}");
    assert_eq!(p["origdst4"], answered("198.18.0.10:8080", 16), "{v}");
    let mut untouched = vec!["origdst6", "origdst6_short"];
    untouched.extend(ALWAYS_KERNEL);
    assert_same_as_kernel("mapped proxy socket", p, &k4["proxy"], &untouched);
    assert_same_as_kernel(
        "mapped client socket",
        &v["client"],
        &k6["client"],
        &ALWAYS_KERNEL,
    );

    // Two answers (the probe asks with a 128-byte and an 8 KiB buffer) and one getpeername per
    // connection; the proxy's own getpeername calls (on sockets without a cookie record) are
    // not rewritten.
    assert_eq!(orig_counter(&agent, "answered"), 6);
    assert_eq!(orig_counter(&agent, "peername"), 3);
}

#[test]
fn dual_stack_proxy_socket_gets_the_form_its_family_expects() {
    let base = Fixture::new("origdst-ds-base").unwrap();
    let kernel = baseline_reports(&base);
    let fx = Fixture::new("origdst-dualstack").unwrap();
    let pod = fx.cgroup("pod1").unwrap();
    let app = fx.cgroup("pod1/app").unwrap();
    let _agent = Agent::start(&fx, &sidecar_config(&[("pod1", &pod)], PROXY_UID)).unwrap();
    // One dual-stack listener: IPv4 connections arrive on AF_INET6 sockets, v4-mapped.
    let _proxy = start_proxy(
        &fx.cgroup("pod1/proxy").unwrap(),
        fx.netns_file(),
        &["[::]:15001"],
        false,
    );
    let ns = fx.netns_file();

    for (dst, mapped) in [
        ("198.18.0.10:80", "[::ffff:198.18.0.10]:80"),
        ("[::ffff:198.18.0.10]:81", "[::ffff:198.18.0.10]:81"),
    ] {
        let v = client(&app, ns, dst);
        let p = &v["proxy"];
        assert_eq!(p["local"], "[::ffff:127.0.0.1]:15001", "{v}");
        assert_eq!(v["peer"], dst, "getpeername: {v}");
        // SOL_IP: the sockaddr_in netfilter gives; SOL_IPV6: the sockaddr_in6 an AF_INET6
        // socket expects (netfilter has no IPv6 entry for an IPv4 connection and says ENOENT).
        let v4 = mapped.trim_start_matches("[::ffff:").replace(']', "");
        assert_eq!(p["origdst4"], answered(&v4, 16), "{v}");
        assert_eq!(p["origdst6"], answered(mapped, 28), "{v}");
    }

    let v = client(&app, ns, "[fd00:198:18::10]:80");
    let p = &v["proxy"];
    assert_eq!(p["origdst6"], answered("[fd00:198:18::10]:80", 28), "{v}");
    // An IPv6 destination has no sockaddr_in form: the kernel's own answer.
    assert_same_as_kernel(
        "v6 on dual-stack",
        p,
        &kernel.v6["proxy"],
        &["origdst4", "origdst4_short"],
    );
}

#[test]
fn sockets_without_a_record_get_the_kernels_own_answers() {
    let base = Fixture::new("origdst-pt-base").unwrap();
    let kernel = baseline_reports(&base);
    let fx = Fixture::new("origdst-passthrough").unwrap();
    let pod = fx.cgroup("pod1").unwrap();
    let agent = Agent::start(&fx, &sidecar_config(&[("pod1", &pod)], PROXY_UID)).unwrap();
    let _proxy = start_proxy(
        &fx.cgroup("pod1/proxy").unwrap(),
        fx.netns_file(),
        &BOTH_LOOPBACKS,
        false,
    );
    let mut all = vec!["origdst4", "origdst6", "origdst4_short", "origdst6_short"];
    all.extend(ALWAYS_KERNEL);
    // A meshed workload reaching the proxy port directly (loopback is never redirected), and a
    // workload outside the mesh: under the programs, but with nothing recorded.
    for cg in [fx.cgroup("pod1/app").unwrap(), fx.cgroup("other").unwrap()] {
        for (addr, k) in [("127.0.0.1:15001", &kernel.v4), ("[::1]:15001", &kernel.v6)] {
            let v = client(&cg, fx.netns_file(), addr);
            let what = format!("{} → {addr}", cg.display());
            assert_eq!(v["peer"], addr, "{what}: {v}");
            assert_same_as_kernel(&what, &v["proxy"], &k["proxy"], &all);
            assert_same_as_kernel(&what, &v["client"], &k["client"], &all);
        }
    }
    assert_eq!(orig_counter(&agent, "answered"), 0);
    assert_eq!(orig_counter(&agent, "peername"), 0);
    assert_eq!(record_fill(&agent), 0);
}

#[test]
fn two_pods_with_identical_tuples_each_get_their_own_destination() {
    // Pod A lives in `fx`'s netns, pod B in `other`'s; both pods' cgroups are under `fx`, where
    // the programs are attached, as all pods of a node are under its cgroup root.
    let fx = Fixture::new("origdst-2pods").unwrap();
    let other = Fixture::new("origdst-2pods-b").unwrap();
    let (pod_a, pod_b) = (fx.cgroup("podA").unwrap(), fx.cgroup("podB").unwrap());
    let agent = Agent::start(
        &fx,
        &sidecar_config(&[("pod-a", &pod_a), ("pod-b", &pod_b)], PROXY_UID),
    )
    .unwrap();
    let (ns_a, ns_b) = (fx.netns_file(), other.netns_file());
    let _proxy_a = start_proxy(
        &fx.cgroup("podA/proxy").unwrap(),
        ns_a,
        &BOTH_LOOPBACKS,
        false,
    );
    let _proxy_b = start_proxy(
        &fx.cgroup("podB/proxy").unwrap(),
        ns_b,
        &BOTH_LOOPBACKS,
        false,
    );

    let source = "127.0.0.1:40000";
    let a = HeldClient::start(
        &fx.cgroup("podA/app").unwrap(),
        ns_a,
        "198.18.0.10:80",
        source,
    );
    let b = HeldClient::start(
        &fx.cgroup("podB/app").unwrap(),
        ns_b,
        "198.18.0.20:8080",
        source,
    );
    // Both connections are now 127.0.0.1:40000 → 127.0.0.1:15001, established at the same time.
    assert_eq!(a.connected["local"], source);
    assert_eq!(b.connected["local"], source);
    assert_eq!(a.connected["peer"], "198.18.0.10:80");
    assert_eq!(b.connected["peer"], "198.18.0.20:8080");
    // Both proxy sockets took their own hand-off (keyed by the 4-tuple alone, B's would have
    // replaced A's: the answers below tell them apart), and none is left behind.
    assert_eq!(orig_counter(&agent, "accepted"), 2);
    assert_eq!(record_fill(&agent), 0);

    let ra = a.finish();
    let rb = b.finish();
    assert_eq!(ra["proxy"]["peer"], source, "{ra}");
    assert_eq!(rb["proxy"]["peer"], source, "{rb}");
    assert_eq!(
        ra["proxy"]["origdst4"],
        answered("198.18.0.10:80", 16),
        "{ra}"
    );
    assert_eq!(
        rb["proxy"]["origdst4"],
        answered("198.18.0.20:8080", 16),
        "{rb}"
    );
}

#[test]
fn node_proxy_in_another_netns_reads_the_original_destination() {
    // The pod (fx's netns) reaches the node (other netns) over a veth pair; the node proxy's
    // accepted sockets live in the node's netns.
    let fx = Fixture::new("origdst-node-pod").unwrap();
    let node = Fixture::new("origdst-node").unwrap();
    veth_pair(&fx, "vpod", &node, "vnode").unwrap();
    fx.ip(&["addr", "add", "198.19.1.2/24", "dev", "vpod"])
        .unwrap();
    node.ip(&["addr", "add", "198.19.1.1/24", "dev", "vnode"])
        .unwrap();

    let pod = fx.cgroup("pod1").unwrap();
    let app = fx.cgroup("pod1/app").unwrap();
    let config = format!(
        "proxy: {{mode: node, address: 198.19.1.1, outboundPort: 15001}}\n\
         workloads:\n  - {{name: pod1, namespace: test, cgroup: {}}}\n",
        pod.display()
    );
    let agent = Agent::start(&fx, &config).unwrap();
    // Dual-stack, so that IPv6 destinations (carried over IPv4 to the node proxy, whose IPv6
    // address defaults to its v4-mapped IPv4 one) can be read with IP6T_SO_ORIGINAL_DST.
    let _proxy = start_proxy(
        &fx.cgroup("node/proxy").unwrap(),
        node.netns_file(),
        &["[::]:15001"],
        false,
    );

    let v = client(&app, fx.netns_file(), "198.18.0.10:80");
    let p = &v["proxy"];
    assert_eq!(v["peer"], "198.18.0.10:80", "getpeername: {v}");
    let local = v["local"].as_str().unwrap();
    assert!(local.starts_with("198.19.1.2:"), "{v}");
    assert_eq!(
        p["peer"],
        format!("[::ffff:{}", local.replace(':', "]:")),
        "{v}"
    );
    assert_eq!(p["origdst4"], answered("198.18.0.10:80", 16), "{v}");

    let v = client(&app, fx.netns_file(), "[fd00:198:18::10]:443");
    let p = &v["proxy"];
    assert_eq!(v["peer"], "[fd00:198:18::10]:443", "getpeername: {v}");
    assert_eq!(p["local"], "[::ffff:198.19.1.1]:15001", "{v}");
    assert_eq!(p["origdst6"], answered("[fd00:198:18::10]:443", 28), "{v}");
    // Two answers per connection: the probe asks with a 128-byte and an 8 KiB buffer.
    assert_eq!(orig_counter(&agent, "answered"), 6);
}

#[test]
fn demo_testproxy_prints_the_real_original_destination() {
    let fx = Fixture::new("origdst-testproxy").unwrap();
    let pod = fx.cgroup("pod1").unwrap();
    let app = fx.cgroup("pod1/app").unwrap();
    let _agent = Agent::start(&fx, &sidecar_config(&[("pod1", &pod)], PROXY_UID)).unwrap();
    let proxy = fx
        .spawn_logged(
            &fx.cgroup("pod1/proxy").unwrap(),
            std::process::Command::new(helper_bin("redirect-testproxy").unwrap()).arg("--v6"),
        )
        .unwrap();
    proxy
        .wait_for_prefix("listening ", Duration::from_secs(10))
        .unwrap();
    for (dst, orig) in [
        ("198.18.0.10:80", "198.18.0.10:80"),
        ("[fd00:198:18::10]:80", "[fd00:198:18::10]:80"),
        ("[::ffff:198.18.0.10]:80", "198.18.0.10:80"),
    ] {
        let r = probe(&fx, &app, dst, &[]).unwrap();
        assert_eq!(
            r,
            Reached::Proxy {
                orig: orig.to_string()
            },
            "{dst}"
        );
    }
    proxy
        .wait_for_line(
            |l| l.starts_with("orig=[fd00:198:18::10]:80 peer=[::1]:"),
            Duration::from_secs(5),
        )
        .unwrap();
}
