//! Where the eBPF time goes: each attached program's average run time, from the kernel's own
//! accounting (BPF_ENABLE_STATS: run_time_ns and run_cnt, as `bpftool prog show` prints them with
//! kernel.bpf_stats_enabled=1). The stats stay on only while the returned fd is open, so the
//! sysctl is never touched and nothing is left enabled if the bench dies.
use std::{
    collections::BTreeMap,
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

pub fn enable_stats() -> Result<OwnedFd> {
    let attr = [BPF_STATS_RUN_TIME, 0u32];
    // SAFETY: bpf(2) reads `size` bytes of `attr`, a live zero-padded buffer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr) as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("bpf(BPF_ENABLE_STATS)");
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // A command with nothing to say (a delete) prints nothing or `null`.
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Deletes the workload's `POD_STATS` entry under `pin_dir` (its registered cgroup is `pod`), so
/// that its connects count in the node array instead: the per-pod counters' cost is the
/// difference. The agent makes the entry again with the workload's next record.
pub fn drop_pod_entry(pin_dir: &Path, pod: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let id = std::fs::metadata(pod)
        .with_context(|| format!("{}", pod.display()))?
        .ino();
    let key: Vec<String> = id.to_le_bytes().iter().map(|b| b.to_string()).collect();
    let map = pin_dir.join("POD_STATS");
    let mut args = vec!["map", "delete", "pinned"];
    let map = map.to_string_lossy();
    args.push(&map);
    args.push("key");
    args.extend(key.iter().map(String::as_str));
    bpftool(&args).map(drop)
}

/// Program name → (run_cnt, run_time_ns), for the programs linked from `pin_dir`'s link pins.
pub fn snapshot(pin_dir: &Path) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(pin_dir)? {
        let path = entry?.path();
        if !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("link_"))
        {
            continue;
        }
        let link = bpftool(&["link", "show", "pinned", &path.to_string_lossy()])?;
        let id = link["prog_id"]
            .as_u64()
            .with_context(|| format!("no prog_id for {}", path.display()))?;
        let prog = bpftool(&["prog", "show", "id", &id.to_string()])?;
        let name = prog["name"].as_str().unwrap_or("?").to_string();
        let cnt = prog["run_cnt"].as_u64().unwrap_or(0);
        let ns = prog["run_time_ns"].as_u64().unwrap_or(0);
        let e = out.entry(name).or_insert((0, 0));
        e.0 += cnt;
        e.1 += ns;
    }
    Ok(out)
}
