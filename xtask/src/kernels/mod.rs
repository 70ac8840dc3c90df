//! `cargo xtask test-kernels`: the datapath on the kernels nodes run (issue #16). For each kernel
//! in kernels.txt: fetch the Debian package with `apt-get download` under a private apt state
//! (the machine's /etc/apt is never touched), pack an initramfs (static busybox, the agent and
//! the libraries ldd lists, the static C client/proxy kcheck), boot it under
//! `qemu-system-x86_64 -accel tcg`, and read the RESULT lines that init.sh prints. Prints a
//! kernel × check table; any failure fails the run.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::util;

const INIT: &str = include_str!("init.sh");
const KCHECK: &str = include_str!("kcheck.c");
const KERNELS: &str = include_str!("kernels.txt");

struct Kernel {
    suite: String,
    meta: String,
    expect: String,
}

fn kernels() -> Vec<Kernel> {
    KERNELS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3).then(|| Kernel {
                suite: f[0].into(),
                meta: f[1].into(),
                expect: f[2].into(),
            })
        })
        .collect()
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The archive URI the machine's own apt sources name for Debian (deb822 or one-line form).
fn archive_uri() -> Result<String> {
    let mut text = String::new();
    for f in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        text += &fs::read_to_string(f).unwrap_or_default();
    }
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with("/debian"))
        .map(str::to_string)
        .context("no Debian archive URI in /etc/apt/sources.list*")
}

/// apt-get with a private state, cache and sources list under `dir`.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(dir: PathBuf, suites: &[&str]) -> Result<Apt> {
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let uri = archive_uri()?;
        let list: String = suites
            .iter()
            .map(|s| format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {uri} {s} main\n"))
            .collect();
        let path = dir.join("sources.list");
        let fresh = fs::read_to_string(&path).ok().as_deref() == Some(list.as_str());
        fs::write(&path, &list)?;
        let apt = Apt { dir };
        if !fresh || fs::read_dir(apt.dir.join("lists"))?.count() < 3 {
            util::step("test-kernels: apt-get update (private state, Packages indexes only)");
            sh(apt.cmd("apt-get").args(["-q", "update"]))?;
        }
        Ok(apt)
    }

    fn cmd(&self, tool: &str) -> Command {
        let d = self.dir.display();
        let mut c = Command::new(tool);
        for o in [
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".into(),
            format!("Dir::Cache={d}/cache"),
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false".into(),
        ] {
            c.arg("-o").arg(o);
        }
        c
    }

    /// The vmlinuz of `meta` in `suite`, downloaded once into `out`.
    fn vmlinuz(&self, k: &Kernel, out: &Path) -> Result<(String, PathBuf)> {
        let show = sh(self
            .cmd("apt-cache")
            .args(["show", &format!("{}/{}", k.meta, k.suite)]))?;
        let dep = show
            .lines()
            .find_map(|l| l.strip_prefix("Depends: "))
            .and_then(|d| d.split([' ', ',']).next())
            .context("metapackage without Depends")?
            .to_string();
        let release = dep.trim_start_matches("linux-image-").to_string();
        let vmlinuz = out.join(format!("vmlinuz-{release}"));
        if !vmlinuz.exists() {
            util::step(&format!("test-kernels: apt-get download {dep}"));
            let dl = out.join("dl");
            let _ = fs::remove_dir_all(&dl);
            fs::create_dir_all(&dl)?;
            sh(self
                .cmd("apt-get")
                .arg("download")
                .arg(&dep)
                .current_dir(&dl))?;
            let deb = fs::read_dir(&dl)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "deb"))
                .context("apt-get download left no .deb")?;
            sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dl))?;
            fs::copy(dl.join(format!("boot/vmlinuz-{release}")), &vmlinuz)?;
            fs::remove_dir_all(&dl)?;
        }
        Ok((release, vmlinuz))
    }
}

