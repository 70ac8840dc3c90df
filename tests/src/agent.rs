//! Runs the real `redirect-agent` binary against a fixture: its pin dir, its cgroup subtree as
//! `--cgroup-root`, and a config file the test can rewrite while the agent runs.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{Fixture, helper_bin};

pub struct Agent {
    child: Option<Child>,
    /// The agent binary's name among the helper binaries (another build in the upgrade test).
    bin: &'static str,
    extra_args: Vec<String>,
    config: PathBuf,
    log: PathBuf,
    bpffs: PathBuf,
    cgroup_root: PathBuf,
    workdir: PathBuf,
}

impl Agent {
    /// Writes `config` and starts `redirect-agent run` on it (JSON logs), then waits for the
    /// first applied generation.
    pub fn start(fx: &Fixture, config: &str) -> Result<Agent> {
        Self::start_with(fx, config, &[])
    }

    /// [`Agent::start`] with extra `run` flags (kept for restarts).
    pub fn start_with(fx: &Fixture, config: &str, extra_args: &[&str]) -> Result<Agent> {
        Self::start_bin(fx, config, "redirect-agent", extra_args)
    }

    /// [`Agent::start_with`] running another build of the agent (`bin`, found like the helpers).
    pub fn start_bin(
        fx: &Fixture,
        config: &str,
        bin: &'static str,
        extra_args: &[&str],
    ) -> Result<Agent> {
        let workdir = std::env::temp_dir().join(fx.name());
        fs::create_dir_all(&workdir)?;
        let mut agent = Agent {
            child: None,
            bin,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            config: workdir.join("config.yaml"),
            log: workdir.join("agent.log"),
            bpffs: fx.pin_dir().to_path_buf(),
            cgroup_root: fx.cgroup_root().to_path_buf(),
            workdir,
        };
        fs::write(&agent.config, config)?;
        agent.spawn()?;
        agent.wait_generation(1)?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::File::create(&self.log)?;
        let child = Command::new(helper_bin(self.bin)?)
            .args(["run", "--log-format", "json", "--config"])
            .arg(&self.config)
            .arg("--bpffs-dir")
            .arg(&self.bpffs)
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .args(&self.extra_args)
            .env("RUST_BACKTRACE", "0")
            // Unchanged passes are logged at debug; the harness counts every pass.
            .env("REDIRECT_LOG", "info,redirect_agent::reconcile=debug")
            // Tests run agents in parallel: no fixed admin port.
            .env("REDIRECT_ADMIN_ADDR", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting redirect-agent")?;
        self.child = Some(child);
        Ok(())
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Replaces the config the way an editor or a ConfigMap update would (write + rename).
    pub fn write_config(&self, config: &str) -> Result<()> {
        let tmp = self.workdir.join("config.yaml.tmp");
        fs::write(&tmp, config)?;
        fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// The agent's log so far (JSON lines).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Highest generation logged as applied (changed or not) so far.
    pub fn generation(&self) -> u64 {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("applied"))
            })
            .filter_map(|v| v["generation"].as_u64())
            .max()
            .unwrap_or(0)
    }

    /// Waits until generation `n` has been applied (the agent exits early → error with its log).
    pub fn wait_generation(&mut self, n: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.generation() >= n {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("redirect-agent exited ({status}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "redirect-agent did not apply generation {n}:\n{}",
            self.log()
        )
    }

    /// Rewrites the config and waits for the agent to apply it.
    pub fn reconfigure(&mut self, config: &str) -> Result<()> {
        let next = self.generation() + 1;
        self.write_config(config)?;
        self.wait_generation(next)
    }

    /// Waits until the log has a line containing `needle` (e.g. an error message).
    pub fn wait_log(&self, needle: &str) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("no log line containing {needle:?}:\n{}", self.log())
    }

    /// The agent's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the agent process has not exited.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends `signal` and waits up to `timeout` for the agent to exit; its exit status.
    pub fn signal_and_wait(
        &mut self,
        signal: nix::sys::signal::Signal,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("agent not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "redirect-agent did not exit within {timeout:?} of {signal}:\n{}",
            self.log()
        )
    }

    /// SIGKILL: no chance to clean anything up, as after an OOM kill or a node-agent crash.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the agent again on the same pin dir and config (after `kill9`).
    pub fn restart(&mut self) -> Result<()> {
        self.kill9()?;
        // spawn() truncates the log, so generations count from 1 again.
        self.spawn()?;
        self.wait_generation(1)
    }

    /// `redirect-agent inspect --output json` on the fixture's pin dir.
    pub fn inspect(&self) -> Result<Value> {
        inspect_with(self.bin, &self.bpffs)
    }
}

/// `redirect-agent inspect --output json` for any pin dir.
pub fn inspect(bpffs: &Path) -> Result<Value> {
    inspect_with("redirect-agent", bpffs)
}

/// [`inspect`] by another build of the agent (it reads only maps of its own layout).
pub fn inspect_with(bin: &str, bpffs: &Path) -> Result<Value> {
    let out = Command::new(helper_bin(bin)?)
        .args(["inspect", "--output", "json", "--bpffs-dir"])
        .arg(bpffs)
        .output()?;
    if !out.status.success() {
        bail!(
            "inspect failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.kill9();
        let _ = fs::remove_dir_all(&self.workdir);
    }
}
