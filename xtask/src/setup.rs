//! Installs what building and testing redirect needs, and says what it does. Idempotent and
//! non-interactive (CI has no stdin).
//!
//! The eBPF crate needs a Rust toolchain that can build `core` for bpfel-unknown-none. Which one
//! is decided in redirect-agent/ebpf_toolchain.rs, shared with the build script; this module
//! installs what that choice needs (for Debian's rustc-web: the packages and the rustup link).
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, bail};

use crate::util::{run, step};

#[path = "../../redirect-agent/ebpf_toolchain.rs"]
mod ebpf_toolchain;
use ebpf_toolchain::DEBIAN as DEBIAN_TOOLCHAIN;
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_VERSION: &str = "0.13";

#[derive(Default, Clone, Copy)]
pub struct Needs {
    /// haproxy and iptables, for the interop tests and the benchmark.
    pub test_tools: bool,
}

/// What later cargo invocations need to know.
pub struct Env {
    path: String,
}

impl Env {
    pub fn apply(&self, cmd: &mut Command) {
        cmd.env("PATH", &self.path);
    }
}

pub fn setup(needs: Needs) -> anyhow::Result<Env> {
    step("checking the build and test prerequisites");
    let mut packages: Vec<&str> = vec!["bpftool", "iproute2"];
    if needs.test_tools {
        // HAProxy and iptables: the original-destination and bench comparisons; dnsmasq and python3:
        // the DNS-capture tests; python3-venv: the deploy/ check's PyPI packages
        // (tests/tests/deploy_validate.rs); qemu, static busybox, cpio and a static libc:
        // test-kernels.
        packages.extend([
            "haproxy",
            "iptables",
            "dnsmasq-base",
            "python3",
            "python3-venv",
            "qemu-system-x86",
            "busybox-static",
            "cpio",
            "gcc",
            "libc6-dev",
        ]);
    }

    let ebpf_toolchain = ebpf_toolchain::choose();
    if ebpf_toolchain == DEBIAN_TOOLCHAIN {
        eprintln!(
            "    eBPF toolchain: Debian's rustc-web linked as rustup toolchain `{DEBIAN_TOOLCHAIN}` (nightly has no rust-src here)"
        );
        packages.extend(["rustc-web", "cargo-web", "rust-web-src"]);
    } else {
        eprintln!("    eBPF toolchain: {ebpf_toolchain}");
    }

    let cargo_bin = cargo_home().join("bin");
    let path = format!(
        "{}:{}:{}",
        cargo_bin.display(),
        LLVM_BIN,
        std::env::var("PATH").unwrap_or_default()
    );
    let need_linker = !bpf_linker_ok(&path);
    if need_linker {
        packages.extend([
            "llvm-22-dev",
            "libpolly-22-dev",
            "libzstd-dev",
            "zlib1g-dev",
        ]);
    }
    apt_install(&packages)?;

    if ebpf_toolchain == DEBIAN_TOOLCHAIN {
        link_debian_toolchain()?;
    }
    if need_linker {
        step(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 70 s)"
        ));
        let mut cmd = Command::new("cargo");
        cmd.args([
            "install",
            "--locked",
            "bpf-linker",
            "--version",
            &format!("~{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", &path)
        // Installing with the stable toolchain, whatever a rust-toolchain file says.
        .env("RUSTUP_TOOLCHAIN", "stable");
        run(&mut cmd)?;
    } else {
        eprintln!("    bpf-linker: present");
    }
    mount_bpffs()?;
    Ok(Env { path })
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

fn bpf_linker_ok(path: &str) -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            String::from_utf8_lossy(&o.stdout).contains(&format!("bpf-linker {BPF_LINKER_VERSION}"))
        })
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .ok()
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!("    Debian packages: all present ({})", packages.join(" "));
        return Ok(());
    }
    if which::which("apt-get").is_err() {
        bail!(
            "missing packages {} and no apt-get to install them; install them by hand",
            missing.join(" ")
        );
    }
    crate::util::require_root("installing Debian packages")?;
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        step("apt-get update");
        run(Command::new("apt-get").args(["update", "-q"]))?;
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn link_debian_toolchain() -> anyhow::Result<()> {
    let src = Path::new("/usr/lib/rustlib/src/rust/library/core");
    if !src.is_dir() {
        bail!(
            "{} is missing although rust-web-src is installed",
            src.display()
        );
    }
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup (is rustup installed?)")?;
    let linked = String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(DEBIAN_TOOLCHAIN));
    if linked {
        eprintln!("    rustup toolchain `{DEBIAN_TOOLCHAIN}`: linked");
        return Ok(());
    }
    step(&format!(
        "linking /usr as rustup toolchain `{DEBIAN_TOOLCHAIN}`"
    ));
    run(Command::new("rustup").args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]))
}

/// The agent pins under /sys/fs/bpf; some machines boot without bpffs mounted.
fn mount_bpffs() -> anyhow::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = mountinfo.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(4) == Some("/sys/fs/bpf")
            && l.split(" - ").nth(1).is_some_and(|t| t.starts_with("bpf "))
    });
    if mounted {
        eprintln!("    bpffs: mounted at /sys/fs/bpf");
        return Ok(());
    }
    if !crate::util::is_root() {
        eprintln!(
            "    bpffs: not mounted at /sys/fs/bpf (needs root; the tests and the demo mount it)"
        );
        return Ok(());
    }
    step("mounting bpffs at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
