//! Builds redirect-ebpf for bpfel-unknown-none with aya-build and leaves the object in OUT_DIR,
//! where `bpf::loader` embeds it with `include_bytes_aligned!`.
mod ebpf_toolchain;

use std::{env, fs, path::PathBuf};

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
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "redirect-ebpf",
            root_dir: &root_dir,
            features,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
