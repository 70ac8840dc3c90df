//! Builds redirect-ebpf for bpfel-unknown-none with aya-build and leaves the object in OUT_DIR,
//! where `bpf::loader` embeds it with `include_bytes_aligned!`.
mod ebpf_toolchain;

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={}", ebpf_toolchain::OVERRIDE);
    println!("cargo:rerun-if-changed=ebpf_toolchain.rs");
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

    let toolchain = ebpf_toolchain::choose();
    if toolchain != "nightly" {
        // Debian's rustc reports the stable channel; RUSTC_BOOTSTRAP=1 (set here, not in the outer
        // environment, so the userspace build stays stable) makes aya-build pass -Z build-std=core.
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    // The test-only layout feature reaches the eBPF object too, so that both sides of the maps
    // agree on the record (tests/tests/upgrade.rs builds an agent with it).
    let features: &[&str] = if env::var_os("CARGO_FEATURE_TEST_POLICY_PAD").is_some() {
        &["test-policy-pad"]
    } else {
        &[]
    };
    build_shared(
        &metadata.target_directory.into_std_path_buf(),
        &out_dir,
        features,
        || {
            aya_build::build_ebpf(
                [aya_build::Package {
                    name: "redirect-ebpf",
                    root_dir: &root_dir,
                    features,
                    ..Default::default()
                }],
                Toolchain::Custom(&toolchain),
            )
        },
    )
}

/// Runs aya-build with one nested target directory for the whole workspace, then copies the
/// object into this build script's OUT_DIR.
///
/// Why: aya-build puts its nested `--target-dir` under OUT_DIR, and cargo gives every
/// build-script instance its own OUT_DIR (dev vs test profile, another feature set of a
/// dependency, the layout-test feature). Each instance then rebuilt `core` and the eBPF crate
/// from nothing, about 1.5 min each and four times in `cargo xtask test`. With one nested target
/// directory, cargo's own fingerprints decide what the nested build redoes.
///
/// aya-build derives both its target directory and where it copies the object from OUT_DIR, so
/// it gets a per-feature-set staging OUT_DIR under `target/ebpf/` whose `aya-build/target/
/// redirect-ebpf` is a link to the one shared directory. A file lock serialises instances
/// (cargo runs build scripts in parallel), so no copy reads a half-written object.
fn build_shared(
    target_dir: &Path,
    out_dir: &Path,
    features: &[&str],
    build: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let root = target_dir.join("ebpf");
    let key = if features.is_empty() {
        "default".to_string()
    } else {
        features.join("+")
    };
    let staging = root.join(&key);
    let nested = staging.join("aya-build").join("target");
    fs::create_dir_all(&nested).with_context(|| format!("creating {}", nested.display()))?;
    let shared = root.join("target");
    fs::create_dir_all(&shared)?;
    let link = nested.join("redirect-ebpf");
    if fs::read_link(&link).ok().as_deref() != Some(shared.as_path()) {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&shared, &link)
            .with_context(|| format!("linking {} to {}", link.display(), shared.display()))?;
    }
    let lock = fs::File::create(root.join(".lock"))?;
    lock.lock().context("locking target/ebpf")?;
    // SAFETY: build scripts are single-threaded at this point; OUT_DIR is restored below.
    unsafe { env::set_var("OUT_DIR", &staging) };
    let built = build();
    unsafe { env::set_var("OUT_DIR", out_dir) };
    built?;
    let object = staging.join("redirect");
    fs::copy(&object, out_dir.join("redirect"))
        .with_context(|| format!("copying {} to {}", object.display(), out_dir.display()))?;
    Ok(())
}
