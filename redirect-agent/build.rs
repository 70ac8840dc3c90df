//! Builds redirect-ebpf for bpfel-unknown-none with aya-build and leaves the object in OUT_DIR,
//! where `bpf::loader` embeds it with `include_bytes_aligned!`.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Name under which `cargo xtask setup` links Debian's rustc-web as a rustup toolchain.
const DEBIAN_TOOLCHAIN: &str = "debian";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=REDIRECT_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Lets `cargo check`/clippy run without the eBPF toolchain; the binary then refuses to load.
        fs::write(out_dir.join("redirect"), [])?;
        return Ok(());
    }

    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "redirect-ebpf")
        .ok_or_else(|| anyhow!("redirect-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?
        .to_string();

    let toolchain = pick_toolchain();
    if toolchain != "nightly" {
        // Debian's rustc reports the stable channel; RUSTC_BOOTSTRAP=1 (set here, not in the outer
        // environment, so the userspace build stays stable) makes aya-build pass -Z build-std=core.
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "redirect-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}

/// REDIRECT_EBPF_TOOLCHAIN wins; otherwise nightly if it ships rust-src (the usual aya route),
/// else the Debian toolchain that `cargo xtask setup` links.
fn pick_toolchain() -> String {
    if let Ok(t) = env::var("REDIRECT_EBPF_TOOLCHAIN") {
        return t;
    }
    let nightly_has_src = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|sysroot| sysroot.join("lib/rustlib/src/rust/library/core").is_dir());
    if nightly_has_src {
        "nightly".into()
    } else {
        DEBIAN_TOOLCHAIN.into()
    }
}
