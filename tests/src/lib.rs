//! Privileged fixtures for redirect's kernel integration tests, the demo and the benchmark.
//!
//! Everything a test touches in the kernel is private to it and removed afterwards
//! (docs/architecture.md, "Verification"): a [`Fixture`] owns a uniquely named cgroup v2 subtree,
//! network namespace and bpffs pin directory. Processes are started in a cgroup of the subtree *and* in the netns
//! before they exec ([`Fixture::spawn_in`]), and in-process sockets can be made inside the netns
//! with [`Fixture::in_netns`]. [`serve_identity`] runs a named TCP server there.
//!
//! Helper binaries of this crate: `redirect-testclient` (connect, print reply and peer as JSON)
//! and `redirect-testproxy` (a transparent proxy reading SO_ORIGINAL_DST). Locate them with
//! `env!("CARGO_BIN_EXE_...")` in this crate's tests, or [`helper_bin`] elsewhere.
//!
//! All of it needs root.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use redirect_tests::{Fixture, cgroup_id, serve_identity};
//! use std::process::Command;
//!
//! let fx = Fixture::new("my_test")?;
//! fx.add_addr("198.18.0.10/32")?;
//! let _srv = serve_identity(&fx, "198.18.0.10:80".parse()?, "backend")?;
//! let pod = fx.cgroup("pod1")?; // register cgroup_id(&pod)? with the datapath
//! let app = fx.cgroup("pod1/app")?;
//! let _ = cgroup_id(&pod)?;
//! let out = fx.run_in(
//!     &app,
//!     Command::new(redirect_tests::helper_bin("redirect-testclient")?)
//!         .args(["connect", "198.18.0.10:80", "--json"]),
//! )?;
//! assert!(out.status.success());
//! # Ok(()) }
//! ```

mod agent;
mod bpffs;
mod cgroup;
pub mod connect_loop;
pub mod e2e;
mod fixture;
mod mesh;
mod netns;
mod origdst;
mod probe;
mod process;
mod server;
mod sweep;

use std::path::PathBuf;

use anyhow::{Result, bail};

pub use agent::{Agent, inspect, inspect_with};
pub use bpffs::{BPFFS, ensure_bpffs};
pub use cgroup::{cgroup_id, cgroup_of, cgroup2_mount, move_pid};
pub use fixture::{Fixture, spawn_in_cgroup_netns};
pub use mesh::{
    MeshPods, MeshWorld, agent_cleanup, agent_cli, assert_cleanup_refused, serve_own_addresses,
    setpriv_args, spawn_client_shell, start_testproxy, veth_pair,
};
pub use netns::{NETNS_DIR, enter_current_thread, ip, netns_path};
pub use origdst::{IP6T_SO_ORIGINAL_DST, SO_ORIGINAL_DST, original_dst};
pub use probe::{Reached, probe, probe_json};
pub use process::Spawned;
pub use server::{IdentityServer, serve_identity};
pub use sweep::{PREFIX, sweep_stale};

/// Finds a helper binary of this crate (`redirect-testclient`, `redirect-testproxy`) for code
/// outside it, which has no `CARGO_BIN_EXE_*`: `$REDIRECT_TESTS_BIN_DIR` if set, else next to the
/// current executable or one level up (cargo puts test executables in `target/<profile>/deps`).
/// The binaries must have been built (`cargo build -p redirect-tests --bins`).
pub fn helper_bin(name: &str) -> Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("REDIRECT_TESTS_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        dirs.push(dir.to_path_buf());
        if let Some(up) = dir.parent() {
            dirs.push(up.to_path_buf());
        }
    }
    for d in &dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "helper binary {name} not found in {dirs:?}; build it with cargo build -p redirect-tests --bins"
    )
}
