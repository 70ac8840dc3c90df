//! Kernel feature probe, run before anything is pinned (issue #16): every hook (program type and
//! attach type) and every helper that each program of the embedded object calls is tried on the
//! running kernel with a two-instruction program, as libbpf and bpftool probe. A kernel that
//! lacks one gets one line naming it and the minimum kernel, instead of a verifier dump after
//! the maps were already pinned.
//!
//! The helpers are read from the object's own instructions, so a program added to the loader's
//! list is probed for what it really calls, with nothing to keep in sync by hand.
use std::{collections::BTreeSet, ffi::CStr, io, os::fd::FromRawFd as _, os::fd::OwnedFd};

use aya_obj::{
    Object, ProgramSection,
    generated::{bpf_attach_type as at, bpf_func_id, bpf_prog_type as pt},
};

/// The oldest kernel that has every feature the current programs need (bpf_get_netns_cookie in
/// sock_ops and cgroup sockopt programs came last, in 5.15). docs/deploy.md lists what the
/// kernel matrix (`cargo xtask test-kernels`) measured.
pub const MIN_KERNEL: &str = "5.15";

/// A feature the running kernel lacks.
#[derive(Debug, thiserror::Error)]
#[error(
    "kernel {kernel} lacks {feature} (needed by {program}{since}); redirect needs Linux {MIN_KERNEL} or later"
)]
pub struct MissingFeature {
    pub kernel: String,
    pub feature: String,
    pub program: String,
    /// ", added in Linux X.Y" where known.
    pub since: String,
}

/// The running kernel cannot run the inbound (sk_lookup) program, and inbound is on.
#[derive(Debug, thiserror::Error)]
#[error(
    "kernel {kernel} lacks {feature} (needed by {program} for inbound interception{since}); run with --inbound=false for outbound interception only, or use Linux {INBOUND_MIN_KERNEL} or later"
)]
pub struct InboundUnsupported {
    pub kernel: String,
    pub feature: String,
    pub program: String,
    /// ", added in Linux X.Y" where known.
    pub since: String,
}

