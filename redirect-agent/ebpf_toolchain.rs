//! Which Rust toolchain builds the eBPF crate. This file is the one place that decides: the
//! build script (`build.rs`) builds with the answer, and `cargo xtask setup` includes this file
//! to install what the answer needs. Plain std, so both can compile it.
//!
//! - `REDIRECT_EBPF_TOOLCHAIN` wins when set;
//! - otherwise nightly if it ships rust-src (the usual aya route);
//! - otherwise Debian's rustc-web + rust-web-src (sources in /usr/lib/rustlib/src), linked by
//!   `cargo xtask setup` as the rustup toolchain [`DEBIAN`]; build.rs then sets RUSTC_BOOTSTRAP=1
//!   for the nested build only.
use std::{path::PathBuf, process::Command};

/// The rustup toolchain name Debian's compiler is linked as.
pub const DEBIAN: &str = "debian";

/// The environment variable that overrides the choice.
pub const OVERRIDE: &str = "REDIRECT_EBPF_TOOLCHAIN";

/// The rustup toolchain to build the eBPF crate with.
pub fn choose() -> String {
    if let Ok(t) = std::env::var(OVERRIDE) {
        return t;
    }
    if nightly_has_rust_src() {
        "nightly".into()
    } else {
        DEBIAN.into()
    }
}

fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|sysroot| sysroot.join("lib/rustlib/src/rust/library/core").is_dir())
}
