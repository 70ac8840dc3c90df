//! kubectl, kind and docker for `e2e-kind`: prerequisites, command helpers, the cluster guard.
use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::util;

/// Checks every prerequisite and names all that are missing.
pub fn prerequisites() -> Result<()> {
    let mut missing = Vec::new();
    match which::which("docker") {
        Err(_) => missing.push("docker: the Docker CLI is not on PATH".to_string()),
        Ok(_) => {
            let out = Command::new("docker")
                .args(["info", "--format", "{{.ServerVersion}}"])
                .output()?;
            if !out.status.success() {
                let why = String::from_utf8_lossy(&out.stderr);
                let why = why
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no answer");
                missing.push(format!(
                    "a Docker engine: `docker info` failed: {}",
                    why.trim()
                ));
            }
        }
    }
    if which::which("kind").is_err() {
        missing.push(
            "kind: not on PATH (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
                .into(),
        );
    }
    if which::which("kubectl").is_err() {
        missing.push("kubectl: not on PATH".into());
    }
    if !missing.is_empty() {
        bail!(
            "cargo xtask e2e-kind needs Docker and kind; missing:\n  - {}\n\
             (cargo xtask e2e-local runs the same scenarios without a cluster)",
            missing.join("\n  - ")
        );
    }
    Ok(())
}

/// Runs a command, returning stdout; a failure carries stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct Kube {
    pub context: String,
}

impl Kube {
    pub fn cmd(&self) -> Command {
        let mut c = Command::new("kubectl");
        c.args(["--context", &self.context]);
        c
    }

    pub fn run(&self, args: &[&str]) -> Result<String> {
        output(self.cmd().args(args))
    }

    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let text = self.run(&[args, &["-o", "json"]].concat())?;
        Ok(serde_json::from_str(&text)?)
    }

    pub fn apply(&self, obj: &Value) -> Result<()> {
        let mut child = self
            .cmd()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(obj.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl apply of {} {}: {}",
                obj["kind"],
                obj["metadata"]["name"],
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    pub fn wait_ready(&self, ns: &str, what: &str) -> Result<()> {
        self.run(&[
            "wait",
            "-n",
            ns,
            "--for=condition=Ready",
            what,
            "--timeout=180s",
        ])
        .map(drop)
    }
}

/// Deletes the cluster when dropped, unless asked to keep it.
pub struct ClusterGuard {
    pub name: String,
    pub keep: bool,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "keeping kind cluster {} (kind delete cluster --name {0})",
                self.name
            );
            return;
        }
        util::step(&format!("deleting kind cluster {}", self.name));
        let _ = Command::new("kind")
            .args(["delete", "cluster", "--name", &self.name])
            .status();
    }
}

/// bpffs must be mounted on the node (systemd does it on real nodes); kind node containers may
/// lack it.
pub fn ensure_bpffs(node: &str) -> Result<()> {
    let fs = output(Command::new("docker").args([
        "exec",
        node,
        "stat",
        "-f",
        "-c",
        "%T",
        "/sys/fs/bpf",
    ]))
    .unwrap_or_default();
    if fs.trim() != "bpf_fs" {
        util::step(&format!("mounting bpffs at /sys/fs/bpf on node {node}"));
        util::run(Command::new("docker").args([
            "exec",
            node,
            "mount",
            "-t",
            "bpf",
            "bpf",
            "/sys/fs/bpf",
        ]))?;
    }
    Ok(())
}
