//! The inbound test world: a "pod" netns (the fixture's) joined to a "client node" netns by a
//! veth pair, apps listening in the pod, the proxy's inbound listener, and the agent with the
//! pod's netns in its config.
#![allow(dead_code)] // each test uses a different subset

use std::path::PathBuf;
use std::process::{Command, Stdio};

use redirect_tests::{Agent, Fixture, IdentityServer, serve_identity, veth_pair};
use serde_json::Value;

pub mod kube;

#[path = "../origdst_support/mod.rs"]
pub mod origdst_support;
#[allow(unused_imports)] // not every test binary asks for original destinations
pub use origdst_support::{answered, client, spawn_in_netns, start_proxy};

/// The pod's addresses on its veth (the node side is .1 / ::1).
pub const POD4: &str = "198.19.2.2";
pub const POD6: &str = "fd00:198:19:2::2";
pub const NODE4: &str = "198.19.2.1";
pub const NODE6: &str = "fd00:198:19:2::1";
pub const INBOUND_PORT: u16 = 15006;

pub struct World {
    /// The pod's netns, cgroup subtree (the agent's --cgroup-root) and pin dir.
    pub fx: Fixture,
    /// The client node's netns.
    pub node: Fixture,
    pub pod: PathBuf,
    pub proxy_cg: PathBuf,
    pub client_cg: PathBuf,
    /// A process of the pod itself (for connections from inside the pod).
    pub app_cg: PathBuf,
}

pub fn world(name: &str) -> World {
    let fx = Fixture::new(&format!("in-{name}")).unwrap();
    let node = Fixture::new(&format!("in-{name}-node")).unwrap();
    veth_pair(&fx, "vpod", &node, "vnode").unwrap();
    // nodad: the IPv6 addresses are usable at once, not tentative for a second.
    for (f, dev, a4, a6) in [(&fx, "vpod", POD4, POD6), (&node, "vnode", NODE4, NODE6)] {
        f.ip(&["addr", "add", &format!("{a4}/24"), "dev", dev])
            .unwrap();
        f.ip(&["addr", "add", &format!("{a6}/64"), "dev", dev, "nodad"])
            .unwrap();
    }
    let pod = fx.cgroup("pod1").unwrap();
    let proxy_cg = fx.cgroup("pod1/proxy").unwrap();
    let app_cg = fx.cgroup("pod1/app").unwrap();
    let client_cg = node.cgroup("client").unwrap();
    World {
        fx,
        node,
        pod,
        proxy_cg,
        client_cg,
        app_cg,
    }
}

impl World {
    /// The agent config: one workload with the pod's netns and these pod annotations.
    pub fn config(&self, annotations: &[(&str, &str)]) -> String {
        let mut a = String::new();
        for (k, v) in annotations {
            a += &format!("{k:?}: {v:?}, ");
        }
        format!(
            "proxy: {{mode: sidecar, outboundPort: 15001, inboundPort: {INBOUND_PORT}, uid: 1337}}\n\
             workloads:\n  - {{name: pod1, namespace: test, cgroup: {}, proxyCgroup: {}, netns: {}, annotations: {{{a}}}}}\n",
            self.pod.display(),
            self.proxy_cg.display(),
            self.fx.netns_path().display()
        )
    }

    pub fn agent(&self, annotations: &[(&str, &str)]) -> Agent {
        Agent::start(&self.fx, &self.config(annotations)).unwrap()
    }

    /// Dual-stack app listeners (`[::]:PORT`), each answering `app-PORT`.
    pub fn apps(&self, ports: &[u16]) -> Vec<IdentityServer> {
        ports
            .iter()
            .map(|p| {
                serve_identity(
                    &self.fx,
                    format!("[::]:{p}").parse().unwrap(),
                    &format!("app-{p}"),
                )
                .unwrap()
            })
            .collect()
    }

    /// A redirect-sockprobe proxy on the inbound port (`listen` e.g. `[::]:15006`).
    pub fn proxy(&self, listen: &[&str]) -> redirect_tests::Spawned {
        start_proxy(&self.proxy_cg, self.fx.netns_file(), listen, false)
    }

    /// One sockprobe connection from the client node; its `proxy` field is the proxy's JSON
    /// report (getsockname, getpeername, SO_ORIGINAL_DST) or the app's reply as a string.
    pub fn report_from_node(&self, addr: &str) -> Value {
        client(&self.client_cg, self.node.netns_file(), addr)
    }

    /// Who answered a connection from the client node: `proxy`, `app-PORT`, or `failed: ERROR`.
    pub fn who(&self, addr: &str) -> String {
        who(&self.client_cg, self.node.netns_file(), addr)
    }

    /// The same from a process inside the pod.
    pub fn who_from_pod(&self, addr: &str) -> String {
        who(&self.app_cg, self.fx.netns_file(), addr)
    }
}

fn who(cg: &std::path::Path, netns: &std::fs::File, addr: &str) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_redirect-testclient"));
    cmd.args([
        "connect",
        addr,
        "--json",
        "--timeout-ms",
        "3000",
        "--send",
        "q\n",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let out = spawn_in_netns(cg, netns, &mut cmd)
        .wait_with_output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("testclient: {:?}", String::from_utf8_lossy(&out.stdout)));
    if v["ok"] != true {
        return format!("failed: {}", v["error"].as_str().unwrap_or("?"));
    }
    let reply = v["reply"].as_str().unwrap_or("").trim().to_string();
    if reply.starts_with('{') {
        "proxy".into()
    } else {
        reply
    }
}

/// One inbound counter as `inspect` reports it.
pub fn counter(agent: &Agent, name: &str) -> u64 {
    let v = agent.inspect().unwrap();
    v["inbound"]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("inspect shows no inbound counter {name}: {v}"))
}
