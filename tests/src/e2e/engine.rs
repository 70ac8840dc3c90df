//! Runs a scenario against a [`Cluster`]: the same steps and the same checks for `e2e-kind` and
//! `e2e-local`; only the way objects change and connections are made differs.
//!
//! Where did a connection go? Every client connect reports its local address (JSON from
//! redirect-testclient). The stand-in proxy logs `orig=<dst> peer=<client>` for every connection
//! it accepts. A connect went through the proxy iff the proxy logged its local address as the
//! peer (and then `orig` must be the destination the client asked for); otherwise it went
//! direct. That holds in kind and locally alike, whatever NAT sits between pod and server.
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use super::scenario::{
    Action, AnnotationPatch, Expect, ExpectEvent, InboundExpect, Loop, Scenario, Vars, Via,
};

/// How long an asynchronous change may take to show (generous: this is not a latency test).
const SETTLE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(250);

/// What one client connect reported.
#[derive(Clone, Debug)]
pub struct Conn {
    pub ok: bool,
    pub local: Option<String>,
    pub reply: String,
    pub error: Option<String>,
}

impl Conn {
    /// From redirect-testclient's `--json` line.
    pub fn from_json(line: &str) -> Result<Conn> {
        let v: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("redirect-testclient printed no JSON: {line:?}"))?;
        Ok(Conn {
            ok: v["ok"] == true,
            local: v["local"].as_str().map(str::to_string),
            reply: v["reply"].as_str().unwrap_or_default().to_string(),
            error: v["error"].as_str().map(str::to_string),
        })
    }
}

/// An Event about the client pod, as either runner sees it.
#[derive(Clone, Debug)]
pub struct EventSeen {
    pub reason: String,
    pub message: String,
}

/// A client connecting in a loop (see [`Cluster::start_loop`]).
pub trait ClientLoop {
    /// Connections finished so far.
    fn count(&self) -> usize;
    /// Stops the loop and returns every connection's report.
    fn stop(self: Box<Self>) -> Result<Vec<Conn>>;
}

/// The [`ClientLoop`] of both runners: `proc` runs [`super::objects::loop_script`], whose JSON
/// lines are the connections; `stop` creates its stop file the runner's way, and the loop's last
/// line is awaited for up to `timeout`.
pub struct ScriptLoop {
    pub proc: crate::Spawned,
    pub stop: Box<dyn FnOnce() -> Result<()>>,
    pub timeout: Duration,
}

/// The loop's output lines that are connections.
fn loop_lines(proc: &crate::Spawned) -> Vec<String> {
    proc.lines()
        .into_iter()
        .filter(|l| l.starts_with('{'))
        .collect()
}

impl ClientLoop for ScriptLoop {
    fn count(&self) -> usize {
        loop_lines(&self.proc).len()
    }

    fn stop(self: Box<Self>) -> Result<Vec<Conn>> {
        let ScriptLoop {
            proc,
            stop,
            timeout,
        } = *self;
        stop()?;
        proc.wait_for_prefix(super::objects::LOOP_DONE, timeout)?;
        loop_lines(&proc)
            .iter()
            .map(|l| Conn::from_json(l))
            .collect()
    }
}

/// A cluster (or its local stand-in) with one scenario's namespace, MeshConfig and client pod in
/// place and the agent ready.
pub trait Cluster {
    fn vars(&self) -> &Vars;
    fn set_mesh_traffic(&mut self, traffic: &Value) -> Result<()>;
    fn annotate_pod(&mut self, patch: &AnnotationPatch) -> Result<()>;
    fn annotate_namespace(&mut self, patch: &AnnotationPatch) -> Result<()>;
    /// One connect from the client pod's app container.
    fn connect(&mut self, to: SocketAddr) -> Result<Conn>;
    /// The client pod's own address, where inbound connections go.
    fn pod_ip(&mut self) -> Result<IpAddr>;
    /// One connect into the client pod, to `to` (its address), from outside the pod. The
    /// proxy's inbound listener logs it as any other connection it accepts.
    fn connect_inbound(&mut self, to: SocketAddr) -> Result<Conn>;
    /// The proxy's log so far: (orig, peer) of every accepted connection.
    fn proxy_log(&mut self) -> Result<Vec<(String, String)>>;
    fn pod_events(&mut self) -> Result<Vec<EventSeen>>;
    fn start_loop(&mut self, to: SocketAddr) -> Result<Box<dyn ClientLoop>>;
    /// Replaces the agent the way its DaemonSet would (SIGTERM, new process adopting the pins)
    /// and returns once the new one is ready, with a line saying what happened.
    fn restart_agent(&mut self) -> Result<String>;
    /// Identifies the client pod's current incarnation (a restart changes it).
    fn incarnation(&mut self) -> Result<String>;
}

