//! Runs the workspace's test binaries a few at a time instead of one after another, as
//! `cargo test` does. Most kernel tests spend their time waiting (on connects, agents starting,
//! grace periods), so two binaries at once roughly halve the suite's wall time on two cores.
//! Each binary still runs its own tests two at a time; every kernel test owns its fixture
//! (a uniquely named cgroup subtree, netns and pin directory), so tests of different binaries
//! share no kernel state either.
//!
//! A binary's output is kept in `target/test-logs/<name>.log` and printed whole if it fails;
//! otherwise one line per binary says how long it took and what libtest counted.
use std::{
    collections::VecDeque,
    fs::File,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    setup::Env,
    util::{step, workspace_root},
};

/// The binaries that run longest (measured on a clean CI run), started first so that the short
/// ones fill in around them rather than one long binary running alone at the end.
const LONGEST_FIRST: &[&str] = &[
    "origdst_leak",
    "kube_cgroups",
    "deploy_validate",
    "kube_findings",
    "escapes_datapath",
    "e2e_local",
    "upgrade",
];

struct Binary {
    /// `<package>::<target>` as cargo names it, e.g. `redirect-tests::origdst_leak`.
    name: String,
    target: String,
    exe: PathBuf,
    /// The package's directory: cargo runs a test binary there.
    dir: PathBuf,
}

struct Running {
    name: String,
    child: Child,
    log: PathBuf,
    started: Instant,
}

/// Builds nothing new (the caller built the tests) but asks cargo for the test executables.
fn list(env: &Env) -> anyhow::Result<Vec<Binary>> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(workspace_root())
    .stdout(Stdio::piped());
    env.apply(&mut cmd);
    let mut child = cmd.spawn().context("running cargo test --no-run")?;
    let stdout = child.stdout.take().expect("piped");
    let mut out = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let manifest = msg["manifest_path"].as_str().unwrap_or_default();
        let target = msg["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let package = msg["package_id"]
            .as_str()
            .and_then(package_name)
            .unwrap_or("?");
        out.push(Binary {
            name: format!("{package}::{target}"),
            target,
            exe: exe.into(),
            dir: Path::new(manifest)
                .parent()
                .unwrap_or(Path::new("."))
                .to_path_buf(),
        });
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo test --no-run failed: {status}");
    }
    Ok(out)
}

/// The package name of a cargo package id (`path+file:///…/tests#redirect-tests@0.1.0`, or
/// `…/redirect-agent#0.1.0` where the directory is the name).
fn package_name(id: &str) -> Option<&str> {
    let (path, rest) = id.rsplit_once('#')?;
    match rest.split_once('@') {
        Some((name, _)) => Some(name),
        None => path.rsplit('/').next(),
    }
}

fn start(b: &Binary, logs: &Path, threads: &str) -> anyhow::Result<Running> {
    let log = logs.join(format!("{}.log", b.name.replace("::", "-")));
    let file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let child = Command::new(&b.exe)
        .arg(format!("--test-threads={threads}"))
        .current_dir(&b.dir)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("running {}", b.exe.display()))?;
    Ok(Running {
        name: b.name.clone(),
        child,
        log,
        started: Instant::now(),
    })
}

/// libtest's closing count, e.g. `ok. 12 passed; 0 failed; 0 ignored; …`.
fn summary(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("test result: "))
        .map(|s| s.split("; finished").next().unwrap_or(s).to_string())
        .unwrap_or_else(|| "no test result line".into())
}

/// Runs every test binary, `jobs` at a time, then the doc tests. Fails naming every binary that
/// failed, after all of them have run.
pub fn run_all(env: &Env, jobs: usize) -> anyhow::Result<()> {
    let mut bins = list(env)?;
    let rank = |b: &Binary| {
        LONGEST_FIRST
            .iter()
            .position(|n| *n == b.target)
            .unwrap_or(LONGEST_FIRST.len())
    };
    bins.sort_by_key(|b| (rank(b), b.name.clone()));
    step(&format!(
        "running {} test binaries, {jobs} at a time (two test threads each)",
        bins.len()
    ));
    let logs = workspace_root().join("target/test-logs");
    std::fs::create_dir_all(&logs)?;
    let started = Instant::now();
    let mut queue: VecDeque<Binary> = bins.into();
    let mut running: Vec<Running> = Vec::new();
    let mut failed = Vec::new();
    let mut times: Vec<(Duration, String)> = Vec::new();
    while !queue.is_empty() || !running.is_empty() {
        while running.len() < jobs.max(1)
            && let Some(b) = queue.pop_front()
        {
            running.push(start(&b, &logs, "2")?);
        }
        let mut i = 0;
        while i < running.len() {
            let Some(status) = running[i].child.try_wait()? else {
                i += 1;
                continue;
            };
            let r = running.swap_remove(i);
            let took = r.started.elapsed();
            let result = summary(&r.log);
            eprintln!(
                "    {:>6.1} s  {}  {}",
                took.as_secs_f64(),
                r.name,
                if status.success() {
                    result
                } else {
                    format!("FAILED ({status})")
                }
            );
            if !status.success() {
                let text = std::fs::read_to_string(&r.log).unwrap_or_default();
                eprintln!(
                    "---- output of {} ----\n{text}---- end of {} ----",
                    r.name, r.name
                );
                failed.push(r.name.clone());
            }
            times.push((took, r.name));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let total: Duration = times.iter().map(|(t, _)| *t).sum();
    eprintln!(
        "    test binaries: {:.0} s of run time in {:.0} s of wall time",
        total.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    step("doc tests");
    crate::util::cargo(env, &["test", "--doc", "--", "--test-threads=2"])?;
    if !failed.is_empty() {
        bail!("test binaries failed: {}", failed.join(", "));
    }
    Ok(())
}
