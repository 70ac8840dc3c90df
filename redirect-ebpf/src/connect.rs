//! cgroup/connect4 and cgroup/connect6: decide at connect() time whether a TCP connection goes to
//! the proxy, in exactly the order of istio-iptables (docs/architecture.md). The order itself is
//! `redirect_common::decide::decide_outbound`, shared with `explain` and the property tests; this
//! file only reads the context, answers the lookups and rewrites the address.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{bindings::bpf_sock_addr, macros::cgroup_sock_addr, programs::SockAddrContext};
use redirect_common::{
    Decision, Policy,
    decide::{Dest, decide_outbound, layered},
    flags,
};

use crate::{
    addr::{ctx_ip4, ctx_ip6, ctx_port, mapped, set_ctx_ip4, set_ctx_ip6, set_ctx_port},
    maps::{CIDR_V4, CIDR_V6, PORTS, addr_rule, count, count_workload, port_rule},
};

/// Returning 1 lets the connect() proceed (with whatever address we wrote).
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, true)
}

/// Both programs; `v6` is a constant in each, so each keeps only its own family's context
/// accesses (the verifier sees no access chosen at run time).
#[inline(always)]
fn connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    // DNS capture (port 53, UDP and TCP) decides before the TCP order; see dns.rs.
    if crate::dns::connect(ctx, v6) {
        return ALLOW;
    }
    let Some((policy, is_proxy, workload)) = workload(sa) else {
        return ALLOW;
    };
    if v6 {
        // ::ffff:a.b.c.d on an AF_INET6 socket is an IPv4 connection: the v4 rules decide, and
        // the proxy's v4 address (mapped) is the target, exactly as iptables would see it.
        let ip = ctx_ip6(sa);
        if let Some((target, port)) =
            redirect(sa, &policy, is_proxy, workload, Dest::from_v6(ip), ip)
        {
            set_ctx_ip6(sa, &target);
            set_ctx_port(sa, port);
        }
    } else {
        let ip = ctx_ip4(sa);
        if let Some((target, port)) =
            redirect(sa, &policy, is_proxy, workload, Dest::V4(ip), mapped(ip))
        {
            set_ctx_ip4(sa, [target[12], target[13], target[14], target[15]]);
            set_ctx_port(sa, port);
        }
    }
    ALLOW
}

/// The shared prologue: TCP only, and only from a registered workload (else counted as not in
/// the mesh). Returns the policy, whether the caller is the proxy and the workload's registered
/// cgroup id (its per-pod counters' key).
#[inline(always)]
fn workload(sa: *mut bpf_sock_addr) -> Option<(Policy, bool, u64)> {
    if unsafe { read_volatile(addr_of!((*sa).type_)) } != SOCK_STREAM {
        return None;
    }
    let found = crate::resolve::lookup_policy(sa);
    if found.is_none() {
        count(Decision::NotInMesh);
    }
    found
}

/// Decides, counts and, on redirect, records the original destination (`orig`, its IPv6 form)
/// in the socket's storage. Returns the proxy's address (IPv6 form) and big-endian port to
/// write into the context, or `None` to leave the connect as it is.
#[inline(always)]
fn redirect(
    sa: *mut bpf_sock_addr,
    policy: &Policy,
    is_proxy: bool,
    workload: u64,
    dest: Dest,
    orig: [u8; 16],
) -> Option<([u8; 16], [u8; 2])> {
    let port = ctx_port(sa);
    let id = policy.policy_id.to_be_bytes();
    // The workload's own entries first, then its shared base's (`layered`).
    let base = policy.base_id;
    let step = decide_outbound(
        policy.flags & flags::ENABLED != 0,
        is_proxy,
        &dest,
        || {
            layered(port_rule(&PORTS, id, port), base, |b| {
                port_rule(&PORTS, b.to_be_bytes(), port)
            })
        },
        |dest| {
            layered(addr_rule(&CIDR_V4, &CIDR_V6, id, dest), base, |b| {
                addr_rule(&CIDR_V4, &CIDR_V6, b.to_be_bytes(), dest)
            })
        },
    );
    count_workload(workload, step.decision());
    if !step.redirects() {
        return None;
    }
    let (target, at_proxy_addr) = match dest {
        Dest::V4(a) => (mapped(policy.proxy_addr4), a == policy.proxy_addr4),
        Dest::V6(a) => (policy.proxy_addr6, a == policy.proxy_addr6),
    };
    let proxy_port = policy.proxy_port.to_be_bytes();
    // Already aimed at the proxy (another generation's connect ran first during an upgrade):
    // leave it, or the original destination it recorded would be overwritten with the proxy's.
    if at_proxy_addr && port == proxy_port {
        return None;
    }
    crate::origdst::record(sa, orig, port, matches!(dest, Dest::V4(_)), policy, target);
    Some((target, proxy_port))
}
