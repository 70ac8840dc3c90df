//! `cargo xtask test-kernels`: the datapath on the kernels nodes run (issue #16). For each kernel
//! in kernels.txt: fetch its packages with `apt-get download` under a private apt state (apt.rs;
//! the machine's /etc/apt is never touched), pack an initramfs (static busybox, the agent and
//! the libraries ldd lists, the static C client/proxy kcheck, the kernel's veth module), boot it
//! under `qemu-system-x86_64 -accel tcg`, and read the RESULT lines that init.sh prints. Prints
//! a kernel × check table; any failure fails the run.
mod apt;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::util;
use apt::{Archives, Kernel};

/// check → (passed, detail), from one VM.
type Results = BTreeMap<String, (bool, String)>;

const INIT: &str = include_str!("init.sh");
const KCHECK: &str = include_str!("kcheck.c");
const KERNELS: &str = include_str!("kernels.txt");

fn kernels() -> Result<Vec<Kernel>> {
    KERNELS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                [archive, suite, package, expect]
                    if ["pass", "outbound-only", "refuse"].contains(&expect) =>
                {
                    Ok(Kernel {
                        archive: archive.into(),
                        suite: suite.into(),
                        package: package.into(),
                        expect: expect.into(),
                    })
                }
                _ => bail!(
                    "kernels.txt: want ARCHIVE SUITE PACKAGE pass|outbound-only|refuse, got {l:?}"
                ),
            }
        })
        .collect()
}

pub(super) fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

/// The kernel's own initramfs: the common one with its veth module appended as a second cpio
/// archive (the kernel unpacks concatenated archives in order).
fn kernel_initrd(work: &Path, common: &Path, veth: &Path, release: &str) -> Result<PathBuf> {
    let root = work.join(format!("mod-{release}"));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("lib"))?;
    fs::copy(veth, root.join("lib/veth.ko"))?;
    let extra = work.join(format!("mod-{release}.gz"));
    sh(Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet | gzip -1 > \"$0\"")
        .arg(&extra)
        .current_dir(&root))?;
    let mut bytes = fs::read(common)?;
    bytes.extend(fs::read(&extra)?);
    let out = work.join(format!("initrd-{release}.gz"));
    fs::write(&out, bytes)?;
    fs::remove_dir_all(&root)?;
    fs::remove_file(&extra)?;
    Ok(out)
}

/// Boots one kernel and returns its results; the console goes to `log`.
/// `no_timer_check`: under TCG on a busy host the kernel's IO-APIC timer check can fail and
/// panic at boot. The timeout is generous: a VM that runs every check takes one to two minutes
/// when the machine is idle, four on one shared with several builds.
fn boot(vmlinuz: &Path, initrd: &Path, expect: &str, log: &Path) -> Result<Results> {
    let status = Command::new("timeout")
        .arg("480")
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
    let list = kernels()?;
    let archives = Archives::new(&work, &list)?;
    let agent = util::target_bin("redirect-agent", false);
    let initrd = initramfs(&work, &agent)?;
    let mut vms = Vec::new();
    for k in &list {
        let f = archives.fetch(k, &work)?;
        let initrd = kernel_initrd(&work, &initrd, &f.veth, &f.release)?;
        vms.push((k, f, initrd));
    }
    // The VMs run side by side, one per core (each is one single-threaded TCG vCPU), taking the
    // next kernel from a shared queue: the kernels that run every check (slow) go first, so that
    // the quick refusals fill the gaps.
    let at_once = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut order: Vec<usize> = (0..vms.len()).collect();
    order.sort_by_key(|&i| vms[i].0.expect == "refuse");
    let next = std::sync::Mutex::new(order.into_iter());
    let done = std::sync::Mutex::new(BTreeMap::new());
    let work_dir = work.as_path();
    std::thread::scope(|s| {
        for _ in 0..at_once.min(vms.len()) {
            s.spawn(|| {
                loop {
                    // Not `while let`: its guard would hold the queue's lock through the boot.
                    let Some(i) = next.lock().unwrap().next() else {
                        break;
                    };
                    let (k, f, initrd) = &vms[i];
                    util::step(&format!(
                        "test-kernels: booting {} (expect {})",
                        f.release, k.expect
                    ));
                    let t = Instant::now();
                    let log = work_dir.join(format!("console-{}.log", f.release));
                    let r = boot(&f.vmlinuz, initrd, &k.expect, &log);
                    println!("test-kernels: {} done in {}", f.release, secs(t.elapsed()));
                    done.lock().unwrap().insert(i, r);
                }
            });
        }
    });
    let mut table: Vec<(String, Results)> = Vec::new();
    for (i, r) in done.into_inner().unwrap() {
        let (k, f, _) = &vms[i];
        table.push((format!("{} {} ({})", k.archive, f.release, k.expect), r?));
    }
    let failed = print_table(&table);
    println!("test-kernels: {} in total", secs(started.elapsed()));
    if failed > 0 {
        bail!(
            "test-kernels: {failed} check(s) failed (console logs in {})",
            work.display()
        );
    }
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.0}s", d.as_secs_f64())
}

/// kernel × check (a column per kernel, a failure's detail below the table); returns the number
/// of failures.
fn print_table(table: &[(String, Results)]) -> usize {
    let mut checks: Vec<&String> = table.iter().flat_map(|(_, r)| r.keys()).collect();
    checks.sort();
    checks.dedup();
    let w = checks.iter().map(|c| c.len()).max().unwrap_or(5).max(5);
    print!("{:w$}", "CHECK");
    for (k, _) in table {
        print!("  {k}");
    }
    println!();
    let mut failures = Vec::new();
    for c in &checks {
        print!("{c:w$}");
        for (k, r) in table {
            let cell = match r.get(*c) {
                Some((true, _)) => "pass",
                Some((false, d)) => {
                    failures.push(format!("{k} {c}: {d}"));
                    "FAIL"
                }
                None => "-",
            };
            print!("  {cell:<kw$}", kw = k.len());
        }
        println!();
    }
    for (k, r) in table {
        if r.is_empty() {
            failures.push(format!("{k}: no results"));
        }
        for refusal in ["refused", "inbound_refused"] {
            if let Some((true, d)) = r.get(refusal) {
                println!("{k}: {d}");
            }
        }
    }
    for f in &failures {
        println!("FAILED {f}");
    }
    failures.len()
}
