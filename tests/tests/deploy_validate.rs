//! deploy/ checked offline, as a test of its own (`cargo test --test deploy_validate`; part of
//! `cargo test`, so of `cargo xtask test`). Needs no root and no cluster.
//!
//! 1. Render each kustomization (deploy/, deploy/overlays/kind, deploy/uninstall) with
//!    `kubectl kustomize` (or a standalone `kustomize`). Only when neither exists is this skipped,
//!    with a message saying so; the resource files are then collected from the kustomizations'
//!    `resources:` lists instead, so every other check still runs.
//! 2. The least-privilege rules of docs/deploy.md, checked on the rendered objects (below).
//! 3. kubernetes-validate (PyPI; it ships the Kubernetes schemas) on every rendered object,
//!    strict (unknown fields are errors).
//! 4. The MeshConfig CRD against its own schema: deploy/examples/meshconfig.yaml must validate
//!    against its openAPIV3Schema (python `jsonschema`), and broken copies of it must not.
//!
//! The PyPI packages go into a venv under target/validate-deploy/ the first time (python3 and
//! python3-venv come with `cargo xtask setup`'s test tools).
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Deserialize as _;
use serde_yaml::Value;

/// Rendered kustomizations: (name, directory under deploy/).
const KUSTOMIZATIONS: [(&str, &str); 3] = [
    ("default", "."),
    ("kind", "overlays/kind"),
    ("uninstall", "uninstall"),
];

/// The agent's capabilities, as proven by tests/tests/capabilities.rs: the datapath's three, and
/// SYS_ADMIN and SYS_PTRACE for inbound interception (with hostPID).
const AGENT_CAPS: [&str; 5] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"];

/// (apiGroup, resource, verb) the agent's ClusterRole grants: exactly these.
const RBAC: [(&str, &str, &str); 11] = [
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "namespaces", "get"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("config.flomesh.io", "meshconfigs", "get"),
    ("config.flomesh.io", "meshconfigs", "list"),
    ("config.flomesh.io", "meshconfigs", "watch"),
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "list"),
];

const PY_PACKAGES: [&str; 3] = ["kubernetes-validate", "jsonschema", "pyyaml"];
const CRD_CHECK: &str = include_str!("deploy_support/validate_crd.py");

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// Renders every kustomization and runs all four checks on the result.
#[test]
fn deploy_renders_and_validates() -> Result<()> {
    let root = workspace_root();
    let deploy = root.join("deploy");
    let crd = deploy.join("crds/meshconfig.yaml");
    ensure!(
        crd.is_file(),
        "{} is missing: generate it with `redirect-agent crd > deploy/crds/meshconfig.yaml`",
        crd.display()
    );
    let out = root.join("target/validate-deploy");
    fs::create_dir_all(&out)?;

    let renderer = kustomize();
    let mut rendered = Vec::new();
    for (name, dir) in KUSTOMIZATIONS {
        let dir = deploy.join(dir);
        let text = match &renderer {
            Some(cmd) => render(cmd, &dir)?,
            None => collect(&dir)?,
        };
        let file = out.join(format!("{name}.yaml"));
        fs::write(&file, &text)?;
        let docs = parse_docs(&text).with_context(|| format!("rendering of {}", dir.display()))?;
        eprintln!("    {name}: {} objects", docs.len());
        rendered.push((name, file, docs));
    }
    match &renderer {
        Some(cmd) => eprintln!("    kustomize build: ok ({})", cmd.join(" ")),
        None => eprintln!(
            "    kustomize build: SKIPPED (neither `kubectl kustomize` nor `kustomize` is installed); \
             the resources listed in the kustomizations were checked as they are, without overlays' patches"
        ),
    }

    for (name, _, docs) in &rendered {
        check_no_privileged(docs).with_context(|| format!("{name} rendering"))?;
        if *name != "uninstall" {
            check_agent(docs).with_context(|| format!("{name} rendering"))?;
            check_rbac(docs).with_context(|| format!("{name} rendering"))?;
            check_has_crd(docs).with_context(|| format!("{name} rendering"))?;
        }
    }
    eprintln!(
        "    least privilege: ok (capabilities {}, no privileged container, RBAC as listed)",
        AGENT_CAPS.join(", ")
    );

    let python = venv(&out)?;
    let files: Vec<&PathBuf> = rendered.iter().map(|(_, f, _)| f).collect();
    let mut kv = Command::new(&python);
    kv.args(["-m", "kubernetes_validate", "--strict"])
        .args(&files);
    run(&mut kv).context("kubernetes-validate rejected a rendered manifest")?;
    eprintln!("    kubernetes-validate --strict: ok");

    let script = out.join("validate_crd.py");
    fs::write(&script, CRD_CHECK)?;
    run(Command::new(&python)
        .arg(&script)
        .arg(&crd)
        .arg(deploy.join("examples/meshconfig.yaml")))
    .context("the MeshConfig CRD check failed")?;
    Ok(())
}

