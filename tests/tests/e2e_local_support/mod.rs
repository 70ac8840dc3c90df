//! The e2e scenarios on this machine, with no cluster (tests/e2e_local.rs).
//!
//! Each scenario gets its own [`Fixture`] (cgroup subtree, netns, pin dir). In it:
//! - the destinations (`api`, `db` in the "cluster" range 198.18.0.0/16, `external` in
//!   198.19.0.0/16) are addresses on the netns's `lo`, served by redirect-testproxy in tag mode
//!   on every port of [`objects::SERVER_PORTS`];
//! - the client "pod" is a cgroup in the kubelet's cgroupfs layout,
//!   `kubepods/besteffort/pod<uid>/<container id>`, with an app container (the client runs
//!   there) and the proxy container (redirect-testproxy in forward mode as uid 1337, the stand-in
//!   sidecar of the kind test);
//! - the client pod's own address is [`POD_IP`] on a veth pair to a "client node" netns, from
//!   which inbound steps connect; the servers listening on every address of the netns are the
//!   pod's app for them, and the stand-in sidecar listens on the inbound port 15006 too;
//! - the agent is the real binary, `run --source kubernetes`, with the DaemonSet's capabilities,
//!   finding the pod cgroup the way it does on a node, and talking HTTP to the fake API of
//!   kube_support ([`FakeApi::serve`]), which holds the Pod, Namespace and MeshConfig objects the
//!   kind test applies.
pub mod agent;

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use redirect_tests::{
    Fixture, Spawned,
    e2e::{
        engine::{self, ClientLoop, Cluster, Conn, EventSeen, ScriptLoop},
        objects::{self, CLIENT_POD, INBOUND_PORT, MESH_CONFIG_NAMESPACE, PROXY_PORT, PROXY_UID},
        scenario::{self, AnnotationPatch, Scenario, Vars},
    },
    helper_bin, spawn_in_cgroup_netns, veth_pair,
};
use serde_json::{Value, json};

use crate::kube_support::fake_api::{FakeApi, Kind};
use agent::{AgentProc, NODE};

/// The client pod's address, on its veth to the client node (which has .1).
const POD_IP: &str = "198.19.2.2";
const NODE_IP: &str = "198.19.2.1";

/// The image name in the pod spec; locally nothing is pulled, it is only part of the object.
const IMAGE: &str = "redirect-e2e:local";

fn vars() -> Vars {
    scenario::local_vars()
}

/// The scenario names, in file order (each has its own test in e2e_local.rs).
pub fn names() -> Result<Vec<String>> {
    Ok(scenario::load(&vars(), None)?
        .into_iter()
        .map(|s| s.name)
        .collect())
}

/// Runs the scenario called `name` in a world of its own.
pub fn run(name: &str) -> Result<()> {
    let caps = agent::deployed_capabilities()?;
    let s = scenario::load(&vars(), Some(name))?
        .into_iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no scenario named {name}"))?;
    let mut world = Local::start(&s, &caps)?;
    let result = engine::run(&mut world, &s);
    if result.is_err() {
        eprintln!(
            "--- agent log (last 40 lines):\n{}",
            world.agent_log_tail(40)
        );
    }
    result
}

/// One scenario's world. Field order is drop order: processes before the fixture.
struct Local {
    vars: Vars,
    namespace: String,
    pod_uid: String,
    pod_cgroup: PathBuf,
    app: PathBuf,
    agent: Option<AgentProc>,
    proxy: Spawned,
    _servers: Spawned,
    api: FakeApi,
    /// Serves `api`; dropped after the agent, so the agent never sees the API vanish mid-run.
    _rt: tokio::runtime::Runtime,
    kubeconfig: PathBuf,
    caps: Vec<String>,
    workdir: PathBuf,
    restarts: u32,
    /// The client node's netns (inbound connections come from there) and its client cgroup.
    node_cg: PathBuf,
    node: Fixture,
    fx: Arc<Fixture>,
}

/// A pseudo-random UUID for the pod (its cgroup directory carries it, as the kubelet's does).
fn pod_uid(name: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let h = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    let a = t ^ h ^ u64::from(std::process::id());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        h & 0xfff,
        (h >> 16) & 0xffff_ffff_ffff
    )
}

/// A container id as the runtime names cgroups (64 hex digits).
fn container_id(uid: &str, container: &str) -> String {
    let seed: String = format!("{uid}{container}")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect();
    format!("{seed:0<64}").chars().take(64).collect()
}

