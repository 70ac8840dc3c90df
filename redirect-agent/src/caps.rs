//! Capability pre-check for `redirect-agent run`: say which capability is missing, by name,
//! before the kernel answers a bare EPERM/EACCES somewhere inside the object load.
//!
//! The list is exact, and `tests/tests/capabilities.rs` proves it: with these three and nothing
//! else the agent loads, attaches and reconciles; without any one of them it stops here.
//!
//! | capability     | why (what the kernel refuses without it)                                   |
//! |----------------|----------------------------------------------------------------------------|
//! | `CAP_BPF`      | creating maps and BTF: `failed to create map POLICY: Operation not permitted` |
//! | `CAP_NET_ADMIN`| loading cgroup socket programs (sock_addr, sock_ops, sockopt): `BPF_PROG_LOAD ... Operation not permitted` |
//! | `CAP_PERFMON`  | the verifier allows the datapath's pointer arithmetic only with it: `pointer arithmetic with it prohibited for !root` |
//!
//! Inbound interception in the Kubernetes source (`--inbound`, on by default) adds two, and the
//! host's PID namespace (`hostPID`):
//!
//! | capability       | why |
//! |------------------|-----|
//! | `CAP_SYS_PTRACE` | opening a pod process's `/proc/PID/ns/net` (another user's: a ptrace read check, `Permission denied`) and taking the proxy's listener with pidfd_getfd (backfill) |
//! | `CAP_SYS_ADMIN`  | setns(2) into the pod's netns to read its cookie (`SO_NETNS_COOKIE`), which the sk_lookup program is loaded with: `Operation not permitted` |
//!
//! `--inbound=false` needs neither. `CAP_SYS_ADMIN` implies `CAP_BPF` and `CAP_PERFMON` (the
//! kernel's `bpf_capable()` and `perfmon_capable()`), so a privileged agent passes too. Without
//! inbound it is not needed: what it adds there is the BPF id walk (`BPF_PROG_GET_NEXT_ID`) that
//! lets a restart *adopt* its pinned links; without it a restart attaches fresh links and swaps
//! the pins, which leaves no gap either.
use std::{fmt, fs, io};

/// A capability the agent cares about, with its number from linux/capability.h.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    NetAdmin = 12,
    SysPtrace = 19,
    SysAdmin = 21,
    Perfmon = 38,
    Bpf = 39,
}

impl Cap {
    pub fn name(self) -> &'static str {
        match self {
            Cap::NetAdmin => "CAP_NET_ADMIN",
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }

    fn bit(self) -> u64 {
        1 << (self as u32)
    }