/// Where a connect went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Proxy,
    Direct,
    /// The proxy got it but read another original destination.
    WrongOrig(String),
    Failed(String),
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Proxy => f.write_str("PROXY"),
            Seen::Direct => f.write_str("DIRECT"),
            Seen::WrongOrig(o) => write!(f, "PROXY but orig={o}"),
            Seen::Failed(e) => write!(f, "FAILED ({e})"),
        }
    }
}

pub fn classify(conn: &Conn, to: SocketAddr, log: &[(String, String)]) -> Seen {
    if !conn.ok || conn.reply.is_empty() {
        return Seen::Failed(conn.error.clone().unwrap_or_else(|| "empty reply".into()));
    }
    let Some(local) = &conn.local else {
        return Seen::Failed("the client reported no local address".into());
    };
    match log.iter().find(|(_, peer)| peer == local) {
        Some((orig, _)) if *orig == to.to_string() => Seen::Proxy,
        Some((orig, _)) => Seen::WrongOrig(orig.clone()),
        None => Seen::Direct,
    }
}

/// The stand-in proxy's log lines (`orig=<dst> peer=<client>`) as (orig, peer) pairs; other
/// lines (`listening ...`) are skipped.
pub fn parse_proxy_log<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<(String, String)> {
    lines
        .into_iter()
        .filter_map(|l| {
            let mut orig = None;
            let mut peer = None;
            for field in l.split_whitespace() {
                if let Some(v) = field.strip_prefix("orig=") {
                    orig = Some(v.to_string());
                } else if let Some(v) = field.strip_prefix("peer=") {
                    peer = Some(v.to_string());
                }
            }
            Some((orig?, peer?))
        })
        .collect()
}

fn wanted(via: Via) -> Seen {
    match via {
        Via::Proxy => Seen::Proxy,
        Via::Direct => Seen::Direct,
    }
}

pub fn run(c: &mut dyn Cluster, s: &Scenario) -> Result<()> {
    eprintln!("\x1b[1m==> scenario {}: {}\x1b[0m", s.name, s.title);
    if let Some(seed) = &s.seed {
        println!("  (follows /work/shared/seeds/{seed})");
    }
    let first = c.incarnation()?;
    for (i, step) in s.steps.iter().enumerate() {
        let n = i + 1;
        match step.action()? {
            Action::Say(text) => println!("\n  # {text}"),
            Action::MeshConfig(traffic) => {
                println!("  MeshConfig spec.traffic := {traffic}");
                c.set_mesh_traffic(traffic)
                    .with_context(|| format!("step {n}: setting the MeshConfig"))?;
            }
            Action::PodAnnotations(p) => {
                println!("  pod annotations: {}", show_patch(p));
                c.annotate_pod(p)
                    .with_context(|| format!("step {n}: annotating the pod"))?;
            }
            Action::NamespaceAnnotations(p) => {
                println!("  namespace annotations: {}", show_patch(p));
                c.annotate_namespace(p)
                    .with_context(|| format!("step {n}: annotating the namespace"))?;
            }
            Action::Expect { lines, wait } => {
                let targets = lines
                    .iter()
                    .map(|e| Target::outbound(e, c.vars()))
                    .collect::<Result<Vec<_>>>()?;
                expect(c, &targets, wait).with_context(|| format!("step {n}"))?
            }
            Action::ExpectInbound(lines) => {
                let pod = c.pod_ip()?;
                let targets: Vec<Target> = lines.iter().map(|e| Target::inbound(e, pod)).collect();
                expect(c, &targets, true).with_context(|| format!("step {n}"))?
            }
            Action::ExpectEvent(e) => expect_event(c, e).with_context(|| format!("step {n}"))?,
            Action::RestartAgentDuringLoop(l) => {
                rollout(c, l).with_context(|| format!("step {n}"))?
            }
        }
    }
    let last = c.incarnation()?;
    ensure!(
        first == last,
        "the client pod was restarted during the scenario ({first} → {last}); nothing here may need a restart"
    );
    println!("\n  client pod never restarted ({last})");
    Ok(())
}

