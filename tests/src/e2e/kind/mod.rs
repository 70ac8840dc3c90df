//! `cargo xtask e2e-kind`: the e2e scenarios in a real kind cluster (machines with Docker and
//! kind). Creates the cluster, builds the agent and e2e images from the Dockerfile and loads them,
//! applies deploy/overlays/kind (the CRD, RBAC and the DaemonSet), starts the destination servers,
//! runs every scenario with its own namespace and client pod, and deletes the cluster (unless
//! `--keep`).
mod kube;
mod scenario;
mod util;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::{
    engine, objects,
    scenario::{self as scenarios, Vars},
};
use kube::{ClusterGuard, Kube, ensure_bpffs, output, prerequisites};
use scenario::KindScenario;

const AGENT_IMAGE: &str = "redirect-agent:e2e";
const E2E_IMAGE: &str = "redirect-e2e:e2e";
const AGENT_NS: &str = "redirect-system";
const AGENT_LABEL: &str = "app.kubernetes.io/name=redirect-agent";
const SERVERS_NS: &str = "redirect-e2e-servers";
/// kind's pod subnet, set explicitly in the cluster config: the scenarios' "cluster range".
const POD_SUBNET: &str = "10.244.0.0/16";
const STOP_FILE: &str = "/tmp/redirect-e2e-stop-loop";
#[derive(Debug, clap::Args)]
pub struct KindArgs {
    /// kind cluster name.
    #[arg(long, default_value = "redirect-e2e")]
    pub cluster: String,
    /// Keep the cluster afterwards (to look around with kubectl --context kind-<name>).
    #[arg(long)]
    pub keep: bool,
    /// Skip the image builds (reuse redirect-agent:e2e and redirect-e2e:e2e from the local Docker).
    #[arg(long)]
    pub no_build: bool,
    /// Run only the scenarios whose name contains this.
    pub filter: Option<String>,
}

pub fn run(args: &KindArgs) -> Result<()> {
    prerequisites()?;
    let root = util::workspace_root();
    util::step(&format!("creating kind cluster {}", args.cluster));
    let config = root.join("target/e2e-kind-config.yaml");
    std::fs::create_dir_all(root.join("target"))?;
    std::fs::write(
        &config,
        format!(
            "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnetworking:\n  podSubnet: \"{POD_SUBNET}\"\nnodes:\n  - role: control-plane\n"
        ),
    )?;
    util::run(
        Command::new("kind")
            .args([
                "create",
                "cluster",
                "--name",
                &args.cluster,
                "--wait",
                "180s",
                "--config",
            ])
            .arg(&config),
    )?;
    let _guard = ClusterGuard {
        name: args.cluster.clone(),
        keep: args.keep,
    };
    let kube = Kube {
        context: format!("kind-{}", args.cluster),
    };
    for node in
        output(Command::new("kind").args(["get", "nodes", "--name", &args.cluster]))?.lines()
    {
        ensure_bpffs(node.trim())?;
    }
    if !args.no_build {
        for (target, tag) in [("agent", AGENT_IMAGE), ("e2e", E2E_IMAGE)] {
            util::step(&format!("docker build --target {target} -t {tag}"));
            util::run(
                Command::new("docker")
                    .args(["build", "--target", target, "-t", tag, "."])
                    .current_dir(&root),
            )?;
        }
    }
    for image in [AGENT_IMAGE, E2E_IMAGE] {
        util::run(Command::new("kind").args([
            "load",
            "docker-image",
            image,
            "--name",
            &args.cluster,
        ]))?;
    }
    // The CRD first, established before the agent starts, so that the agent's first MeshConfig
    // list finds the resource instead of backing off on a 404.
    kube.run(&[
        "apply",
        "-k",
        &root.join("deploy/crds").display().to_string(),
    ])?;
    kube.run(&[
        "wait",
        "--for=condition=Established",
        "crd/meshconfigs.config.flomesh.io",
        "--timeout=60s",
    ])?;
    util::step("kubectl apply -k deploy/overlays/kind");
    kube.run(&[
        "apply",
        "-k",
        &root.join("deploy/overlays/kind").display().to_string(),
    ])?;
    kube.run(&[
        "-n",
        AGENT_NS,
        "rollout",
        "status",
        "daemonset/redirect-agent",
        "--timeout=180s",
    ])?;
    let vars = start_servers(&kube)?;
    println!("  destinations: {vars:?}");

    let scenarios = scenarios::load(&vars, args.filter.as_deref())?;
    let mut failed = Vec::new();
    for s in &scenarios {
        let result = KindScenario::start(&kube, s, vars.clone()).and_then(|mut c| {
            let r = engine::run(&mut c, s);
            c.teardown();
            r
        });
        match result {
            Ok(()) => println!("  PASS {}", s.name),
            Err(e) => {
                eprintln!("  FAIL {}: {e:#}", s.name);
                if let Ok(logs) =
                    kube.run(&["-n", AGENT_NS, "logs", "-l", AGENT_LABEL, "--tail=40"])
                {
                    eprintln!("--- agent log:\n{logs}");
                }
                failed.push(s.name.clone());
            }
        }
    }
    util::step(&format!(
        "e2e-kind: {} of {} scenarios passed",
        scenarios.len() - failed.len(),
        scenarios.len()
    ));
    if !failed.is_empty() {
        bail!("e2e-kind scenarios failed: {}", failed.join(", "));
    }
    Ok(())
}

fn server_pod(name: &str, host_network: bool) -> Value {
    let mut cmd = vec![
        "redirect-testproxy".to_string(),
        "--mode".into(),
        "tag".into(),
    ];
    for port in objects::SERVER_PORTS {
        cmd.extend(["--listen".to_string(), format!("0.0.0.0:{port}")]);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": SERVERS_NS, "labels": {objects::E2E_LABEL: "true"}},
        "spec": {
            "hostNetwork": host_network,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "server", "image": E2E_IMAGE, "imagePullPolicy": "Never", "command": cmd}],
        },
    })
}

/// The destination servers: `api` and `db` are pods (in the cluster range), `external` is a
/// hostNetwork pod, i.e. the node's address, outside it.
fn start_servers(kube: &Kube) -> Result<Vars> {
    kube.apply(&objects::namespace(SERVERS_NS, &Default::default()))?;
    let pods = [
        ("api", "server-api", false),
        ("db", "server-db", false),
        ("external", "server-external", true),
    ];
    for (_, name, host) in pods {
        kube.apply(&server_pod(name, host))?;
    }
    let mut vars = Vars::new();
    for (var, name, _) in pods {
        kube.wait_ready(SERVERS_NS, &format!("pod/{name}"))?;
        let pod = kube.json(&["-n", SERVERS_NS, "get", "pod", name])?;
        let ip = pod["status"]["podIP"]
            .as_str()
            .context("server pod without podIP")?;
        vars.insert(var.to_string(), ip.to_string());
    }
    vars.insert("cluster_cidr".into(), POD_SUBNET.into());
    Ok(vars)
}
