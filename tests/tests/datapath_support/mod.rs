//! The world of the connect-time datapath tests (datapath.rs, datapath_lifecycle.rs): a fixture
//! with destinations that answer with their own address, loopback servers, a tag-mode proxy in
//! pod1/proxy, the agent's config for two workloads, and assertions on where a probe went.
#![allow(dead_code)] // each test binary uses a different subset

use redirect_tests::{MeshWorld, Reached};

pub const PROXY_UID: &str = "1337";

/// A fixture with destinations, a loopback server and a tag-mode proxy in pod1/proxy.
pub type World = MeshWorld;

pub fn world(name: &str) -> World {
    let v4 = ["198.18.0.10", "198.18.0.11", "198.18.0.12", "127.0.0.1"].map(String::from);
    let v6 = [
        "fd00:198:18::10",
        "fd00:198:18::11",
        "fd00:198:18::12",
        "::1",
    ]
    .map(|h| format!("[{h}]"));
    MeshWorld::new(
        name,
        &[
            "198.18.0.10/32",
            "198.18.0.11/32",
            "198.18.0.12/32",
            "fd00:198:18::10/128",
            "fd00:198:18::11/128",
            "fd00:198:18::12/128",
        ],
        v4.iter()
            .chain(&v6)
            .flat_map(|h| [80, 5432, 8443, 8080].map(|port| format!("{h}:{port}"))),
        &["127.0.0.1:15001", "[::1]:15001"],
    )
    .unwrap()
}

/// Mesh: ports 5432 and the .11 hosts excluded. pod1: everything included (the Istio default),
/// proxy exempt by cgroup and uid. pod2: only .10 hosts and port 8443 included.
pub fn config(w: &World, pod1_annotations: &str) -> String {
    format!(
        r#"
mesh:
  outboundPortExclusionList: [5432]
  outboundIPRangeExclusionList: ["198.18.0.11/32", "fd00:198:18::11/128"]
proxy: {{mode: sidecar, outboundPort: 15001, uid: {PROXY_UID}}}
workloads:
  - name: app
    namespace: demo
    cgroup: {pod1}
    proxyCgroup: {proxy}
    annotations: {{{pod1_annotations}}}
  - name: restricted
    namespace: demo
    cgroup: {pod2}
    annotations:
      traffic.sidecar.istio.io/includeOutboundIPRanges: "198.18.0.10/32,fd00:198:18::10/128"
      traffic.sidecar.istio.io/includeOutboundPorts: "8443"
"#,
        pod1 = w.pod1.display(),
        proxy = w.proxy.display(),
        pod2 = w.pod2.display(),
    )
}

/// The three ways to write one IPv4-ish host for each family under test.
pub fn hosts(family: &str, last: u8) -> String {
    match family {
        "v4" => format!("198.18.0.{last}"),
        "v6" => format!("[fd00:198:18::{last}]"),
        "mapped" => format!("[::ffff:198.18.0.{last}]"),
        _ => unreachable!(),
    }
}

pub fn loopback(family: &str) -> &'static str {
    match family {
        "v4" => "127.0.0.1",
        "v6" => "[::1]",
        _ => "[::ffff:127.0.0.1]",
    }
}

pub fn assert_proxy(r: Reached, what: &str) {
    assert!(r.is_proxy(), "{what}: expected the proxy, got {r:?}");
}

/// The proxy got it and read `orig` back with SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST.
pub fn assert_proxied_to(r: Reached, orig: &str, what: &str) {
    assert_eq!(
        r,
        Reached::Proxy {
            orig: orig.to_string()
        },
        "{what}"
    );
}

pub fn assert_direct(r: Reached, what: &str) {
    assert!(
        matches!(r, Reached::Server(_)),
        "{what}: expected the destination itself, got {r:?}"
    );
}