fn show_patch(p: &AnnotationPatch) -> String {
    p.iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={v:?}"),
            None => format!("{k}-"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line of an expectation: where to connect, from where, and which way it must go.
struct Target {
    /// As the scenario wrote it (`api:80`, `inbound :7001`).
    label: String,
    to: SocketAddr,
    via: Via,
    inbound: bool,
}

impl Target {
    fn outbound(e: &Expect, vars: &Vars) -> Result<Target> {
        Ok(Target {
            label: e.to.clone(),
            to: super::scenario::resolve(&e.to, vars)?,
            via: e.via,
            inbound: false,
        })
    }

    fn inbound(e: &InboundExpect, pod: IpAddr) -> Target {
        Target {
            label: format!("inbound :{}", e.port),
            to: SocketAddr::new(pod, e.port),
            via: e.via,
            inbound: true,
        }
    }
}

/// Connects to every target once and says where each went.
fn observe(c: &mut dyn Cluster, targets: &[Target]) -> Result<Vec<Seen>> {
    let conns = targets
        .iter()
        .map(|t| {
            if t.inbound {
                c.connect_inbound(t.to)
            } else {
                c.connect(t.to)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    // The proxy's log reaches us through a reader thread (or `kubectl logs`): the line of a
    // connection that did reach the proxy may not be in yet when the client has its reply. So
    // "direct" is only concluded once the log has had LOG_CATCH_UP to show the connection.
    let deadline = Instant::now() + LOG_CATCH_UP;
    loop {
        let log = c.proxy_log()?;
        let seen: Vec<Seen> = targets
            .iter()
            .zip(&conns)
            .map(|(t, conn)| classify(conn, t.to, &log))
            .collect();
        if !seen.contains(&Seen::Direct) || Instant::now() >= deadline {
            return Ok(seen);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a connection that got its reply may take to show in the proxy's log.
const LOG_CATCH_UP: Duration = Duration::from_millis(300);

fn expect(c: &mut dyn Cluster, targets: &[Target], wait: bool) -> Result<()> {
    let started = Instant::now();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let seen = observe(c, targets)?;
        let all_ok = targets.iter().zip(&seen).all(|(t, s)| *s == wanted(t.via));
        if all_ok || !wait || started.elapsed() > SETTLE {
            for (t, s) in targets.iter().zip(&seen) {
                let mark = if *s == wanted(t.via) { "ok " } else { "BAD" };
                println!("  {mark} connect({} = {}) -> {s}", t.label, t.to);
            }
            if all_ok {
                if wait && rounds > 1 {
                    println!("      (held after {rounds} rounds of connects)");
                }
                return Ok(());
            }
            bail!(
                "expectations did not hold{}",
                if wait {
                    format!(" within {SETTLE:?}")
                } else {
                    " on the first try".to_string()
                }
            );
        }
        std::thread::sleep(POLL);
    }
}

fn expect_event(c: &mut dyn Cluster, e: &ExpectEvent) -> Result<()> {
    let started = Instant::now();
    loop {
        let events = c.pod_events()?;
        if let Some(ev) = events
            .iter()
            .find(|ev| ev.reason == e.reason && e.contains.iter().all(|t| ev.message.contains(t)))
        {
            println!("  Event on the pod: {}: {}", ev.reason, ev.message);
            return Ok(());
        }
        if started.elapsed() > SETTLE {
            bail!(
                "no Event {} containing {:?} on the client pod within {SETTLE:?}; events seen: {events:?}",
                e.reason,
                e.contains
            );
        }
        std::thread::sleep(POLL);
    }
}

fn wait_count(lp: &dyn ClientLoop, n: usize, what: &str) -> Result<()> {
    let started = Instant::now();
    while lp.count() < n {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the client loop made only {} connections {what}",
                lp.count()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn rollout(c: &mut dyn Cluster, l: &Loop) -> Result<()> {
    let to = super::scenario::resolve(&l.to, c.vars())?;
    let lp = c.start_loop(to)?;
    wait_count(lp.as_ref(), l.before, "before the restart")?;
    let at_restart = lp.count();
    let what = c.restart_agent();
    let at_ready = lp.count();
    let waited = what.and_then(|what| {
        println!("  {what}");
        println!(
            "  {} connections were made between the old agent's stop and the new one's readiness",
            at_ready - at_restart
        );
        wait_count(lp.as_ref(), at_ready + l.after, "after the restart")
    });
    let conns = lp.stop()?;
    waited?;
    let log = c.proxy_log()?;
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut bad = Vec::new();
    for conn in &conns {
        let seen = classify(conn, to, &log);
        if seen != wanted(l.via) {
            bad.push(format!("{:?}: {seen}", conn.local));
        }
        *counts.entry(seen.to_string()).or_default() += 1;
    }
    println!(
        "  {} connections to {} = {to} while the agent was replaced (at least {} before, {} after it was ready): {counts:?}",
        conns.len(),
        l.to,
        l.before,
        l.after
    );
    ensure!(
        bad.is_empty(),
        "{} of {} connections did not go {:?}: {bad:?}",
        bad.len(),
        conns.len(),
        l.via
    );
    if l.via == Via::Proxy {
        // The count, from the proxy's side: each of the loop's connections is in its log once.
        let locals: std::collections::BTreeSet<&str> =
            conns.iter().filter_map(|c| c.local.as_deref()).collect();
        let logged = log
            .iter()
            .filter(|(_, p)| locals.contains(p.as_str()))
            .count();
        ensure!(
            logged == conns.len(),
            "the proxy logged {logged} of the loop's {} connections",
            conns.len()
        );
        println!(
            "  the proxy's log holds all {logged} of them: zero connections escaped the proxy"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(local: &str) -> Conn {
        Conn {
            ok: true,
            local: Some(local.into()),
            reply: "x".into(),
            error: None,
        }
    }

    #[test]
    fn classification_follows_the_proxy_log() {
        let to: SocketAddr = "198.18.0.10:80".parse().unwrap();
        let log = vec![
            ("198.18.0.10:80".to_string(), "127.0.0.1:40000".to_string()),
            ("198.18.0.11:80".to_string(), "127.0.0.1:40001".to_string()),
        ];
        assert_eq!(classify(&conn("127.0.0.1:40000"), to, &log), Seen::Proxy);
        assert_eq!(
            classify(&conn("127.0.0.1:40001"), to, &log),
            Seen::WrongOrig("198.18.0.11:80".into())
        );
        assert_eq!(classify(&conn("198.18.0.10:39999"), to, &log), Seen::Direct);
        let failed = Conn {
            ok: false,
            error: Some("connect: refused".into()),
            ..conn("x")
        };
        assert!(matches!(classify(&failed, to, &log), Seen::Failed(_)));
    }

    #[test]
    fn proxy_log_lines_are_parsed() {
        let log = parse_proxy_log([
            "listening 127.0.0.1:15001",
            "orig=10.244.0.7:80 peer=127.0.0.1:4242",
        ]);
        assert_eq!(
            log,
            vec![("10.244.0.7:80".to_string(), "127.0.0.1:4242".to_string())]
        );
    }

    #[test]
    fn testclient_json_is_read() {
        let c = Conn::from_json(
            r#"{"ok":true,"reply":"proxy orig=unknown peer=1.2.3.4:5\n","peer":"198.18.0.10:80","local":"127.0.0.1:5","error":null}"#,
        )
        .unwrap();
        assert!(c.ok);
        assert_eq!(c.local.as_deref(), Some("127.0.0.1:5"));
    }
}