impl Local {
    fn start(s: &Scenario, caps: &[String]) -> Result<Local> {
        let fx = Arc::new(Fixture::new(&format!("e2e-{}", s.name))?);
        let vars = vars();
        for host in ["api", "db", "external"] {
            fx.add_addr(&format!("{}/32", vars[host]))?;
        }
        let servers_cg = fx.cgroup("servers")?;
        let mut server = Command::new(helper_bin("redirect-testproxy")?);
        server.args(["--mode", "tag"]);
        for port in objects::SERVER_PORTS {
            server.args(["--listen", &format!("0.0.0.0:{port}")]);
        }
        let servers = fx.spawn_logged(&servers_cg, &mut server)?;
        let node = Fixture::new(&format!("e2e-{}-node", s.name))?;
        veth_pair(&fx, "vpod", &node, "vnode")?;
        fx.ip(&["addr", "add", &format!("{POD_IP}/24"), "dev", "vpod"])?;
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "vnode"])?;
        let node_cg = node.cgroup("client")?;
        servers.wait_for_prefix("listening ", Duration::from_secs(10))?;

        let uid = pod_uid(&s.name);
        let pod_rel = format!("kubepods/besteffort/pod{uid}");
        let pod_cgroup = fx.cgroup(&pod_rel)?;
        let app = fx.cgroup(&format!("{pod_rel}/{}", container_id(&uid, "app")))?;
        let proxy_cg = fx.cgroup(&format!("{pod_rel}/{}", container_id(&uid, "proxy")))?;
        let proxy = fx.spawn_logged(
            &proxy_cg,
            Command::new(helper_bin("redirect-testproxy")?).args([
                "--mode",
                "forward",
                "--listen",
                &format!("127.0.0.1:{PROXY_PORT}"),
                "--listen",
                &format!("0.0.0.0:{INBOUND_PORT}"),
                "--uid",
                &PROXY_UID.to_string(),
            ]),
        )?;
        proxy.wait_for_prefix("listening ", Duration::from_secs(10))?;

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (_, api) = {
            let _guard = rt.enter();
            FakeApi::start()
        };
        let api_addr = rt.block_on(api.serve()).context("serving the fake API")?;
        let api_url = format!("http://{api_addr}");
        api.put(
            Kind::Namespaces,
            objects::namespace(&s.namespace.name, &s.namespace.annotations),
        );
        let mut pod = objects::client_pod(s, IMAGE);
        pod["metadata"]["uid"] = json!(uid);
        pod["spec"]["nodeName"] = json!(NODE);
        pod["status"] = json!({"phase": "Running"});
        api.put(Kind::Pods, pod);
        if let Some(traffic) = &s.mesh_config {
            api.put(
                Kind::Namespaces,
                objects::namespace(MESH_CONFIG_NAMESPACE, &Default::default()),
            );
            api.put(Kind::MeshConfigs, objects::mesh_config(traffic));
        }

        let workdir = std::env::temp_dir().join(fx.name());
        fs::create_dir_all(&workdir)?;
        let kubeconfig = agent::write_kubeconfig(&workdir, &api_url)?;
        let agent = AgentProc::start(&fx, &kubeconfig, caps, workdir.join("agent-0.log"))?;
        println!(
            "  local world: netns {}, pod cgroup {}, agent pid {} (capabilities {}), API {}",
            fx.netns_name(),
            pod_cgroup.display(),
            agent.pid(),
            caps.join(","),
            api_url
        );
        Ok(Local {
            vars,
            namespace: s.namespace.name.clone(),
            pod_uid: uid,
            pod_cgroup,
            app,
            agent: Some(agent),
            proxy,
            _servers: servers,
            api,
            _rt: rt,
            kubeconfig,
            caps: caps.to_vec(),
            workdir,
            restarts: 0,
            node_cg,
            node,
            fx,
        })
    }

    fn agent_log_tail(&self, n: usize) -> String {
        let log = self.agent.as_ref().map(|a| a.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn client(&self) -> Result<PathBuf> {
        helper_bin("redirect-testclient")
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

impl Cluster for Local {
    fn vars(&self) -> &Vars {
        &self.vars
    }

    fn set_mesh_traffic(&mut self, traffic: &Value) -> Result<()> {
        self.api
            .put(Kind::MeshConfigs, objects::mesh_config(traffic));
        Ok(())
    }

    fn annotate_pod(&mut self, patch: &AnnotationPatch) -> Result<()> {
        let mut pod = self
            .api
            .get(Kind::Pods, &self.namespace, CLIENT_POD)
            .context("the client pod is gone")?;
        objects::patch_annotations(&mut pod, patch);
        self.api.put(Kind::Pods, pod);
        Ok(())
    }

    fn annotate_namespace(&mut self, patch: &AnnotationPatch) -> Result<()> {
        let mut ns = self
            .api
            .get(Kind::Namespaces, "", &self.namespace)
            .context("the namespace is gone")?;
        objects::patch_annotations(&mut ns, patch);
        self.api.put(Kind::Namespaces, ns);
        Ok(())
    }

    fn connect(&mut self, to: SocketAddr) -> Result<Conn> {
        let out = self.fx.run_in(
            &self.app,
            Command::new(self.client()?).args([
                "connect",
                &to.to_string(),
                "--json",
                "--timeout-ms",
                "3000",
            ]),
        )?;
        Conn::from_json(&String::from_utf8_lossy(&out.stdout))
    }

    fn pod_ip(&mut self) -> Result<IpAddr> {
        Ok(POD_IP.parse()?)
    }

    fn connect_inbound(&mut self, to: SocketAddr) -> Result<Conn> {
        let mut cmd = Command::new(self.client()?);
        cmd.args(["connect", &to.to_string(), "--json", "--timeout-ms", "3000"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let out = spawn_in_cgroup_netns(&self.node_cg, self.node.netns_file(), &mut cmd)?
            .wait_with_output()?;
        Conn::from_json(&String::from_utf8_lossy(&out.stdout))
    }

    fn proxy_log(&mut self) -> Result<Vec<(String, String)>> {
        let lines = self.proxy.lines();
        Ok(engine::parse_proxy_log(lines.iter().map(String::as_str)))
    }

    fn pod_events(&mut self) -> Result<Vec<EventSeen>> {
        Ok(self
            .api
            .posted_events()
            .iter()
            .filter(|e| {
                e["regarding"]["name"] == CLIENT_POD
                    && e["regarding"]["namespace"] == *self.namespace
            })
            .map(|e| EventSeen {
                reason: e["reason"].as_str().unwrap_or_default().to_string(),
                message: e["note"].as_str().unwrap_or_default().to_string(),
            })
            .collect())
    }

    fn start_loop(&mut self, to: SocketAddr) -> Result<Box<dyn ClientLoop>> {
        let stop_file = self.workdir.join("stop-loop");
        let client = self.client()?;
        let script = objects::loop_script(
            &client.display().to_string(),
            to,
            &stop_file.display().to_string(),
        );
        let proc = self
            .fx
            .spawn_logged(&self.app, Command::new("sh").args(["-c", &script]))?;
        Ok(Box::new(ScriptLoop {
            proc,
            stop: Box::new(move || Ok(fs::write(&stop_file, "")?)),
            timeout: Duration::from_secs(30),
        }))
    }

    fn restart_agent(&mut self) -> Result<String> {
        let mut old = self.agent.take().context("no agent running")?;
        let old_pid = old.pid();
        let status = old.terminate()?;
        self.restarts += 1;
        let log = self.workdir.join(format!("agent-{}.log", self.restarts));
        let new = AgentProc::start(&self.fx, &self.kubeconfig, &self.caps, log)?;
        let msgs = new.messages();
        let count = |m: &str| msgs.iter().filter(|v| v["message"] == m).count();
        let line = format!(
            "agent pid {old_pid} stopped by SIGTERM ({status}); pid {} took over the pinned maps and links \
             ({} link(s) adopted, {} attached anew and swapped in) and is ready",
            new.pid(),
            count("adopted pinned link"),
            count("attached")
        );
        self.agent = Some(new);
        Ok(line)
    }

    fn incarnation(&mut self) -> Result<String> {
        let ino = fs::metadata(&self.pod_cgroup)?.ino();
        if self.proxy.child_mut().try_wait()?.is_some() {
            bail!("the proxy container's process exited");
        }
        Ok(format!(
            "pod uid {}, pod cgroup inode {ino}, proxy pid {}",
            self.pod_uid,
            self.proxy.pid()
        ))
    }
}
