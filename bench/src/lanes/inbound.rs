//! Inbound lanes: a "client node" netns joined to the pod's netns by a veth pair (as in
//! tests/tests/inbound_support), the app (the bench server) and the proxy's inbound listener in
//! the pod, the client on the node connecting to the pod's address. The interception is in the
//! pod: istio-iptables' ISTIO_INBOUND in PREROUTING, or the agent's sk_lookup program.
use std::sync::Mutex;

use anyhow::Result;
use redirect_tests::Fixture;

use super::{Lane, Start, start_server};
use crate::{
    Bins, PROXY_UID,
    results::{Kind, Mode},
};

/// The pod's address on its veth (the node side is .1).
pub const POD: &str = "198.19.2.2";
const NODE: &str = "198.19.2.1";
/// The app's port, which every mode's client connects to (but direct-proxy).
pub const APP_PORT: u16 = 8080;
/// The proxy's inbound listener (Istio's and the agent's default `inboundPort`).
pub const INBOUND_PORT: u16 = 15006;
const EXCLUDE: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

impl Lane {
    pub fn inbound(mode: Mode, bins: &Bins) -> Result<Lane> {
        let fx = Fixture::new(&format!("bench-in-{}", mode.name()))?;
        let node = Fixture::new(&format!("bench-in-{}-node", mode.name()))?;
        fx.ip(&[
            "link",
            "add",
            "vpod",
            "type",
            "veth",
            "peer",
            "name",
            "vnode",
            "netns",
            node.netns_name(),
        ])?;
        for (f, dev, addr) in [(&fx, "vpod", POD), (&node, "vnode", NODE)] {
            f.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev])?;
            f.ip(&["link", "set", dev, "up"])?;
        }
        let pod = fx.cgroup("pod")?;
        let app = fx.cgroup("pod/app")?;
        let proxy_cg = fx.cgroup("pod/proxy")?;
        let tools = fx.cgroup("tools")?;
        let client_cg = node.cgroup("client")?;
        let worker = bins.worker.clone();
        let app_addr = format!("{POD}:{APP_PORT}").parse()?;
        let server = start_server(
            &fx,
            &app,
            &worker,
            &format!("0.0.0.0:{APP_PORT}"),
            "the bench app",
        )?;
        let proxy_listen = format!("0.0.0.0:{INBOUND_PORT}").parse()?;
        let dst = if mode == Mode::DirectToProxy {
            format!("{POD}:{INBOUND_PORT}").parse()?
        } else {
            app_addr
        };
        let mut lane = Lane {
            mode,
            inbound: true,
            client: Mutex::new(None),
            agent: None,
            applied_config: String::new(),
            proxy: None,
            proxy_kind: Kind::InboundProxied,
            proxy_bin: bins.proxy.clone(),
            proxy_listen,
            fallback: app_addr,
            _server: server,
            pod,
            proxy_cg,
            app: client_cg,
            tools,
            dst,
            worker,
            fx,
            node: Some(node),
        };
        // The agent first: its sockops program records the proxy's listener when it starts
        // listening, so a listener older than the programs is not found (refused: fail closed).
        lane.start_interception(&bins.agent, Start::AgentFirst)?;
        Ok(lane)
    }
}

/// The agent's standalone config for an inbound lane: the pod with its netns, the proxy's
/// inbound port, and `ports` excluded by the Istio annotation.
pub fn agent_config(lane: &Lane, ports: &[String]) -> String {
    let annotations = if ports.is_empty() {
        String::new()
    } else {
        format!("\n    annotations: {{{EXCLUDE}: \"{}\"}}", ports.join(","))
    };
    format!(
        "proxy: {{mode: sidecar, outboundPort: 15001, inboundPort: {INBOUND_PORT}, uid: {PROXY_UID}}}\n\
         workloads:\n  - name: app\n    namespace: bench\n    cgroup: {}\n    proxyCgroup: {}\n    netns: {}{annotations}\n",
        lane.pod.display(),
        lane.proxy_cg.display(),
        lane.fx.netns_path().display()
    )
}
