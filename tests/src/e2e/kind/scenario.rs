//! One scenario in the kind cluster: its namespace, MeshConfig and client pod, and the
//! [`Cluster`] operations as kubectl commands.
use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::Spawned;
use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    AGENT_LABEL, AGENT_NS, E2E_IMAGE, SERVERS_NS, STOP_FILE,
    kube::{Kube, output},
};
use crate::e2e::{
    engine::{self, ClientLoop, Cluster, Conn, EventSeen, ScriptLoop},
    objects::{
        self, APP_CONTAINER, CLIENT_POD, MESH_CONFIG_NAME, MESH_CONFIG_NAMESPACE, PROXY_CONTAINER,
    },
    scenario::{AnnotationPatch, Scenario, Vars},
};

/// The server pod that inbound steps connect from.
const SERVER_POD: &str = "server-api";
/// [`KindScenario::exec_cmd`]'s name for the client pod, in the scenario's namespace.
const CLIENT: (&str, &str) = ("", CLIENT_POD);

/// redirect-testclient's arguments for one connect to `to`, reported as JSON.
fn testclient(to: SocketAddr) -> Vec<String> {
    [
        "redirect-testclient",
        "connect",
        &to.to_string(),
        "--json",
        "--timeout-ms",
        "3000",
    ]
    .map(String::from)
    .to_vec()
}

pub struct KindScenario<'a> {
    kube: &'a Kube,
    vars: Vars,
    ns: String,
    mesh_config: bool,
}

impl<'a> KindScenario<'a> {
    pub fn start(kube: &'a Kube, s: &Scenario, vars: Vars) -> Result<Self> {
        kube.apply(&objects::namespace(
            &s.namespace.name,
            &s.namespace.annotations,
        ))?;
        if let Some(traffic) = &s.mesh_config {
            kube.apply(&objects::namespace(
                MESH_CONFIG_NAMESPACE,
                &Default::default(),
            ))?;
            kube.apply(&objects::mesh_config(traffic))?;
        }
        kube.apply(&objects::client_pod(s, E2E_IMAGE))?;
        kube.wait_ready(&s.namespace.name, &format!("pod/{CLIENT_POD}"))?;
        Ok(KindScenario {
            kube,
            vars,
            ns: s.namespace.name.clone(),
            mesh_config: s.mesh_config.is_some(),
        })
    }

    /// `kubectl exec` into `container` of a pod ([`CLIENT`]: the client pod), `--`
    /// included: the caller adds the command.
    fn exec_cmd(&self, (ns, pod): (&str, &str), container: &str) -> Command {
        let ns = if ns.is_empty() { &self.ns } else { ns };
        let mut cmd = self.kube.cmd();
        cmd.args(["-n", ns, "exec", pod, "-c", container, "--"]);
        cmd
    }

    fn exec(&self, container: &str, argv: &[&str]) -> Result<String> {
        self.kube.run(
            &[
                &["-n", &self.ns, "exec", CLIENT_POD, "-c", container, "--"],
                argv,
            ]
            .concat(),
        )
    }

    pub fn teardown(&mut self) {
        let _ = self
            .kube
            .run(&["delete", "namespace", &self.ns, "--wait=false"]);
        if self.mesh_config {
            let _ = self.kube.run(&[
                "-n",
                MESH_CONFIG_NAMESPACE,
                "delete",
                "meshconfig",
                MESH_CONFIG_NAME,
            ]);
        }
    }

    fn agent_pods(&self) -> Result<Vec<(String, bool)>> {
        let list = self
            .kube
            .json(&["-n", AGENT_NS, "get", "pods", "-l", AGENT_LABEL])?;
        Ok(list["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|p| {
                let ready = p["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
                let deleting = !p["metadata"]["deletionTimestamp"].is_null();
                (
                    p["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    ready && !deleting,
                )
            })
            .collect())
    }
}

impl Cluster for KindScenario<'_> {
    fn vars(&self) -> &Vars {
        &self.vars
    }

    fn set_mesh_traffic(&mut self, traffic: &Value) -> Result<()> {
        self.kube.apply(&objects::mesh_config(traffic))
    }

    fn annotate_pod(&mut self, patch: &AnnotationPatch) -> Result<()> {
        let p = objects::annotation_merge_patch(patch).to_string();
        self.kube
            .run(&[
                "-n", &self.ns, "patch", "pod", CLIENT_POD, "--type", "merge", "-p", &p,
            ])
            .map(drop)
    }

