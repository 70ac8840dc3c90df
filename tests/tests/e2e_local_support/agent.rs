//! The real `redirect-agent run --source kubernetes` for the e2e scenarios: pointed at the fake API
//! server through a kubeconfig (as `kubectl` would be), attached to the fixture's cgroup subtree,
//! and started with exactly the capabilities the DaemonSet grants (read from
//! deploy/base/daemonset.yaml), so the local run also exercises the deployed privilege set.
use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use redirect_tests::{Fixture, helper_bin};
use serde_json::Value;

/// The node name the stand-in pods are scheduled on.
pub const NODE: &str = "e2e-node";

/// The `capabilities.add` list of the agent container in deploy/base/daemonset.yaml, lower-cased
/// for setpriv (`BPF` → `bpf`).
pub fn deployed_capabilities() -> Result<Vec<String>> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/daemonset.yaml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let ds: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let add =
        ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
            .as_sequence()
            .with_context(|| {
                format!(
                    "{}: no capabilities.add on the first container",
                    path.display()
                )
            })?;
    add.iter()
        .map(|c| {
            c.as_str()
                .map(|s| s.trim_start_matches("CAP_").to_ascii_lowercase())
                .with_context(|| format!("{}: capability {c:?} is not a string", path.display()))
        })
        .collect()
}

/// Writes a kubeconfig for the stand-in API at `url` into `dir`.
pub fn write_kubeconfig(dir: &Path, url: &str) -> Result<PathBuf> {
    let path = dir.join("kubeconfig");
    fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster: {{server: \"{url}\"}}\n\
             users:\n- name: e2e\n  user: {{}}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: e2e, namespace: default}}\n\
             current-context: e2e\n"
        ),
    )?;
    Ok(path)
}

pub struct AgentProc {
    child: Option<Child>,
    log: PathBuf,
    pub admin: SocketAddr,
}

impl AgentProc {
    /// Starts the agent and waits until its /readyz says ready (first snapshot applied).
    pub fn start(fx: &Fixture, kubeconfig: &Path, caps: &[String], log: PathBuf) -> Result<Self> {
        let file = fs::File::create(&log)?;
        let child = Command::new("setpriv")
            .args(redirect_tests::setpriv_args(caps))
            .arg(helper_bin("redirect-agent")?)
            .args([
                "run",
                "--source",
                "kubernetes",
                "--node-name",
                NODE,
                "--log-format",
                "json",
            ])
            .args(["--admin-addr", "127.0.0.1:0", "--bpffs-dir"])
            .arg(fx.pin_dir())
            .arg("--cgroup-root")
            .arg(fx.cgroup_root())
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("starting redirect-agent under setpriv (util-linux)")?;
        let mut agent = AgentProc {
            child: Some(child),
            log,
            admin: "0.0.0.0:0".parse()?,
        };
        agent.admin = agent.wait_admin()?;
        agent.wait_ready()?;
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines as JSON.
    pub fn messages(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("redirect-agent exited ({status}):\n{}", self.log());
        }
        Ok(())
    }

    fn wait_admin(&mut self) -> Result<SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(addr) = self
                .messages()
                .iter()
                .find(|m| {
                    m["message"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("admin endpoint listening"))
                })
                .and_then(|m| m["addr"].as_str()?.parse().ok())
            {
                return Ok(addr);
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "redirect-agent never opened its admin endpoint:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http_get(self.admin, "/readyz").is_ok_and(|(code, _)| code == 200) {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                let why = http_get(self.admin, "/readyz")
                    .map(|r| r.1)
                    .unwrap_or_default();
                bail!(
                    "redirect-agent not ready after 60 s ({why}):\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, as the kubelet sends when the pod is deleted, and wait for the exit.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("the agent is not running");
        };
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("redirect-agent ignored SIGTERM for 30 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A minimal HTTP GET: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP response {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((code, body))
}
