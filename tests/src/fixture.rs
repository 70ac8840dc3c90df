//! The per-test [`Fixture`]: its own cgroup subtree, netns and pin directory, all removed on drop.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;

use anyhow::{Context, Result, bail};

use crate::bpffs::{ensure_bpffs, remove_pin_dir};
use crate::cgroup::{cgroup_of, cgroup2_mount, destroy_subtree};
use crate::netns::{self, enter_current_thread, netns_path};
use crate::process::Spawned;
use crate::sweep::{make_name, sweep_stale};

/// A test's private kernel objects, named `redirect-test-<name>-<pid>-<n>`:
/// a cgroup v2 subtree under the cgroup2 mount, a netns (with `lo` up) and a bpffs pin
/// directory. Everything is removed on drop, including during a panic.
#[derive(Debug)]
pub struct Fixture {
    name: String,
    cgroup_root: PathBuf,
    /// Where the test process goes back to if a test moved it into the subtree.
    origin_cgroup: PathBuf,
    cgroup_created: bool,
    netns_created: bool,
    netns_file: Option<File>,
    pin_dir: PathBuf,
    pin_created: bool,
}

static SWEEP: Once = Once::new();

impl Fixture {
    /// Creates the cgroup subtree, netns and pin dir. Needs root. The first fixture of a process
    /// also sweeps leftovers of crashed earlier runs ([`sweep_stale`]).
    pub fn new(test_name: &str) -> Result<Fixture> {
        if !nix::unistd::geteuid().is_root() {
            bail!("redirect-tests fixtures need root (cgroups, netns, bpffs)");
        }
        SWEEP.call_once(|| {
            if let Err(e) = sweep_stale() {
                eprintln!("redirect-tests: sweep_stale failed: {e:#}");
            }
        });
        let name = make_name(test_name);
        let mount = cgroup2_mount()?;
        let origin_cgroup = cgroup_of(std::process::id()).unwrap_or_else(|_| mount.clone());
        // Built before anything is created so that an error half-way drops it and undoes
        // exactly the parts that exist.
        let mut fx = Fixture {
            cgroup_root: mount.join(&name),
            origin_cgroup,
            cgroup_created: false,
            netns_created: false,
            netns_file: None,
            pin_dir: PathBuf::new(),
            pin_created: false,
            name,
        };
        fs::create_dir(&fx.cgroup_root)
            .with_context(|| format!("mkdir {}", fx.cgroup_root.display()))?;
        fx.cgroup_created = true;
        netns::create(&fx.name)?;
        fx.netns_created = true;
        let ns = netns_path(&fx.name);
        fx.netns_file = Some(File::open(&ns).with_context(|| format!("open {}", ns.display()))?);
        fx.pin_dir = ensure_bpffs()?.join(&fx.name);
        fs::create_dir(&fx.pin_dir).with_context(|| format!("mkdir {}", fx.pin_dir.display()))?;
        fx.pin_created = true;
        Ok(fx)
    }

    /// The unique name shared by the cgroup dir, the netns and the pin dir.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fixture's cgroup subtree root (absolute path under the cgroup2 mount).
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// The netns name (usable with `ip -n`).
    pub fn netns_name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// An open handle on the netns, for setns(2).
    pub fn netns_file(&self) -> &File {
        self.netns_file
            .as_ref()
            .expect("netns handle exists once Fixture::new succeeded")
    }