/// The initramfs: busybox with its applet links, the agent and its libraries, kcheck, /init.
fn initramfs(work: &Path, agent: &Path) -> Result<PathBuf> {
    let root = work.join("root");
    let _ = fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(root.join(d))?;
    }
    let bin = root.join("bin");
    fs::copy("/bin/busybox", bin.join("busybox")).context("busybox-static is needed")?;
    for applet in sh(Command::new("/bin/busybox").arg("--list"))?.lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet))?;
        }
    }
    fs::copy(agent, bin.join("redirect-agent"))?;
    sh(Command::new("strip").arg(bin.join("redirect-agent")))?;
    for lib in sh(Command::new("ldd").arg(agent))?
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dst = root.join(lib.trim_start_matches('/'));
        fs::create_dir_all(dst.parent().unwrap())?;
        fs::copy(lib, &dst)?;
    }
    let src = work.join("kcheck.c");
    fs::write(&src, KCHECK)?;
    sh(Command::new("gcc")
        .args(["-static", "-O1", "-Wall", "-o"])
        .arg(bin.join("kcheck"))
        .arg(&src))?;
    fs::write(root.join("init"), INIT)?;
    sh(Command::new("chmod").arg("+x").arg(root.join("init")))?;
    let out = work.join("initrd.gz");
    sh(Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet | gzip -1 > \"$0\"")
        .arg(&out)
        .current_dir(&root))?;
    Ok(out)
}

/// `no_timer_check`: under TCG on a busy host the kernel's IO-APIC timer check can fail and
/// panic at boot.
/// Boots one kernel and returns (check → (passed, detail)) and the console log.
fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    expect: &str,
    log: &Path,
) -> Result<BTreeMap<String, (bool, String)>> {
    let status = Command::new("timeout")
        .arg("240")
        .arg("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "1024",
            "-smp",
            "1",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet no_timer_check EXPECT={expect}"
        ))
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(std::process::Stdio::null())
        .status()?;
    let text = String::from_utf8_lossy(&fs::read(log)?).into_owned();
    let mut results = BTreeMap::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("RESULT ")) {
        let mut f = l.splitn(3, ' ');
        let (name, verdict) = (f.next().unwrap_or("?"), f.next().unwrap_or(""));
        results.insert(
            name.to_string(),
            (verdict == "PASS", f.next().unwrap_or("").trim().to_string()),
        );
    }
    if !text.contains("=== end") {
        results.insert(
            "vm_finished".into(),
            (false, format!("qemu {status}; see {}", log.display())),
        );
    }
    Ok(results)
}

pub fn test_kernels() -> Result<()> {
    util::require_root("cargo xtask test-kernels")?;
    let started = Instant::now();
    let work = util::workspace_root().join("target/kernels");
    fs::create_dir_all(&work)?;
    let list = kernels();
    let mut suites: Vec<&str> = list.iter().map(|k| k.suite.as_str()).collect();
    suites.dedup();
    let apt = Apt::new(work.join("apt"), &suites)?;
    let agent = util::target_bin("redirect-agent", false);
    let initrd = initramfs(&work, &agent)?;
    let mut table: Vec<(String, BTreeMap<String, (bool, String)>)> = Vec::new();
    for k in &list {
        let (release, vmlinuz) = apt.vmlinuz(k, &work)?;
        util::step(&format!(
            "test-kernels: booting {release} (expect {})",
            k.expect
        ));
        let log = work.join(format!("console-{release}.log"));
        let r = boot(&vmlinuz, &initrd, &k.expect, &log)?;
        table.push((format!("{release} ({})", k.expect), r));
    }
    let failed = print_table(&table);
    println!("test-kernels: {:.0?} in total", started.elapsed());
    if failed > 0 {
        bail!(
            "test-kernels: {failed} check(s) failed (console logs in {})",
            work.display()
        );
    }
    Ok(())
}

/// kernel × check; returns the number of failures.
fn print_table(table: &[(String, BTreeMap<String, (bool, String)>)]) -> usize {
    let mut checks: Vec<&String> = table.iter().flat_map(|(_, r)| r.keys()).collect();
    checks.sort();
    checks.dedup();
    let w = checks.iter().map(|c| c.len()).max().unwrap_or(5).max(5);
    print!("{:w$}", "CHECK");
    for (k, _) in table {
        print!("  {k:<34}");
    }
    println!();
    let mut failed = 0;
    for c in &checks {
        print!("{c:w$}");
        for (_, r) in table {
            let cell = match r.get(*c) {
                Some((true, _)) => "pass".to_string(),
                Some((false, d)) => {
                    failed += 1;
                    format!("FAIL {d}")
                }
                None => "-".into(),
            };
            print!("  {cell:<34}");
        }
        println!();
    }
    for (k, r) in table {
        if r.is_empty() {
            failed += 1;
            println!("{k}: no results");
        }
        if let Some((true, d)) = r.get("refused") {
            println!("{k}: {d}");
        }
    }
    failed
}
