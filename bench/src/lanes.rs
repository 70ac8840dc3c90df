//! One lane per mode: its own fixture (netns + cgroup subtree) holding the same destination
//! server and, except for `none`, the same proxy. Lanes are built once and measured in turn,
//! so that switching modes between samples costs nothing and no mode's kernel state (conntrack,
//! attached programs) leaks into another's.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use redirect_tests::{Fixture, Spawned};
use serde_json::Value;

mod inbound;

use super::{
    Bins, PROXY_UID,
    agent::BenchAgent,
    iptables,
    results::{ConnSample, Kind, Mode},
};

pub const SERVER: &str = "198.18.0.10:80";
pub const PROXY: &str = "127.0.0.1:15001";

/// A lane's persistent load client (`redirect-bench worker client --serve`).
struct ClientProc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drop for ClientProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Lane {
    pub mode: Mode,
    /// An inbound lane: the client runs on a "client node" (`node`) and connects to the pod's
    /// address; the interception is in the pod's PREROUTING / sk_lookup.
    inbound: bool,
    client: Mutex<Option<ClientProc>>,
    // Field order is drop order: processes and the agent go before their fixture.
    agent: Option<BenchAgent>,
    /// The config the agent has applied (an identical rewrite would apply nothing).
    applied_config: String,
    proxy: Option<Spawned>,
    /// What the proxy does with a connection: forward it (Proxied) or close it (Probe).
    proxy_kind: Kind,
    proxy_bin: PathBuf,
    /// Where the proxy listens, and where it sends what has no original destination.
    proxy_listen: SocketAddr,
    fallback: SocketAddr,
    _server: Spawned,
    pod: PathBuf,
    proxy_cg: PathBuf,
    app: PathBuf,
    tools: PathBuf,
    dst: SocketAddr,
    worker: PathBuf,
    pub fx: Fixture,
    /// Inbound: the client node's netns and cgroup tree (the client's cgroup is `app`).
    node: Option<Fixture>,
}

/// The tests' proxy, as uid 1337 in the pod's proxy cgroup: forwarding (`--stats` instead of a
/// log line per connection), or for probes closing each connection once it has read the
/// original destination.
struct ProxyAt<'a> {
    fx: &'a Fixture,
    cg: &'a Path,
    bin: &'a Path,
    listen: SocketAddr,
    fallback: SocketAddr,
}

fn start_proxy(at: ProxyAt, mode: Mode, kind: Kind) -> Result<Spawned> {
    let ProxyAt {
        fx,
        cg,
        bin,
        listen,
        fallback,
    } = at;
    let mut cmd = Command::new(bin);
    let how = if kind.probe() { "close" } else { "forward" };
    cmd.args(["--mode", how, "--stats", "--listen"])
        .arg(listen.to_string())
        .arg("--uid")
        .arg(PROXY_UID.to_string());
    if mode == Mode::DirectToProxy {
        cmd.arg("--fallback").arg(fallback.to_string());
    }
    let p = fx.spawn_logged(cg, &mut cmd)?;
    wait_listening(&p, "the bench proxy")?;
    Ok(p)
}

fn wait_listening(p: &Spawned, what: &str) -> Result<()> {
    p.wait_for_prefix("listening ", Duration::from_secs(10))
        .with_context(|| format!("{what} did not start"))?;
    Ok(())
}

/// The bench server (`what` names it in errors) in `cg`, once it listens on `listen`.
fn start_server(
    fx: &Fixture,
    cg: &Path,
    worker: &Path,
    listen: &str,
    what: &str,
) -> Result<Spawned> {
    let server = fx.spawn_logged(
        cg,
        Command::new(worker).args(["worker", "server", "--listen", listen]),
    )?;
    wait_listening(&server, what)?;
    Ok(server)
}

/// Which of the two a lane starts first.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    ProxyFirst,
    AgentFirst,
}

