//! The pieces that the kernel tests' worlds share: the `demo/app` + `demo/other` workload
//! cgroups, a world of those with destinations and the tag-mode test proxy, identity servers that answer with their own address, a
//! veth pair between two fixtures, and the agent's one-shot commands (`cleanup`, `explain`).
use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Result, bail};

use crate::{Fixture, IdentityServer, Spawned, helper_bin, serve_identity};

/// The cgroups of the two workloads most tests register: `pod1` (workload `demo/app`, the
/// application in `pod1/app`, its proxy in `pod1/proxy`) and `pod2` (workload `demo/other`).
pub struct MeshPods {
    pub pod1: PathBuf,
    pub app: PathBuf,
    pub proxy: PathBuf,
    pub pod2: PathBuf,
}

impl MeshPods {
    pub fn new(fx: &Fixture) -> Result<MeshPods> {
        Ok(MeshPods {
            pod1: fx.cgroup("pod1")?,
            app: fx.cgroup("pod1/app")?,
            proxy: fx.cgroup("pod1/proxy")?,
            pod2: fx.cgroup("pod2")?,
        })
    }
}

/// A fixture with the two workloads' cgroups (as [`MeshPods`]), destinations that answer with
/// their own address, and the tag-mode test proxy in pod1/proxy.
pub struct MeshWorld {
    pub fx: Fixture,
    pub pod1: PathBuf,
    pub app: PathBuf,
    pub proxy: PathBuf,
    pub pod2: PathBuf,
    _servers: Vec<IdentityServer>,
    _proxy: Spawned,
}

impl MeshWorld {
    /// `addrs` go on the netns's lo (CIDRs), `servers` are served (see [`serve_own_addresses`]),
    /// the proxy listens on `listen`.
    pub fn new<S: AsRef<str>>(
        name: &str,
        addrs: &[&str],
        servers: impl IntoIterator<Item = S>,
        listen: &[&str],
    ) -> Result<MeshWorld> {
        let fx = Fixture::new(name)?;
        for a in addrs {
            fx.add_addr(a)?;
        }
        let servers = serve_own_addresses(&fx, servers)?;
        let MeshPods {
            pod1,
            app,
            proxy,
            pod2,
        } = MeshPods::new(&fx)?;
        let proxy_proc = start_testproxy(&fx, &proxy, listen)?;
        Ok(MeshWorld {
            fx,
            pod1,
            app,
            proxy,
            pod2,
            _servers: servers,
            _proxy: proxy_proc,
        })
    }
}

/// `redirect-testproxy` in tag mode on each of `listen` (e.g. `127.0.0.1:15001`), in `cgroup`,
/// returned once it prints "listening ".
pub fn start_testproxy(fx: &Fixture, cgroup: &Path, listen: &[&str]) -> Result<Spawned> {
    let mut cmd = Command::new(helper_bin("redirect-testproxy")?);
    for l in listen {
        cmd.args(["--listen", l]);
    }
    let proxy = fx.spawn_logged(cgroup, &mut cmd)?;
    proxy.wait_for_prefix("listening ", Duration::from_secs(10))?;
    Ok(proxy)
}

/// One identity server on each address, answering with that address (`198.18.0.10:80`,
/// `[fd00:198:18::10]:80`), so that a reply names the destination that was reached.
pub fn serve_own_addresses<S: AsRef<str>>(
    fx: &Fixture,
    addrs: impl IntoIterator<Item = S>,
) -> Result<Vec<IdentityServer>> {
    addrs
        .into_iter()
        .map(|a| {
            let a = a.as_ref();
            serve_identity(fx, a.parse()?, a)
        })
        .collect()
}

/// A veth pair: `dev` in `fx`'s netns, `peer_dev` in `peer`'s, both up.
pub fn veth_pair(fx: &Fixture, dev: &str, peer: &Fixture, peer_dev: &str) -> Result<()> {
    fx.ip(&[
        "link",
        "add",
        dev,
        "type",
        "veth",
        "peer",
        "name",
        peer_dev,
        "netns",
        peer.netns_name(),
    ])?;
    fx.ip(&["link", "set", dev, "up"])?;
    peer.ip(&["link", "set", peer_dev, "up"])
}

/// `redirect-agent ARGS...` that must succeed: its output, or an error with its stderr.
pub fn agent_cli<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Result<Output> {
    let mut cmd = Command::new(helper_bin("redirect-agent")?);
    cmd.args(args);
    let out = cmd.output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// `redirect-agent cleanup --bpffs-dir BPFFS`, which must succeed.
pub fn agent_cleanup(bpffs: &Path) -> Result<()> {
    agent_cli([
        OsStr::new("cleanup"),
        OsStr::new("--bpffs-dir"),
        bpffs.as_os_str(),
    ])
    .map(drop)
}

/// Runs `redirect-agent cleanup --bpffs-dir BPFFS` beside the live agent `pid` and asserts that it
/// was refused, naming that agent (it holds the pin directory's lock) and removing nothing.
pub fn assert_cleanup_refused(bpffs: &Path, pid: u32) -> Result<()> {
    let out = Command::new(helper_bin("redirect-agent")?)
        .args(["cleanup", "--bpffs-dir"])
        .arg(bpffs)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        bail!("cleanup ran beside a live agent (pid {pid})");
    }
    if !(err.contains("cleanup refused") && err.contains(&format!("pid {pid}"))) {
        bail!("cleanup failed, but not refused naming pid {pid}: {err}");
    }
    Ok(())
}

/// `sh -c SCRIPT` in `cgroup` of `fx`, with `$CLIENT` set to redirect-testclient and stdout piped:
/// a workload that runs the client in a loop or on request, without being restarted.
pub fn spawn_client_shell(
    fx: &Fixture,
    cgroup: &Path,
    script: &str,
    stdin: std::process::Stdio,
) -> Result<std::process::Child> {
    fx.spawn_in(
        cgroup,
        Command::new("sh")
            .args(["-c", script])
            .env("CLIENT", helper_bin("redirect-testclient")?)
            .stdin(stdin)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null()),
    )
}

/// `setpriv` arguments (up to and including `--`) that run the next program with exactly `caps`
/// (setpriv names such as `bpf`, `net_admin`): as uid 0, exec gives a process its bounding set as
/// permitted and effective set, and the inheritable and ambient sets are cleared so that nothing
/// comes back in.
pub fn setpriv_args<S: AsRef<str>>(caps: &[S]) -> Vec<String> {
    let bounding = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", c.as_ref())))
        .collect::<Vec<_>>()
        .join(",");
    [
        "--bounding-set",
        &bounding,
        "--inh-caps",
        "-all",
        "--ambient-caps",
        "-all",
        "--",
    ]
    .map(String::from)
    .to_vec()
}
