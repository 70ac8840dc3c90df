//! cgroup/connect4 and cgroup/connect6: decide at connect() time whether a TCP connection goes to
//! the proxy, in exactly the order of istio-iptables (docs/architecture.md). The order itself is
//! `redirect_common::decide::decide_outbound`, shared with `explain` and the property tests; this
//! file only reads the context, answers the lookups and rewrites the address.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::bpf_sock_addr, btf_maps::lpm_trie::Key,
    helpers::generated::bpf_get_current_ancestor_cgroup_id, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{
    CidrV4Key, CidrV6Key, Decision, MAX_CGROUP_DEPTH, POLICY_ID_BITS, Policy, PortKey,
    decide::{Dest, NO_RULE, OutboundStep, decide_outbound},
    flags,
};

use crate::maps::{CIDR_V4, CIDR_V6, POLICY, PORTS, count};

/// Returning 1 lets the connect() proceed (with whatever address we wrote).
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // DNS capture (port 53, UDP and TCP) decides before the TCP order; see dns.rs.
    if crate::dns::connect4(&ctx) {
        return ALLOW;
    }
    if unsafe { read_volatile(addr_of!((*sa).type_)) } != SOCK_STREAM {
        return ALLOW;
    }
    let Some((policy, is_proxy)) = lookup_policy(sa) else {
        count(Decision::NotInMesh);
        return ALLOW;
    };
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) }.to_ne_bytes();
    let port = (unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16).to_ne_bytes();
    let step = decide(&policy, is_proxy, port, &Dest::V4(ip));
    count(step.decision());
    // Already aimed at the proxy (another generation's connect4 ran first during an upgrade):
    // leave it, or the original destination it recorded would be overwritten with the proxy's.
    let at_proxy = ip == policy.proxy_addr4 && port == policy.proxy_port.to_be_bytes();
    if step.redirects() && !at_proxy {
        crate::origdst::record_v4(sa, ip, port, &policy);
        let mut target = [0u8; 16];
        target[10] = 0xff;
        target[11] = 0xff;
        target[12..].copy_from_slice(&policy.proxy_addr4);
        crate::sockstate::set_peer(sa, target, policy.proxy_port.to_be_bytes());
        unsafe {
            write_volatile(
                addr_of_mut!((*sa).user_ip4),
                u32::from_ne_bytes(policy.proxy_addr4),
            );
            write_volatile(
                addr_of_mut!((*sa).user_port),
                policy.proxy_port.to_be() as u32,
            );
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // DNS capture (port 53, UDP and TCP) decides before the TCP order; see dns.rs.
    if crate::dns::connect6(&ctx) {
        return ALLOW;
    }
    if unsafe { read_volatile(addr_of!((*sa).type_)) } != SOCK_STREAM {
        return ALLOW;
    }
    let Some((policy, is_proxy)) = lookup_policy(sa) else {
        count(Decision::NotInMesh);
        return ALLOW;
    };
    let ip = read_ip6(sa);
    let port = (unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16).to_ne_bytes();
    // ::ffff:a.b.c.d on an AF_INET6 socket is an IPv4 connection: the v4 rules decide, and the
    // proxy's v4 address (mapped) is the target, exactly as iptables would see it.
    let dest = Dest::from_v6(ip);
    let step = decide(&policy, is_proxy, port, &dest);
    count(step.decision());
    // Already aimed at the proxy (see connect4).
    let at_proxy = port == policy.proxy_port.to_be_bytes()
        && match &dest {
            Dest::V4(a) => *a == policy.proxy_addr4,
            Dest::V6(a) => *a == policy.proxy_addr6,
        };
    if step.redirects() && !at_proxy {
        crate::origdst::record_v6(sa, ip, port, &policy);
        let target = match dest {
            Dest::V4(_) => {
                let mut t = [0u8; 16];
                t[10] = 0xff;
                t[11] = 0xff;
                t[12..].copy_from_slice(&policy.proxy_addr4);
                t
            }
            Dest::V6(_) => policy.proxy_addr6,
        };
        write_ip6(sa, &target);
        crate::sockstate::set_peer(sa, target, policy.proxy_port.to_be_bytes());
        unsafe {
            write_volatile(
                addr_of_mut!((*sa).user_port),
                policy.proxy_port.to_be() as u32,
            )
        };
    }
    ALLOW
}

/// Walks from the root's first level down to the current cgroup and keeps the deepest registered
/// one, so a container cgroup created after its pod was registered is covered with no agent
/// action. Also reports whether the caller sits in (or below) the proxy container's cgroup.
///
/// The record is copied to the stack: POLICY is a preallocated hash, and an update of the same
/// key may recycle the slot a pointer refers to while this program still reads it.
///
/// The proxy uid is compared with the socket's owner (its creator, recorded at sock_create),
/// as iptables' `--uid-owner` does, not with whoever calls connect().
#[inline(always)]
pub(crate) fn lookup_policy(sa: *mut bpf_sock_addr) -> Option<(Policy, bool)> {
    let mut found: Option<Policy> = None;
    let mut in_proxy_cgroup = false;
    for level in 1..=MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        if let Some(p) = POLICY.get_ptr(id) {
            // A deeper registration wins; a proxy match above it belonged to another policy.
            found = Some(unsafe { core::ptr::read_volatile(p) });
            in_proxy_cgroup = false;
        } else if let Some(p) = &found
            && p.flags & flags::HAS_PROXY_CGROUP != 0
            && p.proxy_cgroup == id
        {
            in_proxy_cgroup = true;
        }
    }
    let policy = found?;
    let is_proxy = in_proxy_cgroup
        || (policy.flags & flags::HAS_PROXY_UID != 0
            && crate::sockstate::owner_uid(sa) == policy.proxy_uid);
    Some((policy, is_proxy))
}