    /// Whether the effective set grants what this capability grants (CAP_SYS_ADMIN stands in
    /// for CAP_BPF and CAP_PERFMON, as in the kernel).
    fn granted(self, effective: u64) -> bool {
        let covered_by_sys_admin = matches!(self, Cap::Bpf | Cap::Perfmon);
        effective & self.bit() != 0
            || (covered_by_sys_admin && effective & Cap::SysAdmin.bit() != 0)
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What `run` needs, and why, in the words an operator can act on.
pub const RUN: [(Cap, &str); 3] = [
    (Cap::Bpf, "needed to create the BPF maps and load their BTF"),
    (
        Cap::NetAdmin,
        "needed to load and attach cgroup socket programs (connect4/6, sock_ops, getsockopt, getpeername4/6)",
    ),
    (
        Cap::Perfmon,
        "needed for the verifier to accept the datapath's pointer arithmetic (refused without it)",
    ),
];

/// What inbound interception in the Kubernetes source adds.
pub const INBOUND: [(Cap, &str); 2] = [
    (
        Cap::SysAdmin,
        "inbound interception (--inbound): needed to join a pod's network namespace (setns) and read its cookie",
    ),
    (
        Cap::SysPtrace,
        "inbound interception (--inbound): needed to open a pod process's /proc/PID/ns/net and to take the proxy's listener (pidfd_getfd)",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        source: io::Error,
    },
    #[error("{path}: no parsable CapEff line")]
    Parse { path: &'static str },
    #[error("{}", missing_message(.missing, *.effective, *.inbound))]
    Missing {
        missing: Vec<Cap>,
        effective: u64,
        inbound: bool,
    },
}

const STATUS: &str = "/proc/self/status";

/// The effective capability set of this process.
pub fn effective() -> Result<u64, CapsError> {
    let text = fs::read_to_string(STATUS).map_err(|source| CapsError::Read {
        path: STATUS,
        source,
    })?;
    parse_cap_eff(&text).ok_or(CapsError::Parse { path: STATUS })
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The capabilities of [`RUN`] (and of [`INBOUND`] if `inbound`) that `effective` lacks.
pub fn missing_for_run(effective: u64, inbound: bool) -> Vec<Cap> {
    let extra: &[(Cap, &str)] = if inbound { &INBOUND } else { &[] };
    RUN.iter()
        .chain(extra)
        .map(|(cap, _)| *cap)
        .filter(|cap| !cap.granted(effective))
        .collect()
}

/// Fails with a message naming every missing capability and what it is for. Call it first in
/// `run`, before anything touches the kernel, so a missing capability leaves nothing half
/// attached.
pub fn require_for_run(inbound: bool) -> Result<(), CapsError> {
    let effective = effective()?;
    let missing = missing_for_run(effective, inbound);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CapsError::Missing {
            missing,
            effective,
            inbound,
        })
    }
}

/// True when restarts can adopt pinned links (see the module docs); for a log line.
pub fn can_adopt_links(effective: u64) -> bool {
    effective & Cap::SysAdmin.bit() != 0
}

fn missing_message(missing: &[Cap], effective: u64, inbound: bool) -> String {
    let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
    let mut msg = format!(
        "missing capabilit{} {}: redirect-agent run needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON{} (effective set: {})",
        if missing.len() == 1 { "y" } else { "ies" },
        names.join(", "),
        if inbound {
            ", and for inbound interception (--inbound, on by default) CAP_SYS_ADMIN and CAP_SYS_PTRACE"
        } else {
            ""
        },
        describe(effective)
    );
    for cap in missing {
        if let Some((_, why)) = RUN.iter().chain(&INBOUND).find(|(c, _)| c == cap) {
            msg.push_str(&format!("\n  - {cap}: {why}"));
        }
    }
    msg.push_str(
        "\ngrant them in the container's securityContext.capabilities.add (deploy/base/daemonset.yaml \
         adds exactly BPF, NET_ADMIN, PERFMON, SYS_ADMIN and SYS_PTRACE, with hostPID: true), or run as \
         root with the full capability set",
    );
    if inbound {
        msg.push_str(
            "; or turn inbound interception off with --inbound=false, which needs only the first three",
        );
    }
    msg
}

/// The effective set as names (the ones we know) plus the raw mask.
fn describe(effective: u64) -> String {
    let known = [
        Cap::Bpf,
        Cap::NetAdmin,
        Cap::Perfmon,
        Cap::SysAdmin,
        Cap::SysPtrace,
    ];
    let names: Vec<&str> = known
        .iter()
        .filter(|c| effective & c.bit() != 0)
        .map(|c| c.name())
        .collect();
    let names = if names.is_empty() {
        "none of the needed ones".to_string()
    } else {
        names.join(", ")
    };
    format!("{names}; CapEff={effective:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BPF: u64 = 1 << 39;
    const NET_ADMIN: u64 = 1 << 12;
    const PERFMON: u64 = 1 << 38;
    const SYS_ADMIN: u64 = 1 << 21;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tredirect-agent\nCapInh:\t0000000000000000\nCapPrm:\t000000c000001000\n\
                      CapEff:\t000000c000001000\nCapBnd:\t000000c000001000\n";
        assert_eq!(parse_cap_eff(status), Some(BPF | PERFMON | NET_ADMIN));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn exactly_the_three_pass() {
        assert!(missing_for_run(BPF | NET_ADMIN | PERFMON, false).is_empty());
    }

    #[test]
    fn each_missing_one_is_named() {
        assert_eq!(missing_for_run(NET_ADMIN | PERFMON, false), vec![Cap::Bpf]);
        assert_eq!(missing_for_run(BPF | PERFMON, false), vec![Cap::NetAdmin]);
        assert_eq!(missing_for_run(BPF | NET_ADMIN, false), vec![Cap::Perfmon]);
        assert_eq!(
            missing_for_run(0, false),
            vec![Cap::Bpf, Cap::NetAdmin, Cap::Perfmon]
        );
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_but_not_net_admin() {
        assert!(missing_for_run(SYS_ADMIN | NET_ADMIN, false).is_empty());
        assert_eq!(missing_for_run(SYS_ADMIN, false), vec![Cap::NetAdmin]);
    }

    #[test]
    fn message_names_what_is_missing_and_why() {
        let e = CapsError::Missing {
            missing: vec![Cap::Perfmon],
            effective: BPF | NET_ADMIN,
            inbound: false,
        };
        let msg = e.to_string();
        assert!(msg.starts_with("missing capability CAP_PERFMON:"), "{msg}");
        assert!(
            msg.contains("effective set: CAP_BPF, CAP_NET_ADMIN;"),
            "{msg}"
        );
        assert!(
            msg.contains("- CAP_PERFMON: needed for the verifier"),
            "{msg}"
        );
        assert!(!msg.contains("- CAP_BPF"), "{msg}");
    }

    const SYS_PTRACE: u64 = 1 << 19;

    #[test]
    fn inbound_adds_sys_admin_and_sys_ptrace() {
        let base = BPF | NET_ADMIN | PERFMON;
        assert!(missing_for_run(base, false).is_empty());
        assert_eq!(
            missing_for_run(base, true),
            vec![Cap::SysAdmin, Cap::SysPtrace]
        );
        assert_eq!(
            missing_for_run(base | SYS_ADMIN, true),
            vec![Cap::SysPtrace]
        );
        assert!(missing_for_run(base | SYS_ADMIN | SYS_PTRACE, true).is_empty());
        let msg = CapsError::Missing {
            missing: vec![Cap::SysPtrace],
            effective: base | SYS_ADMIN,
            inbound: true,
        }
        .to_string();
        assert!(
            msg.starts_with("missing capability CAP_SYS_PTRACE:"),
            "{msg}"
        );
        assert!(
            msg.contains("- CAP_SYS_PTRACE: inbound interception"),
            "{msg}"
        );
        assert!(msg.contains("--inbound=false"), "{msg}");
    }
}