/// The oldest kernel whose sk_lookup context has every field the inbound program reads
/// (`ingress_ifindex` came last, in 5.17; measured by `cargo xtask test-kernels`).
pub const INBOUND_MIN_KERNEL: &str = "5.17";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Missing(#[from] MissingFeature),
    #[error(transparent)]
    Inbound(#[from] InboundUnsupported),
    #[error("probing kernel features: parsing the eBPF object: {0}")]
    Object(#[from] aya_obj::ParseError),
    #[error("probing kernel features: program {0} is not in the eBPF object")]
    NoProgram(String),
    #[error("probing kernel features ({what}): BPF_PROG_LOAD: {source}")]
    Syscall { what: String, source: io::Error },
}

/// How a program hooks in: its program type and expected attach type (u32::MAX: none).
#[derive(Clone, Copy, Debug)]
struct Hook {
    prog_type: u32,
    attach_type: u32,
    name: &'static str,
    since: &'static str,
}

fn hook(section: &ProgramSection) -> Option<Hook> {
    use aya_obj::programs::{CgroupSockAddrAttachType as A, CgroupSockoptAttachType as O};
    let h = |prog_type: pt, attach_type: u32, name, since| Hook {
        prog_type: prog_type as u32,
        attach_type,
        name,
        since,
    };
    let sa = pt::BPF_PROG_TYPE_CGROUP_SOCK_ADDR;
    Some(match section {
        ProgramSection::SockOps => h(pt::BPF_PROG_TYPE_SOCK_OPS, u32::MAX, "sock_ops", "4.13"),
        ProgramSection::SkLookup => h(
            pt::BPF_PROG_TYPE_SK_LOOKUP,
            at::BPF_SK_LOOKUP as u32,
            "sk_lookup",
            "5.9",
        ),
        ProgramSection::CgroupSockopt { attach_type } => {
            let name = match attach_type {
                O::Get => "cgroup/getsockopt",
                O::Set => "cgroup/setsockopt",
            };
            let t = aya_obj::generated::bpf_attach_type::from(*attach_type) as u32;
            h(pt::BPF_PROG_TYPE_CGROUP_SOCKOPT, t, name, "5.3")
        }
        ProgramSection::CgroupSockAddr { attach_type } => {
            let (name, since) = match attach_type {
                A::Bind4 => ("cgroup/bind4", "4.17"),
                A::Bind6 => ("cgroup/bind6", "4.17"),
                A::Connect4 => ("cgroup/connect4", "4.17"),
                A::Connect6 => ("cgroup/connect6", "4.17"),
                A::UDPSendMsg4 => ("cgroup/sendmsg4", "4.18"),
                A::UDPSendMsg6 => ("cgroup/sendmsg6", "4.18"),
                A::UDPRecvMsg4 => ("cgroup/recvmsg4", "5.2"),
                A::UDPRecvMsg6 => ("cgroup/recvmsg6", "5.2"),
                A::GetPeerName4 => ("cgroup/getpeername4", "5.8"),
                A::GetPeerName6 => ("cgroup/getpeername6", "5.8"),
                A::GetSockName4 => ("cgroup/getsockname4", "5.8"),
                A::GetSockName6 => ("cgroup/getsockname6", "5.8"),
            };
            let t = aya_obj::generated::bpf_attach_type::from(*attach_type) as u32;
            h(sa, t, name, since)
        }
        _ => return None,
    })
}

/// When a helper became available to a program type, where the kernel's history says so
/// plainly. Helpers not listed here are still probed; their message just has no version.
fn helper_since(prog_type: u32, helper: u32) -> Option<&'static str> {
    const NETNS_COOKIE: u32 = bpf_func_id::BPF_FUNC_get_netns_cookie as u32;
    const ANCESTOR: u32 = bpf_func_id::BPF_FUNC_get_current_ancestor_cgroup_id as u32;
    const SK_ASSIGN: u32 = bpf_func_id::BPF_FUNC_sk_assign as u32;
    let sock_ops = pt::BPF_PROG_TYPE_SOCK_OPS as u32;
    let sockopt = pt::BPF_PROG_TYPE_CGROUP_SOCKOPT as u32;
    let sock_addr = pt::BPF_PROG_TYPE_CGROUP_SOCK_ADDR as u32;
    let sk_lookup = pt::BPF_PROG_TYPE_SK_LOOKUP as u32;
    match (prog_type, helper) {
        (t, NETNS_COOKIE) if t == sock_ops || t == sockopt => Some("5.15"),
        (t, NETNS_COOKIE | ANCESTOR) if t == sock_addr => Some("5.7"),
        (t, SK_ASSIGN) if t == sk_lookup => Some("5.9"),
        _ => None,
    }
}

fn prog_type_name(prog_type: u32) -> &'static str {
    match prog_type {
        t if t == pt::BPF_PROG_TYPE_SOCK_OPS as u32 => "sock_ops",
        t if t == pt::BPF_PROG_TYPE_CGROUP_SOCKOPT as u32 => "cgroup sockopt",
        t if t == pt::BPF_PROG_TYPE_CGROUP_SOCK_ADDR as u32 => "cgroup sock_addr",
        t if t == pt::BPF_PROG_TYPE_SK_LOOKUP as u32 => "sk_lookup",
        _ => "these",
    }
}

/// `bpf_get_netns_cookie` for helper 122.
fn helper_name(helper: u32) -> String {
    if helper > 0 && helper < bpf_func_id::__BPF_FUNC_MAX_ID as u32 {
        // SAFETY: bpf_func_id is a #[repr(u32)] enum with every value from 0 to
        // __BPF_FUNC_MAX_ID, and `helper` is in that range.
        let id: bpf_func_id = unsafe { std::mem::transmute(helper) };
        let name = format!("{id:?}");
        if let Some(short) = name.strip_prefix("BPF_FUNC_") {
            return format!("bpf_{short}");
        }
    }
    format!("helper #{helper}")
}