/// The shared decision, with this workload's trie lookups.
#[inline(always)]
fn decide(policy: &Policy, is_proxy: bool, port: [u8; 2], dest: &Dest) -> OutboundStep {
    let id = policy.policy_id.to_be_bytes();
    decide_outbound(
        policy.flags & flags::ENABLED != 0,
        is_proxy,
        dest,
        || port_rule(id, port),
        |dest| cidr_rule(id, dest),
    )
}

#[inline(always)]
fn port_rule(policy_id: [u8; 4], port: [u8; 2]) -> u32 {
    let key = Key::new(
        POLICY_ID_BITS + 16,
        PortKey {
            policy_id,
            port,
            _pad: [0; 2],
        },
    );
    PORTS.get(&key).map_or(NO_RULE, |r| r.action)
}

#[inline(always)]
fn cidr_rule(policy_id: [u8; 4], dest: &Dest) -> u32 {
    match *dest {
        Dest::V4(addr) => {
            let key = Key::new(POLICY_ID_BITS + 32, CidrV4Key { policy_id, addr });
            CIDR_V4.get(&key).map_or(NO_RULE, |r| r.action)
        }
        Dest::V6(addr) => {
            let key = Key::new(POLICY_ID_BITS + 128, CidrV6Key { policy_id, addr });
            CIDR_V6.get(&key).map_or(NO_RULE, |r| r.action)
        }
    }
}

/// The verifier only accepts 4-byte accesses to `user_ip6`, so read it word by word.
#[inline(always)]
pub(crate) fn read_ip6(sa: *mut bpf_sock_addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    for i in 0..4 {
        let w = unsafe { read_volatile(addr_of!((*sa).user_ip6[i])) };
        out[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    out
}

#[inline(always)]
pub(crate) fn write_ip6(sa: *mut bpf_sock_addr, ip: &[u8; 16]) {
    for i in 0..4 {
        let w = u32::from_ne_bytes([ip[i * 4], ip[i * 4 + 1], ip[i * 4 + 2], ip[i * 4 + 3]]);
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip6[i]), w) };
    }
}