    /// The fixture's bpffs pin directory (`/sys/fs/bpf/<name>`), removed recursively on drop.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// `mkdir -p` of a child cgroup inside the subtree (e.g. `"pod1/app"`) and its absolute path.
    /// `""` is the subtree root. Absolute paths and `..` are rejected.
    pub fn cgroup(&self, rel: &str) -> Result<PathBuf> {
        let rel = Path::new(rel);
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            bail!(
                "cgroup path {} must be relative, without '..'",
                rel.display()
            );
        }
        let path = self.cgroup_root.join(rel);
        fs::create_dir_all(&path).with_context(|| format!("mkdir -p {}", path.display()))?;
        Ok(path)
    }

    /// Adds an address to `lo` in the netns: `"198.18.0.10/32"` or `"fd00:198:18::10/128"`.
    pub fn add_addr(&self, cidr: &str) -> Result<()> {
        netns::add_addr(&self.name, cidr)
    }

    /// Runs `ip -n <netns> ARGS...` (routes, links, sysctls via iproute2).
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        netns::ip(&all)
    }

    fn check_cgroup(&self, cgroup: &Path) -> Result<()> {
        if !cgroup.starts_with(&self.cgroup_root) {
            bail!(
                "{} is outside the fixture subtree {}; processes there would escape cleanup",
                cgroup.display(),
                self.cgroup_root.display()
            );
        }
        Ok(())
    }

    /// Spawns `cmd` so that it is in `cgroup` (inside this fixture's subtree) and in the netns
    /// before it execs: its very first connect is already subject to programs attached there.
    /// `/sys` is left alone (unlike `ip netns exec`), so the cgroup2 mount stays visible.
    /// The process is SIGKILLed at the latest when the fixture drops. Use a fresh `Command` per
    /// call: the hook added here holds its own copies of the fds.
    pub fn spawn_in(&self, cgroup: &Path, cmd: &mut Command) -> Result<Child> {
        self.check_cgroup(cgroup)?;
        spawn_in_cgroup_netns(cgroup, self.netns_file(), cmd)
    }

    /// [`Fixture::spawn_in`] and wait: stdout and stderr are captured (stdin is null).
    pub fn run_in(&self, cgroup: &Path, cmd: &mut Command) -> Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = self.spawn_in(cgroup, cmd)?;
        child.wait_with_output().context("waiting for child")
    }

    /// [`Fixture::spawn_in`] for long-running helpers (proxies, servers): stdout is read line by
    /// line in the background so the caller can wait for "listening ..." and inspect logs.
    /// The process is killed when the returned [`Spawned`] drops.
    pub fn spawn_logged(&self, cgroup: &Path, cmd: &mut Command) -> Result<Spawned> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(Spawned::new(self.spawn_in(cgroup, cmd)?))
    }

    /// Runs `f` on a fresh thread that has entered the netns (the netns is per thread, so the
    /// caller's thread is unaffected). Sockets created in `f` stay in the netns and may be used
    /// from any thread afterwards. A panic in `f` is propagated.
    pub fn in_netns<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.netns_file();
        std::thread::scope(|s| {
            let h = s.spawn(|| -> Result<R> {
                enter_current_thread(file)?;
                Ok(f())
            });
            match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for Fixture {
    /// Kills the processes in the subtree (moving the test process itself out), removes the
    /// cgroups bottom-up, deletes the netns and the pin dir. Errors are printed, not raised:
    /// panicking here during an unwind would abort the test binary.
    fn drop(&mut self) {
        if self.cgroup_created
            && let Err(e) = destroy_subtree(&self.cgroup_root, &self.origin_cgroup)
        {
            eprintln!("redirect-tests: cleanup of {}: {e:#}", self.name);
        }
        self.netns_file = None;
        if self.netns_created
            && let Err(e) = netns::delete(&self.name)
        {
            eprintln!("redirect-tests: cleanup of netns {}: {e:#}", self.name);
        }
        if self.pin_created
            && let Err(e) = remove_pin_dir(&self.pin_dir)
        {
            eprintln!(
                "redirect-tests: cleanup of {}: {e:#}",
                self.pin_dir.display()
            );
        }
    }
}

/// Spawns `cmd` in `cgroup` and in the netns `netns` before it execs, as [`Fixture::spawn_in`]
/// does, with a free choice of netns: two pods (or a pod and a node) are two namespaces while
/// all of their cgroups sit under the one cgroup the programs are attached to. `cgroup` must be
/// inside a fixture's subtree, whose teardown then kills the process.
pub fn spawn_in_cgroup_netns(cgroup: &Path, netns: &File, cmd: &mut Command) -> Result<Child> {
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("open {}/cgroup.procs", cgroup.display()))?;
    let netns = netns.try_clone().context("dup netns fd")?;
    // SAFETY: the hook runs between fork and exec, so it only makes raw syscalls (write,
    // setns) on fds opened beforehand; it neither allocates nor takes locks. The fds are
    // O_CLOEXEC and owned by the closure, so they stay valid as long as `cmd` lives.
    unsafe {
        cmd.pre_exec(move || {
            // "0" means "the writing process". Joining the cgroup first means that even a
            // failed setns leaves the child where the fixture's teardown will find it.
            let msg = b"0\n";
            if libc::write(procs.as_raw_fd(), msg.as_ptr().cast(), msg.len()) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("spawning {:?} in {}", cmd, cgroup.display()))
}
