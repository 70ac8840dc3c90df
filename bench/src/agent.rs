//! The real `redirect-agent` (release build) on a fixture, started by the bench itself rather
//! than with `redirect_tests::Agent`, because the bench needs what that fixture hides: the
//! agent's pid (for RSS), its own admin address (so it never collides with an agent a test
//! suite runs at the same time), and the exact time each generation was applied (for
//! change-to-applied latency), read from the JSON log's timestamps.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use redirect_tests::Fixture;
use serde_json::Value;

pub struct BenchAgent {
    bin: PathBuf,
    child: Option<Child>,
    workdir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    bpffs: PathBuf,
}

/// One `applied` log line.
#[derive(Clone, Debug)]
pub struct Applied {
    pub generation: u64,
    /// The agent's own reconcile time for this generation (diff + map writes).
    pub elapsed_us: u64,
    /// When the line was logged, as microseconds since the Unix epoch.
    pub at_us: u64,
    /// False for the agent's debug line "applied, no change".
    pub changed: bool,
}

impl BenchAgent {
    pub fn start(fx: &Fixture, bin: &Path, config: &str, timeout: Duration) -> Result<BenchAgent> {
        let workdir = std::env::temp_dir().join(format!("{}-agent", fx.name()));
        fs::create_dir_all(&workdir).with_context(|| format!("mkdir {}", workdir.display()))?;
        let mut agent = BenchAgent {
            bin: bin.to_path_buf(),
            child: None,
            config: workdir.join("config.yaml"),
            log: workdir.join("agent.log"),
            bpffs: fx.pin_dir().to_path_buf(),
            workdir,
        };
        fs::write(&agent.config, config)?;
        let log = fs::File::create(&agent.log)?;
        let child = Command::new(&agent.bin)
            .args(["run", "--source", "file", "--log-format", "json"])
            .args(["--admin-addr", "127.0.0.1:0", "--config"])
            .arg(&agent.config)
            .arg("--bpffs-dir")
            .arg(&agent.bpffs)
            .arg("--cgroup-root")
            .arg(fx.cgroup_root())
            // The owner's debug level adds "applied, no change", so that an edit that changes
            // nothing is reported instead of waited for.
            .env(
                "REDIRECT_LOG",
                "info,redirect_agent::reconcile::owner=debug",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", agent.bin.display()))?;
        agent.child = Some(child);
        agent.wait_applied(1, timeout)?;
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every `applied` line so far.
    pub fn applied(&self) -> Vec<Applied> {
        self.log_text().lines().filter_map(parse_applied).collect()
    }

    pub fn generation(&self) -> u64 {
        self.applied()
            .iter()
            .map(|a| a.generation)
            .max()
            .unwrap_or(0)
    }

    /// Waits for generation `n` (polling the log every millisecond, so the wait adds no
    /// measurement error: the time comes from the log line itself).
    pub fn wait_applied(&mut self, n: u64, timeout: Duration) -> Result<Applied> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = self.applied().into_iter().find(|a| a.generation >= n) {
                let errors = self
                    .log_text()
                    .lines()
                    .filter(|l| l.contains("\"ERROR\""))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n");
                if !errors.is_empty() {
                    bail!("redirect-agent logged errors while applying generation {n}:\n{errors}");
                }
                return Ok(a);
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("redirect-agent exited ({status}):\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "redirect-agent did not apply generation {n} within {timeout:?}:\n{}",
                    tail(&self.log_text(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Replaces the config as an editor or a ConfigMap update would (write + rename) and waits
    /// for it to be applied. Returns the applied line and the change-to-applied latency.
    pub fn reconfigure(&mut self, config: &str, timeout: Duration) -> Result<(Applied, Duration)> {
        self.reconfigure_as(config, timeout, true)
    }

    /// [`Self::reconfigure`]; `outbound_change: false` for an edit that changes only inbound
    /// state, which the agent applies in the same pass but reports as "applied, no change" (its
    /// counts are the outbound records').
    pub fn reconfigure_as(
        &mut self,
        config: &str,
        timeout: Duration,
        outbound_change: bool,
    ) -> Result<(Applied, Duration)> {
        let next = self.generation() + 1;
        let tmp = self.workdir.join("config.yaml.tmp");
        fs::write(&tmp, config)?;
        let written = now_us();
        fs::rename(&tmp, &self.config)?;
        let a = self.wait_applied(next, timeout)?;
        if outbound_change && !a.changed {
            bail!(
                "generation {} of the bench's config edit changed nothing",
                a.generation
            );
        }
        let latency = Duration::from_micros(a.at_us.saturating_sub(written));
        Ok((a, latency))
    }

    /// (VmRSS, VmHWM) in KiB, from /proc/<pid>/status.
    pub fn rss_kib(&self) -> Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.pid());
        let status = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .with_context(|| format!("no {name} in {path}"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Detach and unpin now rather than leaving it to the fixture's pin-dir removal.
        let _ = Command::new(&self.bin)
            .args(["cleanup", "--bpffs-dir"])
            .arg(&self.bpffs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    // tracing-subscriber's JSON puts event fields at the top level when flattened, else under
    // "fields".
    if v[name].is_null() {
        &v["fields"][name]
    } else {
        &v[name]
    }
}

fn parse_applied(line: &str) -> Option<Applied> {
    let v: Value = serde_json::from_str(line).ok()?;
    let changed = match field(&v, "message").as_str()? {
        "applied" => true,
        "applied, no change" => false,
        _ => return None,
    };
    Some(Applied {
        generation: field(&v, "generation").as_u64()?,
        elapsed_us: field(&v, "elapsed_us").as_u64().unwrap_or(0),
        at_us: parse_rfc3339_us(v["timestamp"].as_str()?)?,
        changed,
    })
}

/// "2025-11-23T03:55:00.123456Z" (UTC, any number of fraction digits) → µs since the epoch.
fn parse_rfc3339_us(ts: &str) -> Option<u64> {
    let ts = ts.strip_suffix('Z').or_else(|| ts.strip_suffix("+00:00"))?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let digits: String = frac.chars().take(6).collect();
    let micros = digits.parse::<i64>().ok()? * 10_i64.pow(6 - digits.len() as u32);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1_000_000 + micros).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_agents_applied_line() {
        assert_eq!(parse_rfc3339_us("1970-01-01T00:00:01.5Z"), Some(1_500_000));
        assert_eq!(
            parse_rfc3339_us("2025-11-23T03:55:00.123456Z"),
            Some(1_763_870_100_123_456)
        );
        let line = r#"{"timestamp":"2025-11-23T03:55:00.123456Z","level":"INFO","message":"applied","generation":3,"elapsed_us":42}"#;
        let a = parse_applied(line).unwrap();
        assert_eq!((a.generation, a.elapsed_us, a.changed), (3, 42, true));
        let same = r#"{"timestamp":"2025-11-23T03:55:00Z","message":"applied, no change","generation":4,"unchanged":1}"#;
        assert!(!parse_applied(same).unwrap().changed);
        let nested = r#"{"timestamp":"2025-11-23T03:55:00Z","fields":{"message":"applied","generation":1,"elapsed_us":7}}"#;
        assert_eq!(parse_applied(nested).unwrap().generation, 1);
    }
}
