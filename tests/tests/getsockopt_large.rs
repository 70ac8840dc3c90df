//! getsockopt with a buffer larger than a page from inside the attached tree (issue #16): the
//! kernel doc's "Large optval" case. The cgroup getsockopt program sees only the first page of
//! such a buffer and must set optlen to 0 when it passes the call through, or kernels without
//! the later fallback fail the call with EFAULT. Every such call must return exactly what it
//! returns with no program attached (twin fixture), and SO_ORIGINAL_DST with an 8 KiB buffer on
//! a redirected proxy socket must still be answered. `cargo xtask test-kernels` runs the same
//! calls on the older kernels, where the fallback is missing.
mod origdst_support;

use origdst_support::*;
use redirect_tests::{Agent, Fixture};
use serde_json::Value;

const PROXY_UID: u32 = 1337;
/// Calls whose whole result (rc, errno, optlen, bytes, tail) must match the kernel's.
const EXACT: [&str; 5] = [
    "peergroups_16k",
    "peergroups_unix_16k",
    "unknown_sol_socket_16k",
    "origdst4_8k",
    "origdst6_8k",
];

/// Compares one socket's large-buffer report with the kernel's own. TCP_INFO's bytes change with
/// every connection (RTT, timestamps), so only its rc, errno, optlen and tail are compared.
fn assert_large_same(what: &str, hooked: &Value, kernel: &Value, exact: &[&str]) {
    let (h, k) = (&hooked["large"], &kernel["large"]);
    assert!(
        h.is_object() && k.is_object(),
        "{what}: no large report: {hooked}"
    );
    for key in exact {
        assert_eq!(h[key], k[key], "{what}: {key}\nhooked: {h}\nkernel: {k}");
    }
    for field in ["rc", "errno", "optlen", "tail_untouched"] {
        assert_eq!(
            h["tcp_info_8k"][field], k["tcp_info_8k"][field],
            "{what}: tcp_info_8k.{field}\nhooked: {h}\nkernel: {k}"
        );
    }
}

#[test]
fn large_getsockopt_under_the_programs_behaves_as_without_them() {
    let base = Fixture::new("gso-large-base").unwrap();
    let kernel = baseline_reports(&base);
    // The baseline itself exercises the large paths: a successful 16 KiB SO_PEERGROUPS, errors
    // with the caller's 16 KiB/8 KiB optlen left in place.
    let kl = &kernel.v4["client"]["large"];
    assert_eq!(kl["peergroups_unix_16k"]["rc"], 0, "{kl}");
    assert_ne!(kl["unknown_sol_socket_16k"]["errno"], 0, "{kl}");
    assert_ne!(kl["origdst4_8k"]["errno"], 0, "{kl}");

    let fx = Fixture::new("gso-large").unwrap();
    let pod = fx.cgroup("pod1").unwrap();
    let app = fx.cgroup("pod1/app").unwrap();
    let _agent = Agent::start(&fx, &sidecar_config(&[("pod1", &pod)], PROXY_UID)).unwrap();
    let _proxy = start_proxy(
        &fx.cgroup("pod1/proxy").unwrap(),
        fx.netns_file(),
        &["127.0.0.1:15001", "[::1]:15001"],
        false,
    );
    let ns = fx.netns_file();

    // Redirected connections: the application's socket passes everything through; the proxy's
    // socket passes everything through except SO_ORIGINAL_DST, answered into the large buffer.
    for (dst, v4, k) in [
        ("198.18.0.10:80", true, &kernel.v4),
        ("[fd00:198:18::10]:443", false, &kernel.v6),
    ] {
        let v = client(&app, ns, dst);
        assert_eq!(v["peer"], dst, "{v}");
        assert_large_same(
            &format!("client → {dst}"),
            &v["client"],
            &k["client"],
            &EXACT,
        );
        let p = &v["proxy"];
        let pl = &p["large"];
        let (answered_key, len) = match v4 {
            true => ("origdst4_8k", 16),
            false => ("origdst6_8k", 28),
        };
        assert_eq!(pl[answered_key]["rc"], 0, "proxy for {dst}: {pl}");
        assert_eq!(pl[answered_key]["optlen"], len, "proxy for {dst}: {pl}");
        assert_eq!(pl[answered_key]["tail_untouched"], true, "{pl}");
        // The small-buffer answer and the large one carry the same address.
        let small = if v4 { "origdst4" } else { "origdst6" };
        assert_eq!(p[small]["addr"], dst, "{p}");
        let passed: Vec<&str> = EXACT
            .iter()
            .copied()
            .filter(|k| *k != answered_key)
            .collect();
        assert_large_same(&format!("proxy for {dst}"), p, &k["proxy"], &passed);
    }

    // Sockets without any record (loopback straight to the proxy port, and outside the mesh).
    for cg in [app.clone(), fx.cgroup("other").unwrap()] {
        for (addr, k) in [("127.0.0.1:15001", &kernel.v4), ("[::1]:15001", &kernel.v6)] {
            let v = client(&cg, ns, addr);
            let what = format!("{} → {addr}", cg.display());
            assert_large_same(&what, &v["client"], &k["client"], &EXACT);
            assert_large_same(&what, &v["proxy"], &k["proxy"], &EXACT);
        }
    }
}