/// The helper ids a program calls: `call imm` instructions with src_reg 0 (1 is a call to a
/// subprogram, 2 a kfunc), in the program's function and any subprogram of its section.
fn helpers_of(obj: &Object, section_index: usize) -> BTreeSet<u32> {
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    obj.functions
        .iter()
        .filter(|((s, _), _)| *s == section_index)
        .flat_map(|(_, f)| f.instructions.iter())
        .filter(|i| i.code == CALL && i.src_reg() == 0)
        .map(|i| i.imm as u32)
        .collect()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Checks that the running kernel has every hook and helper that `programs` (function names in
/// the object) need.
pub fn check(object: &[u8], programs: &[&str]) -> Result<(), ProbeError> {
    let obj = Object::parse(object)?;
    let kernel = kernel_release();
    for &name in programs {
        let prog = obj
            .programs
            .get(name)
            .ok_or_else(|| ProbeError::NoProgram(name.into()))?;
        let Some(hook) = hook(&prog.section) else {
            continue;
        };
        let missing = |feature: String, since: Option<&str>| MissingFeature {
            kernel: kernel.clone(),
            feature,
            program: name.into(),
            since: since.map_or_else(String::new, |v| format!(", added in Linux {v}")),
        };
        // r0 = 1; exit: loads wherever the hook exists.
        const TRIVIAL: [u64; 2] = [insn(0xb7, 1), insn(0x95, 0)];
        match load(hook, &TRIVIAL) {
            Ok(_) => {}
            Err((e, _)) if e.raw_os_error() == Some(libc::EINVAL) => {
                let what = format!("{} programs", hook.name);
                return Err(missing(what, Some(hook.since)).into());
            }
            Err((source, _)) => {
                return Err(ProbeError::Syscall {
                    what: hook.name.into(),
                    source,
                });
            }
        }
        for helper in helpers_of(&obj, prog.section_index) {
            // call helper; exit. The verifier rejects it either way (arguments unset, return
            // value out of range); what matters is whether it knew the helper.
            let insns = [insn(0x85, helper as i32), insn(0x95, 0)];
            let log = match load(hook, &insns) {
                Ok(_) => continue,
                Err((_, log)) => log,
            };
            const UNKNOWN: [&str; 3] = [
                "unknown func ",
                "invalid func ",
                "program of this type cannot use helper ",
            ];
            if UNKNOWN.iter().any(|m| log.contains(m)) {
                let feature = format!(
                    "helper {} in {} programs",
                    helper_name(helper),
                    prog_type_name(hook.prog_type)
                );
                return Err(missing(feature, helper_since(hook.prog_type, helper)).into());
            }
        }
    }
    Ok(())
}

/// The offset of `ingress_ifindex` in `struct bpf_sk_lookup` (include/uapi/linux/bpf.h: an 8-byte
/// socket/cookie union, family, protocol, remote_ip4, remote_ip6[4], remote_port with 2 bytes of
/// padding, local_ip4, local_ip6[4], local_port, then ingress_ifindex).
const SK_LOOKUP_INGRESS_IFINDEX: u32 = 64;

/// Loads the sk_lookup program exactly as a netns link runs it, with a non-zero netns cookie,
/// and returns the verifier's refusal as [`InboundUnsupported`]. The helper probes of
/// [`check`] cannot see a missing *context field*, and the loader's own instance (cookie 0)
/// does not either: the verifier drops the code behind `if cookie == 0 { return }` as dead
/// before it checks its context reads, so 5.15 and 5.16 (no `ingress_ifindex`) load that
/// instance and then refuse every per-netns one. Nothing is pinned: the object's maps are
/// created unpinned, at one entry where the map type allows it, and freed on return.
pub fn check_inbound(object: &[u8]) -> Result<(), ProbeError> {
    use aya_obj::generated::bpf_map_type as mt;
    use redirect_common::inbound::SK_LOOKUP_PROGRAM;
    let obj = Object::parse(object)?;
    let mut loader = aya::EbpfLoader::new();
    // The verifier does not look at a map's size; the probe need not allocate the real ones.
    let shrinkable = [
        mt::BPF_MAP_TYPE_HASH,
        mt::BPF_MAP_TYPE_LRU_HASH,
        mt::BPF_MAP_TYPE_LPM_TRIE,
        mt::BPF_MAP_TYPE_SOCKHASH,
    ]
    .map(|t| t as u32);
    for (name, map) in &obj.maps {
        if shrinkable.contains(&map.map_type()) {
            loader.map_max_entries(name, 1);
        }
    }
    // Any non-zero value: the code behind the cookie test must be live for the verifier.
    let cookie = u64::MAX;
    loader.override_global("INBOUND_NETNS_COOKIE", &cookie, true);
    let unsupported = |feature: String, since: &str| InboundUnsupported {
        kernel: kernel_release(),
        feature,
        program: SK_LOOKUP_PROGRAM.into(),
        since: since.into(),
    };
    let mut ebpf = match loader.load(object) {
        Ok(e) => e,
        Err(e) => {
            return Err(unsupported(
                format!("what the sk_lookup program needs (loading its object: {e})"),
                "",
            )
            .into());
        }
    };
    let prog: &mut aya::programs::SkLookup = ebpf
        .program_mut(SK_LOOKUP_PROGRAM)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| ProbeError::NoProgram(SK_LOOKUP_PROGRAM.into()))?;
    let Err(e) = prog.load() else {
        return Ok(());
    };
    let log = match &e {
        aya::programs::ProgramError::LoadError { verifier_log, .. } => verifier_log.to_string(),
        other => other.to_string(),
    };
    let ifindex = format!("invalid bpf_context access off={SK_LOOKUP_INGRESS_IFINDEX} ");
    Err(if log.contains(&ifindex) {
        unsupported(
            "the sk_lookup context field ingress_ifindex".into(),
            ", added in Linux 5.17",
        )
    } else {
        // Another refusal: still no inbound on this kernel. Its telling line (the last one
        // that is not the verifier's statistics) keeps the message to one line.
        let why = log
            .lines()
            .map(str::trim)
            .rfind(|l| {
                !l.is_empty() && !l.starts_with("processed ") && !l.starts_with("verification time")
            })
            .unwrap_or("rejected")
            .to_string();
        unsupported(
            format!("what the sk_lookup program needs (the verifier: {why})"),
            "",
        )
    }
    .into())
}

/// One eBPF instruction with dst_reg = src_reg = 0 and off = 0, in its 8-byte wire form.
const fn insn(code: u8, imm: i32) -> u64 {
    (code as u64) | ((imm as u32 as u64) << 32)
}

/// The BPF_PROG_LOAD prefix of `union bpf_attr` up to expected_attach_type (kernel ≥ 4.17).
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Loads a probe program; on failure returns the error and the verifier log.
fn load(hook: Hook, insns: &[u64]) -> Result<OwnedFd, (io::Error, String)> {
    let mut log = vec![0u8; 4096];
    let license = c"GPL";
    let mut attr = ProgLoad {
        prog_type: hook.prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        prog_ifindex: 0,
        expected_attach_type: if hook.attach_type == u32::MAX {
            0
        } else {
            hook.attach_type
        },
    };
    const BPF_PROG_LOAD: libc::c_long = 5;
    // SAFETY: `attr` is a fully initialised bpf_attr prefix; the pointers in it (instructions,
    // licence, log buffer) outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            (&mut attr as *mut ProgLoad).cast::<libc::c_void>(),
            std::mem::size_of::<ProgLoad>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a fresh program fd that nothing else owns; dropping it unloads the probe.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let err = io::Error::last_os_error();
    let text = CStr::from_bytes_until_nul(&log)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    Err((err, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_names_follow_the_kernel_docs() {
        assert_eq!(helper_name(122), "bpf_get_netns_cookie");
        assert_eq!(helper_name(123), "bpf_get_current_ancestor_cgroup_id");
        assert_eq!(helper_name(100_000), "helper #100000");
    }

    #[test]
    fn the_message_is_one_line_naming_feature_and_minimum() {
        let e = MissingFeature {
            kernel: "5.10.0-32-cloud-amd64".into(),
            feature: "helper bpf_get_netns_cookie in sock_ops programs".into(),
            program: "redirect_sockops".into(),
            since: ", added in Linux 5.15".into(),
        };
        let s = e.to_string();
        assert!(!s.contains('\n'));
        assert_eq!(
            s,
            "kernel 5.10.0-32-cloud-amd64 lacks helper bpf_get_netns_cookie in sock_ops programs \
             (needed by redirect_sockops, added in Linux 5.15); redirect needs Linux 5.15 or later"
        );
    }

    #[test]
    fn the_inbound_message_names_the_field_the_minimum_and_the_flag() {
        let e = InboundUnsupported {
            kernel: "5.15.0-1072-kvm".into(),
            feature: "the sk_lookup context field ingress_ifindex".into(),
            program: "redirect_sk_lookup".into(),
            since: ", added in Linux 5.17".into(),
        };
        let s = e.to_string();
        assert!(!s.contains('\n'));
        assert_eq!(
            s,
            "kernel 5.15.0-1072-kvm lacks the sk_lookup context field ingress_ifindex (needed by \
             redirect_sk_lookup for inbound interception, added in Linux 5.17); run with \
             --inbound=false for outbound interception only, or use Linux 5.17 or later"
        );
    }

    /// This machine's kernel (6.18) has every field: the probe of the real object passes.
    #[test]
    fn the_inbound_program_loads_with_a_cookie_on_this_kernel() {
        if super::super::loader::OBJECT.is_empty() {
            panic!("built with AYA_BUILD_SKIP=1: no eBPF object to probe");
        }
        check_inbound(super::super::loader::OBJECT).unwrap();
    }
}