impl Lane {
    pub fn new(mode: Mode, bins: &Bins) -> Result<Lane> {
        let fx = Fixture::new(&format!("bench-{}", mode.name()))?;
        fx.add_addr("198.18.0.10/32")?;
        let server_cg = fx.cgroup("server")?;
        let pod = fx.cgroup("pod")?;
        let app = fx.cgroup("pod/app")?;
        let proxy_cg = fx.cgroup("pod/proxy")?;
        let tools = fx.cgroup("tools")?;
        let worker = bins.worker.clone();
        let server = start_server(&fx, &server_cg, &worker, SERVER, "the bench server")?;
        let dst = if mode == Mode::DirectToProxy {
            PROXY
        } else {
            SERVER
        };
        let mut lane = Lane {
            mode,
            inbound: false,
            client: Mutex::new(None),
            agent: None,
            applied_config: String::new(),
            proxy: None,
            proxy_kind: Kind::Proxied,
            proxy_bin: bins.proxy.clone(),
            proxy_listen: PROXY.parse()?,
            fallback: SERVER.parse()?,
            _server: server,
            pod,
            proxy_cg,
            app,
            tools,
            dst: dst.parse()?,
            worker,
            fx,
            node: None,
        };
        lane.start_interception(&bins.agent, Start::ProxyFirst)?;
        Ok(lane)
    }

    /// The proxy (every mode but none) and the agent (ebpf, with this lane's own config), in
    /// the order `start` says, each once it is ready.
    fn start_interception(&mut self, agent: &Path, start: Start) -> Result<()> {
        if start == Start::ProxyFirst {
            self.start_lane_proxy()?;
        }
        if self.mode == Mode::Ebpf {
            self.applied_config = self.agent_config(&[]);
            self.agent = Some(BenchAgent::start(
                &self.fx,
                agent,
                &self.applied_config,
                Duration::from_secs(60),
            )?);
        }
        if start == Start::AgentFirst {
            self.start_lane_proxy()?;
        }
        Ok(())
    }

    /// The pod's cgroup (the workload the agent registers).
    pub fn pod(&self) -> &Path {
        &self.pod
    }

    /// Starts the proxy for the lane's current kind, unless the mode has none.
    fn start_lane_proxy(&mut self) -> Result<()> {
        if self.mode == Mode::None {
            return Ok(());
        }
        let at = ProxyAt {
            fx: &self.fx,
            cg: &self.proxy_cg,
            bin: &self.proxy_bin,
            listen: self.proxy_listen,
            fallback: self.fallback,
        };
        self.proxy = Some(start_proxy(at, self.mode, self.proxy_kind)?);
        Ok(())
    }

    /// The agent's standalone config: the same policy as the iptables lane (proxy uid 1337,
    /// everything included, `exclusions` excluded), for the one pod whose cgroup holds the client.
    pub fn agent_config(&self, exclusions: &[String]) -> String {
        if self.inbound {
            inbound::agent_config(self, exclusions)
        } else {
            agent_config(&self.pod, &self.proxy_cg, exclusions)
        }
    }

    /// Loads `exclusions` into this lane's interception (iptables: one iptables-restore;
    /// ebpf: a config edit the running agent applies). Returns what it cost:
    /// (wall time, the agent's own reconcile time).
    pub fn configure(
        &mut self,
        exclusions: &[String],
        limit: Duration,
    ) -> Result<Option<(Duration, Option<u64>)>> {
        match self.mode {
            Mode::Iptables => {
                let rules = if self.inbound {
                    iptables::inbound_ruleset(exclusions)
                } else {
                    iptables::ruleset(exclusions)
                };
                let took = iptables::restore(&self.fx, &self.tools, &rules, limit)?;
                Ok(Some((took, None)))
            }
            Mode::Ebpf => {
                let config = self.agent_config(exclusions);
                if config == self.applied_config {
                    return Ok(None);
                }
                let agent = self.agent.as_mut().context("the ebpf lane has an agent")?;
                let (applied, latency) = agent.reconfigure_as(&config, limit, !self.inbound)?;
                self.applied_config = config;
                Ok(Some((latency, Some(applied.elapsed_us))))
            }
            _ => Ok(None),
        }
    }

