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
//! `CAP_SYS_ADMIN` implies `CAP_BPF` and `CAP_PERFMON` (the kernel's `bpf_capable()` and
//! `perfmon_capable()`), so a privileged agent passes too. It is not needed: what it adds is the
//! BPF id walk (`BPF_PROG_GET_NEXT_ID`) that lets a restart *adopt* its pinned links; without
//! it a restart attaches fresh links and swaps the pins, which leaves no gap either.
use std::{fmt, fs, io};

/// A capability the agent cares about, with its number from linux/capability.h.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    NetAdmin = 12,
    SysAdmin = 21,
    Perfmon = 38,
    Bpf = 39,
}

impl Cap {
    pub fn name(self) -> &'static str {
        match self {
            Cap::NetAdmin => "CAP_NET_ADMIN",
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

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        source: io::Error,
    },
    #[error("{path}: no parsable CapEff line")]
    Parse { path: &'static str },
    #[error("{}", missing_message(.missing, *.effective))]
    Missing { missing: Vec<Cap>, effective: u64 },
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

/// The capabilities of [`RUN`] that `effective` lacks.
pub fn missing_for_run(effective: u64) -> Vec<Cap> {
    RUN.iter()
        .map(|(cap, _)| *cap)
        .filter(|cap| !cap.granted(effective))
        .collect()
}

/// Fails with a message naming every missing capability and what it is for. Call it first in
/// `run`, before anything touches the kernel, so a missing capability leaves nothing half
/// attached.
pub fn require_for_run() -> Result<(), CapsError> {
    let effective = effective()?;
    let missing = missing_for_run(effective);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CapsError::Missing { missing, effective })
    }
}

/// True when restarts can adopt pinned links (see the module docs); for a log line.
pub fn can_adopt_links(effective: u64) -> bool {
    effective & Cap::SysAdmin.bit() != 0
}

fn missing_message(missing: &[Cap], effective: u64) -> String {
    let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
    let mut msg = format!(
        "missing capabilit{} {}: redirect-agent run needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (effective set: {})",
        if missing.len() == 1 { "y" } else { "ies" },
        names.join(", "),
        describe(effective)
    );
    for cap in missing {
        if let Some((_, why)) = RUN.iter().find(|(c, _)| c == cap) {
            msg.push_str(&format!("\n  - {cap}: {why}"));
        }
    }
    msg.push_str(
        "\ngrant them in the container's securityContext.capabilities.add (deploy/base/daemonset.yaml \
         adds exactly BPF, NET_ADMIN and PERFMON), or run as root with the full capability set",
    );
    msg
}

/// The effective set as names (the ones we know) plus the raw mask.
fn describe(effective: u64) -> String {
    let known = [Cap::Bpf, Cap::NetAdmin, Cap::Perfmon, Cap::SysAdmin];
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
        assert!(missing_for_run(BPF | NET_ADMIN | PERFMON).is_empty());
    }

    #[test]
    fn each_missing_one_is_named() {
        assert_eq!(missing_for_run(NET_ADMIN | PERFMON), vec![Cap::Bpf]);
        assert_eq!(missing_for_run(BPF | PERFMON), vec![Cap::NetAdmin]);
        assert_eq!(missing_for_run(BPF | NET_ADMIN), vec![Cap::Perfmon]);
        assert_eq!(
            missing_for_run(0),
            vec![Cap::Bpf, Cap::NetAdmin, Cap::Perfmon]
        );
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_but_not_net_admin() {
        assert!(missing_for_run(SYS_ADMIN | NET_ADMIN).is_empty());
        assert_eq!(missing_for_run(SYS_ADMIN), vec![Cap::NetAdmin]);
    }

    #[test]
    fn message_names_what_is_missing_and_why() {
        let e = CapsError::Missing {
            missing: vec![Cap::Perfmon],
            effective: BPF | NET_ADMIN,
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
}
