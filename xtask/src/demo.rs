//! `cargo xtask demo`: the main job, on one machine with no cluster. A real process in its own
//! cgroup and network namespace has its outbound connects redirected to a local proxy by the
//! agent in standalone mode, an exclusion is honoured, and a live config edit takes effect with
//! nothing restarted. Everything it creates is removed at the end, also on Ctrl-C.
use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use redirect_tests::{Agent, Fixture, Reached, helper_bin, probe, serve_identity};

use crate::{setup, util};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn demo() -> Result<()> {
    util::require_root("cargo xtask demo")?;
    let env = setup::setup(setup::Needs::default())?;
    util::build(&env, false)?;
    // Ctrl-C reaches every process of the terminal's group; we only note it and unwind, so the
    // fixture's Drop removes the cgroups, the netns and the pins.
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))?;
    let result = run();
    match &result {
        Ok(()) => util::step("demo finished; everything it created has been removed"),
        Err(e) => eprintln!("demo stopped: {e:#}\n(everything it created has been removed)"),
    }
    result
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn say(text: &str) {
    println!("\n\x1b[1;36m# {text}\x1b[0m");
}

fn show(reached: &Reached, dest: &str) {
    match reached {
        Reached::Proxy { orig } => {
            println!(
                "  connect({dest}) -> \x1b[33mPROXY\x1b[0m 127.0.0.1:15001 (proxy reports original destination {orig})"
            )
        }
        Reached::Server(name) => {
            println!("  connect({dest}) -> \x1b[32mDIRECT\x1b[0m, answered by {name}")
        }
        Reached::Failed(e) => println!("  connect({dest}) -> FAILED: {e}"),
    }
}

fn config(pod: &std::path::Path, proxy: &std::path::Path, annotations: &str) -> String {
    format!(
        r#"mesh:                                   # FSM MeshConfig spec.traffic
  outboundIPRangeExclusionList: ["198.18.0.11/32"]
  outboundPortExclusionList: [5432]
proxy: {{mode: sidecar, outboundPort: 15001, uid: 1337}}
workloads:
  - name: app
    namespace: demo
    cgroup: {}
    proxyCgroup: {}
    annotations: {{{annotations}}}
"#,
        pod.display(),
        proxy.display()
    )
}

fn run() -> Result<()> {
    say("1. A pod of our own: a cgroup subtree, a network namespace, two destinations, a proxy");
    let fx = Fixture::new("demo")?;
    fx.add_addr("198.18.0.10/32")?;
    fx.add_addr("198.18.0.11/32")?;
    let _api = serve_identity(&fx, "198.18.0.10:80".parse()?, "198.18.0.10 (api)")?;
    let _db = serve_identity(&fx, "198.18.0.11:80".parse()?, "198.18.0.11 (db)")?;
    let pod = fx.cgroup("kubepods/pod-demo")?;
    let app = fx.cgroup("kubepods/pod-demo/app")?;
    let proxy_cg = fx.cgroup("kubepods/pod-demo/proxy")?;
    let proxy = fx.spawn_logged(
        &proxy_cg,
        Command::new(helper_bin("redirect-testproxy")?).args(["--listen", "127.0.0.1:15001"]),
    )?;
    proxy.wait_for_prefix("listening ", Duration::from_secs(10))?;
    println!("  netns      {}", fx.netns_name());
    println!("  pod cgroup {}", pod.display());
    println!("  proxy      127.0.0.1:15001 in {}", proxy_cg.display());
    println!("  servers    198.18.0.10:80 (api), 198.18.0.11:80 (db)");
    check_interrupt()?;

    say("2. Before the agent: the app's connects go straight to their destinations");
    for dest in ["198.18.0.10:80", "198.18.0.11:80"] {
        show(&probe(&fx, &app, dest, &[])?, dest);
    }
    check_interrupt()?;

    say("3. Start redirect-agent in standalone mode with this config");
    let cfg = config(&pod, &proxy_cg, "");
    println!("{}", indent(&cfg));
    let mut agent = Agent::start(&fx, &cfg)?;
    println!(
        "  agent running: programs attached to {}, maps pinned in {}",
        fx.cgroup_root().display(),
        agent.bpffs().display()
    );
    check_interrupt()?;

    say("4. The same process image, same cgroup: api is redirected, db (excluded) is not");
    for dest in [
        "198.18.0.10:80",
        "198.18.0.11:80",
        "[::ffff:198.18.0.10]:80",
    ] {
        show(&probe(&fx, &app, dest, &[])?, dest);
    }
    check_interrupt()?;

    say("5. Live edit: exclude api with an Istio pod annotation; no restart of anything");
    let annotation =
        r#"traffic.sidecar.istio.io/excludeOutboundIPRanges: "198.18.0.10/32,198.18.0.11/32""#;
    println!("  + {annotation}");
    let started = Instant::now();
    agent.reconfigure(&config(&pod, &proxy_cg, annotation))?;
    println!(
        "  applied {} ms after the file changed",
        started.elapsed().as_millis()
    );
    for dest in ["198.18.0.10:80", "198.18.0.11:80"] {
        show(&probe(&fx, &app, dest, &[])?, dest);
    }
    check_interrupt()?;

    say("6. What the kernel holds: redirect-agent inspect (reads the pinned maps)");
    let out = Command::new(helper_bin("redirect-agent")?)
        .args(["inspect", "--bpffs-dir"])
        .arg(agent.bpffs())
        .output()?;
    println!("{}", indent(&String::from_utf8_lossy(&out.stdout)));

    say("7. Clean up: stop the agent, redirect-agent cleanup, remove the cgroups and netns");
    agent.kill9()?;
    let out = Command::new(helper_bin("redirect-agent")?)
        .args(["cleanup", "--bpffs-dir"])
        .arg(agent.bpffs())
        .output()?;
    println!("  {}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
