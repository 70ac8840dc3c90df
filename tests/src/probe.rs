//! Where did a connect's bytes go? Runs `redirect-testclient` in a cgroup of the fixture and
//! classifies the reply: the tag-mode test proxy answers `proxy orig=… peer=…`, an identity
//! server answers its name.
use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{Fixture, helper_bin};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reached {
    /// The proxy got it; `orig` is what it read with SO_ORIGINAL_DST ("unknown" if nothing).
    Proxy { orig: String },
    /// An identity server got it directly.
    Server(String),
    /// The connect or the exchange failed.
    Failed(String),
}

impl Reached {
    pub fn is_proxy(&self) -> bool {
        matches!(self, Reached::Proxy { .. })
    }
}

/// Connects to `addr` from `cgroup` (extra args go to the client, e.g. `["--uid", "1337"]`).
pub fn probe(fx: &Fixture, cgroup: &Path, addr: &str, extra: &[&str]) -> Result<Reached> {
    Ok(probe_json(fx, cgroup, addr, extra)?.0)
}

/// [`probe`] plus the client's full JSON report (peer from getpeername, local address).
pub fn probe_json(
    fx: &Fixture,
    cgroup: &Path,
    addr: &str,
    extra: &[&str],
) -> Result<(Reached, Value)> {
    let out = fx.run_in(
        cgroup,
        Command::new(helper_bin("redirect-testclient")?)
            .args(["connect", addr, "--json", "--timeout-ms", "3000"])
            .args(extra),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("testclient printed no JSON: {stdout:?}"))?;
    Ok((classify(&v), v))
}

fn classify(v: &Value) -> Reached {
    if v["ok"] != true {
        return Reached::Failed(v["error"].as_str().unwrap_or("?").to_string());
    }
    let reply = v["reply"].as_str().unwrap_or("").trim();
    match reply.strip_prefix("proxy ") {
        Some(rest) => {
            let orig = rest
                .split_whitespace()
                .find_map(|f| f.strip_prefix("orig="))
                .unwrap_or("?");
            Reached::Proxy {
                orig: orig.to_string(),
            }
        }
        None => Reached::Server(reply.to_string()),
    }
}