    /// Runs one job on the lane's persistent client (started on first use in the app cgroup).
    fn client(&self, args: &[&str]) -> Result<Value> {
        let mut guard = self.client.lock().expect("client lock");
        if guard.is_none() {
            // Inbound, this is the pod's side only (proxy and app), not the client node's.
            let cpu_stat = self.fx.cgroup_root().join("cpu.stat");
            let mut child = self.node.as_ref().unwrap_or(&self.fx).spawn_in(
                &self.app,
                Command::new(&self.worker)
                    .args(["worker", "client", "--serve", "--dst"])
                    .arg(self.dst.to_string())
                    .arg("--cpu-stat")
                    .arg(cpu_stat)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped()),
            )?;
            let stdin = child.stdin.take().context("client stdin")?;
            let stdout = BufReader::new(child.stdout.take().context("client stdout")?);
            *guard = Some(ClientProc {
                child,
                stdin,
                stdout,
            });
        }
        let c = guard.as_mut().expect("started above");
        let mut line = String::new();
        let io = writeln!(c.stdin, "{}", args.join(" "))
            .and_then(|()| c.stdin.flush())
            .and_then(|()| c.stdout.read_line(&mut line));
        if io.is_err() || line.is_empty() {
            let status = c.child.try_wait().ok().flatten();
            *guard = None;
            bail!(
                "{} client died ({status:?}) running {args:?}: {io:?}",
                self.mode.name()
            );
        }
        serde_json::from_str(&line)
            .with_context(|| format!("{} client printed {line:?}", self.mode.name()))
    }

    /// One exchange, checking that it took this mode's path: straight to the server for
    /// `none`, through the proxy for the others, and for iptables and ebpf with the proxy
    /// having read the original destination (SO_ORIGINAL_DST), not guessed it.
    pub fn verify(&self) -> Result<()> {
        let before = self.proxy_stat("orig");
        let v = self.client(&["--check"])?;
        let mode = self.mode.name();
        if v["ok"] != true {
            bail!(
                "{mode}: the check connection to {} failed: {}{}",
                self.dst,
                v["error"],
                self.proxy_hint()
            );
        }
        let direct = v["server_saw"] == v["local"];
        match self.mode {
            Mode::None if !direct => {
                bail!("{mode}: the server saw another peer than the client: {v}")
            }
            Mode::None => return Ok(()),
            _ if direct => bail!("{mode}: the connection bypassed the proxy: {v}"),
            _ => {}
        }
        if matches!(self.mode, Mode::Iptables | Mode::Ebpf) {
            // The proxy reports its counters every 250 ms.
            for _ in 0..40 {
                if self.proxy_stat("orig") > before {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            bail!(
                "{mode}: the proxy forwarded the check connection without reading its original destination{}",
                self.proxy_hint()
            );
        }
        Ok(())
    }

    fn proxy_hint(&self) -> String {
        self.proxy.as_ref().map_or_else(String::new, |p| {
            format!("\nproxy stderr: {}", p.stderr().trim())
        })
    }

    /// A counter from the proxy's latest `stats …` line.
    fn proxy_stat(&self, name: &str) -> u64 {
        let Some(p) = &self.proxy else { return 0 };
        p.lines()
            .iter()
            .rev()
            .find(|l| l.starts_with("stats "))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Switches the proxy to what `kind` needs (a restart: the agent and the iptables rules know
    /// the proxy by cgroup, uid and port, not by process).
    pub fn set_kind(&mut self, kind: Kind) -> Result<()> {
        if self.proxy_kind == kind {
            return Ok(());
        }
        self.proxy_kind = kind;
        if self.proxy.take().is_some() {
            self.start_lane_proxy()?;
        }
        Ok(())
    }

    /// For probes the client learns nothing about the path, so the proxy's counters must show
    /// that it accepted connections, and read their original destination where the mode
    /// intercepts (`before`: the counters before the sample).
    pub fn check_probes(&self, before: (u64, u64)) -> Result<()> {
        if self.proxy.is_none() {
            return Ok(());
        }
        // Inbound, the proxy accepting at all proves the steering (it listens on 15006 only, the
        // client connects to the app's port), and the proxied check after each configure has
        // proved SO_ORIGINAL_DST: a probe's reset often beats the proxy's getsockopt, so on a
        // loaded machine a short sample can read none.
        let intercepts = matches!(self.mode, Mode::Iptables | Mode::Ebpf) && !self.inbound;
        // The proxy reports its counters every 250 ms.
        for _ in 0..40 {
            let (accepted, orig) = self.probe_counters();
            if accepted > before.0 && (!intercepts || orig > before.1) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{}: the proxy saw no probe{}{}",
            self.mode.name(),
            if intercepts {
                " with an original destination"
            } else {
                ""
            },
            self.proxy_hint()
        )
    }

    /// (accepted, original destination read) from the proxy's latest counters.
    pub fn probe_counters(&self) -> (u64, u64) {
        (self.proxy_stat("accepted"), self.proxy_stat("orig"))
    }

    /// Connections per second with `threads` client threads.
    pub fn sample(
        &self,
        n: usize,
        run: usize,
        threads: usize,
        warmup: Duration,
        duration: Duration,
    ) -> Result<ConnSample> {
        let mut args = vec![
            "--threads".to_string(),
            threads.to_string(),
            "--warmup-ms".to_string(),
            warmup.as_millis().to_string(),
            "--duration-ms".to_string(),
            duration.as_millis().to_string(),
        ];
        if self.proxy_kind.probe() {
            args.push("--probe".into());
        }
        let v = self.client(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let s = ConnSample {
            n,
            run,
            kind: self.proxy_kind,
            mode: self.mode,
            threads,
            conns_per_s: f("conns_per_s"),
            connect_p50_us: f("connect_p50_us"),
            connect_p99_us: f("connect_p99_us"),
            txn_p50_us: f("txn_p50_us"),
            txn_p99_us: f("txn_p99_us"),
            cpu_us_per_conn: f("cpu_us_per_conn"),
            errors: v["errors"].as_u64().unwrap_or(0),
        };
        if s.errors > 0 {
            eprintln!(
                "    warning: {} N={n} run {run}: {} failed connections (first: {}){}",
                self.mode.name(),
                s.errors,
                v["first_error"],
                self.proxy_hint()
            );
        }
        if v["conns"].as_u64().unwrap_or(0) == 0 && self.proxy_kind.probe() {
            // Reported as a gap (and the warning above), not fatal: the probes' failure mode
            // on a loaded machine is dropped SYNs, which the proxied samples do not share.
            eprintln!(
                "    warning: {} N={n} run {run}: no probe completed{}",
                self.mode.name(),
                self.proxy_hint()
            );
            return Ok(ConnSample {
                conns_per_s: f64::NAN,
                ..s
            });
        }
        if v["conns"].as_u64().unwrap_or(0) == 0 && s.errors == 0 {
            // Nothing failed, one exchange just outlasted the sample (a dropped SYN costs a 1 s
            // retransmit; short samples on a loaded machine meet it): a gap, not a broken path,
            // which the checked exchange after each configure would have caught.
            eprintln!(
                "    warning: {} N={n} run {run}: no exchange completed within the sample (a stall)",
                self.mode.name()
            );
            return Ok(ConnSample {
                conns_per_s: f64::NAN,
                ..s
            });
        }
        if v["conns"].as_u64().unwrap_or(0) == 0 {
            bail!(
                "{} N={n}: no connection completed: {}",
                self.mode.name(),
                v["first_error"]
            );
        }
        Ok(s)
    }

    /// Bytes per second of one upload of `bytes`.
    pub fn bulk(&self, bytes: u64) -> Result<f64> {
        let v = self.client(&["--bulk-bytes", &bytes.to_string()])?;
        if v["ok"] != true {
            bail!("{} bulk transfer failed: {}", self.mode.name(), v["error"]);
        }
        v["bytes_per_s"]
            .as_f64()
            .context("bulk result without bytes_per_s")
    }
}

pub fn agent_config(pod: &Path, proxy_cg: &Path, exclusions: &[String]) -> String {
    let list = exclusions
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "mesh:\n  outboundIPRangeExclusionList: [{list}]\n\
         proxy: {{mode: sidecar, outboundPort: 15001, uid: {PROXY_UID}}}\n\
         workloads:\n  - name: app\n    namespace: bench\n    cgroup: {}\n    proxyCgroup: {}\n",
        pod.display(),
        proxy_cg.display()
    )
}