    fn annotate_namespace(&mut self, patch: &AnnotationPatch) -> Result<()> {
        let p = objects::annotation_merge_patch(patch).to_string();
        self.kube
            .run(&["patch", "namespace", &self.ns, "--type", "merge", "-p", &p])
            .map(drop)
    }

    fn connect(&mut self, to: SocketAddr) -> Result<Conn> {
        // A failed connect exits non-zero but still prints its JSON line.
        let out = self
            .exec_cmd(CLIENT, APP_CONTAINER)
            .args(testclient(to))
            .output()?;
        Conn::from_json(&String::from_utf8_lossy(&out.stdout))
    }

    fn pod_ip(&mut self) -> Result<IpAddr> {
        let pod = self
            .kube
            .json(&["-n", &self.ns, "get", "pod", CLIENT_POD])?;
        let ip = pod["status"]["podIP"]
            .as_str()
            .context("the client pod has no podIP")?;
        Ok(ip.parse()?)
    }

    /// From the `api` server pod (another pod of the cluster, not meshed) to the client pod.
    fn connect_inbound(&mut self, to: SocketAddr) -> Result<Conn> {
        let out = self
            .exec_cmd((SERVERS_NS, SERVER_POD), "server")
            .args(testclient(to))
            .output()?;
        Conn::from_json(&String::from_utf8_lossy(&out.stdout))
    }

    fn proxy_log(&mut self) -> Result<Vec<(String, String)>> {
        let text = self
            .kube
            .run(&["-n", &self.ns, "logs", CLIENT_POD, "-c", PROXY_CONTAINER])?;
        Ok(engine::parse_proxy_log(text.lines()))
    }

    fn pod_events(&mut self) -> Result<Vec<EventSeen>> {
        let list = self.kube.json(&["-n", &self.ns, "get", "events"])?;
        Ok(list["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|e| e["involvedObject"]["name"] == CLIENT_POD)
            .map(|e| EventSeen {
                reason: e["reason"].as_str().unwrap_or_default().to_string(),
                message: e["message"].as_str().unwrap_or_default().to_string(),
            })
            .collect())
    }

    fn start_loop(&mut self, to: SocketAddr) -> Result<Box<dyn ClientLoop>> {
        self.exec(APP_CONTAINER, &["rm", "-f", STOP_FILE])?;
        let script = objects::loop_script("redirect-testclient", to, STOP_FILE);
        let child = self
            .exec_cmd(CLIENT, APP_CONTAINER)
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stop = self.exec_cmd(CLIENT, APP_CONTAINER);
        stop.args(["touch", STOP_FILE]);
        Ok(Box::new(ScriptLoop {
            proc: Spawned::new(child),
            stop: Box::new(move || output(&mut stop).map(drop)),
            timeout: Duration::from_secs(60),
        }))
    }

    fn restart_agent(&mut self) -> Result<String> {
        let before = self.agent_pods()?;
        let [(old, _)] = before.as_slice() else {
            bail!("expected one agent pod (one node), found {before:?}");
        };
        let started = Instant::now();
        self.kube
            .run(&["-n", AGENT_NS, "delete", "pod", old, "--wait=true"])?;
        loop {
            if let Some((new, _)) = self
                .agent_pods()?
                .into_iter()
                .find(|(n, ready)| n != old && *ready)
            {
                let logs = self
                    .kube
                    .run(&["-n", AGENT_NS, "logs", &new])
                    .unwrap_or_default();
                return Ok(format!(
                    "agent pod {old} deleted (SIGTERM); {new} ready after {:.1} s ({} link(s) adopted, {} attached anew)",
                    started.elapsed().as_secs_f64(),
                    logs.matches("adopted pinned link").count(),
                    logs.matches("\"attached\"").count(),
                ));
            }
            if started.elapsed() > Duration::from_secs(180) {
                bail!("no new ready agent pod 180 s after deleting {old}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn incarnation(&mut self) -> Result<String> {
        let pod = self
            .kube
            .json(&["-n", &self.ns, "get", "pod", CLIENT_POD])?;
        let restarts: Vec<String> = pod["status"]["containerStatuses"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|c| {
                format!(
                    "{}={}",
                    c["name"].as_str().unwrap_or("?"),
                    c["restartCount"]
                )
            })
            .collect();
        Ok(format!(
            "pod uid {}, restarts {}",
            pod["metadata"]["uid"].as_str().unwrap_or("?"),
            restarts.join(",")
        ))
    }
}