/// `kubectl kustomize` if kubectl has it, else a standalone `kustomize build`.
fn kustomize() -> Option<Vec<String>> {
    let works = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&["kubectl", "kustomize", "--help"]) {
        Some(vec!["kubectl".into(), "kustomize".into()])
    } else if works(&["kustomize", "version"]) {
        Some(vec!["kustomize".into(), "build".into()])
    } else {
        None
    }
}

fn render(cmd: &[String], dir: &Path) -> Result<String> {
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .arg(dir)
        .output()
        .with_context(|| format!("running {}", cmd.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} {}: {}",
            cmd.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Without kustomize: the files named by `resources:`, recursively, concatenated.
fn collect(dir: &Path) -> Result<String> {
    let k = dir.join("kustomization.yaml");
    let text = fs::read_to_string(&k).with_context(|| format!("reading {}", k.display()))?;
    let kust: Value = serde_yaml::from_str(&text)?;
    let mut out = String::new();
    for r in kust["resources"].as_sequence().into_iter().flatten() {
        let path = dir.join(r.as_str().context("a resource that is not a string")?);
        if path.is_dir() {
            out.push_str(&collect(&path)?);
        } else {
            out.push_str("---\n");
            out.push_str(
                &fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
            );
        }
    }
    Ok(out)
}

fn parse_docs(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(d)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name}"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect()
}

/// No container anywhere is privileged or escalates; only the agent shares the host's PID
/// namespace (inbound interception finds pods' netns from their pids).
fn check_no_privileged(docs: &[Value]) -> Result<()> {
    for d in docs {
        let spec = &d["spec"]["template"]["spec"];
        if spec.is_null() {
            continue;
        }
        let name = d["metadata"]["name"].as_str().unwrap_or("?");
        let agent = d["kind"] == "DaemonSet" && name == "redirect-agent";
        ensure!(
            (agent || spec["hostPID"] != true) && spec["hostIPC"] != true,
            "{name}: hostPID/hostIPC"
        );
        let containers = spec["containers"].as_sequence().into_iter().flatten();
        let init = spec["initContainers"].as_sequence().into_iter().flatten();
        for c in containers.chain(init) {
            let sc = &c["securityContext"];
            let cname = c["name"].as_str().unwrap_or("?");
            ensure!(sc["privileged"] != true, "{name}/{cname}: privileged: true");
            ensure!(
                sc["allowPrivilegeEscalation"] == false,
                "{name}/{cname}: allowPrivilegeEscalation must be false"
            );
            ensure!(
                strs(&sc["capabilities"]["drop"]) == ["ALL"],
                "{name}/{cname}: capabilities.drop must be [ALL]"
            );
            let add = strs(&sc["capabilities"]["add"]);
            ensure!(
                add.iter().all(|c| AGENT_CAPS.contains(&c.as_str())),
                "{name}/{cname}: capabilities.add {add:?} goes beyond {AGENT_CAPS:?}"
            );
        }
    }
    Ok(())
}

fn check_agent(docs: &[Value]) -> Result<()> {
    let ds = find(docs, "DaemonSet", "redirect-agent")?;
    let spec = &ds["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    let add: BTreeSet<String> = strs(&sc["capabilities"]["add"]).into_iter().collect();
    let want: BTreeSet<String> = AGENT_CAPS.iter().map(|s| s.to_string()).collect();
    ensure!(
        add == want,
        "agent capabilities {add:?}, expected exactly {want:?}"
    );
    ensure!(
        spec["hostNetwork"] != true,
        "the agent needs no host network"
    );
    ensure!(
        spec["hostPID"] == true,
        "the agent needs hostPID: true (inbound interception reads pods' /proc/PID/ns/net)"
    );
    ensure!(
        ds["spec"]["updateStrategy"]["type"] == "RollingUpdate",
        "updateStrategy must be RollingUpdate"
    );
    ensure!(
        spec["priorityClassName"] == "system-node-critical",
        "priorityClassName must be system-node-critical"
    );
    let tolerates_all = spec["tolerations"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null());
    ensure!(
        tolerates_all,
        "the agent must tolerate every taint (operator: Exists, no key)"
    );
    let env = c["env"].as_sequence().cloned().unwrap_or_default();
    let node = env.iter().find(|e| e["name"] == "NODE_NAME");
    ensure!(
        node.is_some_and(|e| e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "NODE_NAME must come from the downward API (spec.nodeName)"
    );
    // Probes on the admin port, which is where the agent serves them.
    let admin = env
        .iter()
        .find(|e| e["name"] == "REDIRECT_ADMIN_ADDR")
        .and_then(|e| e["value"].as_str())
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse::<u64>().ok())
        .context("REDIRECT_ADMIN_ADDR with a port")?;
    let port = c["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "admin")
        .and_then(|p| p["containerPort"].as_u64())
        .context("an `admin` container port")?;
    ensure!(
        port == admin,
        "the admin port {port} is not REDIRECT_ADMIN_ADDR's {admin}"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/livez")] {
        let p = &c[probe]["httpGet"];
        ensure!(
            p["path"] == path && (p["port"] == "admin" || p["port"].as_u64() == Some(admin)),
            "{probe} must GET {path} on the admin port"
        );
    }
    for (kind, res) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "cpu"),
        ("limits", "memory"),
    ] {
        ensure!(
            !c["resources"][kind][res].is_null(),
            "resources.{kind}.{res} is missing"
        );
    }
    // Nothing detaches on a restart: no preStop, and cleanup is not the agent's command.
    ensure!(
        c["lifecycle"]["preStop"].is_null(),
        "the agent must have no preStop hook"
    );
    let argv = [strs(&c["command"]), strs(&c["args"])].concat();
    ensure!(
        !argv.iter().any(|a| a.contains("cleanup")),
        "the agent DaemonSet must never run cleanup: {argv:?}"
    );
    let host_paths: BTreeSet<String> = spec["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| v["hostPath"]["path"].as_str().map(str::to_string))
        .collect();
    for p in ["/sys/fs/bpf", "/sys/fs/cgroup"] {
        ensure!(host_paths.contains(p), "hostPath {p} is not mounted");
    }
    Ok(())
}

fn check_rbac(docs: &[Value]) -> Result<()> {
    let role = find(docs, "ClusterRole", "redirect-agent")?;
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().into_iter().flatten() {
        for g in strs(&rule["apiGroups"]) {
            for r in strs(&rule["resources"]) {
                for v in strs(&rule["verbs"]) {
                    granted.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    let want: BTreeSet<(String, String, String)> = RBAC
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    let extra: Vec<_> = granted.difference(&want).collect();
    let missing: Vec<_> = want.difference(&granted).collect();
    ensure!(
        extra.is_empty() && missing.is_empty(),
        "ClusterRole redirect-agent: extra grants {extra:?}, missing grants {missing:?}"
    );
    let binding = find(docs, "ClusterRoleBinding", "redirect-agent")?;
    ensure!(
        binding["roleRef"]["name"] == "redirect-agent",
        "the binding must name the role"
    );
    Ok(())
}

fn check_has_crd(docs: &[Value]) -> Result<()> {
    find(
        docs,
        "CustomResourceDefinition",
        "meshconfigs.config.flomesh.io",
    )
    .map(drop)
}

/// The venv's python with the PyPI packages, created and filled if missing.
fn venv(out: &Path) -> Result<PathBuf> {
    let dir = out.join("venv");
    let python = dir.join("bin/python");
    let ready = |p: &Path| {
        Command::new(p)
            .args(["-c", "import kubernetes_validate, jsonschema, yaml"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if python.exists() && ready(&python) {
        return Ok(python);
    }
    eprintln!(
        "    installing {} from PyPI into {}",
        PY_PACKAGES.join(", "),
        dir.display()
    );
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&dir))
            .context("creating a Python venv (Debian: apt-get install python3-venv)")?;
    }
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PY_PACKAGES))?;
    ensure!(
        ready(&python),
        "the venv at {} still lacks the packages",
        dir.display()
    );
    Ok(python)
}

fn deploy_docs(dir: &str) -> Vec<Value> {
    let root = workspace_root().join("deploy").join(dir);
    parse_docs(&collect(&root).unwrap()).unwrap()
}

#[test]
fn base_passes_the_least_privilege_rules() {
    let docs = deploy_docs("base");
    check_no_privileged(&docs).unwrap();
    check_agent(&docs).unwrap();
    check_rbac(&docs).unwrap();
    check_no_privileged(&deploy_docs("uninstall")).unwrap();
}

#[test]
fn the_rules_catch_what_they_are_for() {
    let docs = deploy_docs("base");
    let mutate = |f: &dyn Fn(&mut Value)| {
        let mut d = docs.clone();
        for x in &mut d {
            f(x);
        }
        d
    };
    let privileged = mutate(&|d| {
        if d["kind"] == "DaemonSet" {
            d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] =
                Value::Bool(true);
        }
    });
    assert!(check_no_privileged(&privileged).is_err());
    let sys_admin = mutate(&|d| {
        if d["kind"] == "DaemonSet" {
            d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] =
                serde_yaml::from_str("[BPF, NET_ADMIN, PERFMON, SYS_ADMIN, SYS_PTRACE, SYS_MODULE]")
                    .unwrap();
        }
    });
    assert!(check_agent(&sys_admin).is_err());
    let no_host_pid = mutate(&|d| {
        if d["kind"] == "DaemonSet" {
            d["spec"]["template"]["spec"]["hostPID"] = Value::Bool(false);
        }
    });
    assert!(check_agent(&no_host_pid).is_err());
    let cleanup_host_pid = {
        let mut d = deploy_docs("uninstall");
        for x in &mut d {
            if x["kind"] == "DaemonSet" {
                x["spec"]["template"]["spec"]["hostPID"] = Value::Bool(true);
            }
        }
        d
    };
    assert!(check_no_privileged(&cleanup_host_pid).is_err());
    let secrets = mutate(&|d| {
        if d["kind"] == "ClusterRole" {
            d["rules"][0]["resources"] =
                serde_yaml::from_str("[pods, namespaces, secrets]").unwrap();
        }
    });
    assert!(check_rbac(&secrets).is_err());
    let pre_stop = mutate(&|d| {
        if d["kind"] == "DaemonSet" {
            d["spec"]["template"]["spec"]["containers"][0]["lifecycle"] =
                serde_yaml::from_str("{preStop: {exec: {command: [redirect-agent, cleanup]}}}")
                    .unwrap();
        }
    });
    assert!(check_agent(&pre_stop).is_err());
}
