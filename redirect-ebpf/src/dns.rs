//! DNS capture (DESIGN §2, issue 17): a registered workload's port-53 traffic goes to its proxy's
//! DNS listener (`proxy_addr4/6 : dns_port`, 127.0.0.1:15053 for an Istio or Kuma sidecar).
//!
//! - sendmsg4/6: a UDP datagram sent with an address (`sendto`) is readdressed to the listener;
//! - connect4/6 (called from connect.rs): a UDP connect (glibc's resolver connects) or a TCP
//!   connect (the resolver's fallback for a truncated answer) goes to the listener;
//! - recvmsg4/6: a reply from the listener gets the original server as its source, because
//!   resolvers (glibc's among them) drop answers from an address they did not ask;
//! - getpeername4/6 (from origdst.rs's programs): a connected socket shows the original server.
//!
//! The original server lives in socket-local storage, so it is bounded by the sockets that
//! exist and freed with them: nothing to expire or leak. One record per socket, the last server
//! it addressed; replies are matched by the listener's address and port.
//!
//! Never for the proxy itself (its cgroup or uid), so its upstream queries go out. Excluded
//! CIDRs and ports do not apply (docs/policy.md).
use core::ptr::{addr_of, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    btf_maps::SkStorage,
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use redirect_common::{
    Policy,
    decide::Dest,
    dns::{
        DNS_EVENT_COUNT, DNS_PORT, DnsEvent, DnsOrig, DnsStep, capture_on, decide_dns, dns_flags,
    },
};

use crate::{
    addr::{
        ctx_ip4, ctx_ip6 as read_ip6, ctx_port, mapped, set_ctx_ip4, set_ctx_ip6 as write_ip6,
        set_ctx_port as set_port,
    },
    maps::{bump, counter_array},
    resolve::lookup_policy,
};

/// Socket → the server it addressed and the listener it went to instead.
#[btf_map]
pub static DNS_ORIG: SkStorage<DnsOrig> = SkStorage::new();

counter_array!(
    /// Per-CPU counters, indexed by `DnsEvent`.
    DNS_STATS,
    DNS_EVENT_COUNT
);

/// cgroup sock_addr programs return 1 to let the call proceed.
const OK: i32 = 1;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

#[inline(always)]
fn count(event: DnsEvent) {
    bump(&DNS_STATS, event as u32);
}

/// The policy and decision for a port-53 call of the current task, counted. `None` = leave it.
#[inline(always)]
fn capture_policy(sa: *mut bpf_sock_addr, port: [u8; 2]) -> Option<Policy> {
    if u16::from_be_bytes(port) != DNS_PORT {
        return None;
    }
    let Some((policy, is_proxy, _)) = lookup_policy(sa) else {
        count(DnsEvent::NotInMesh);
        return None;
    };
    let on = capture_on(policy.flags, policy.dns_port);
    match decide_dns(on, is_proxy, DNS_PORT) {
        DnsStep::Captured => Some(policy),
        DnsStep::ProxyCaller => {
            count(DnsEvent::BypassProxy);
            None
        }
        DnsStep::Off => {
            count(DnsEvent::Off);
            None
        }
        DnsStep::NotDns => None,
    }
}

/// Writes the socket's record (created if missing, overwritten if not).
#[inline(always)]
fn remember(ctx: &SockAddrContext, rec: DnsOrig) {
    let mut init = rec;
    let p = unsafe { DNS_ORIG.get_or_insert_ptr_mut(ctx, Some(&mut init)) };
    if p.is_null() {
        count(DnsEvent::StoreFailed);
        return;
    }
    unsafe { write_volatile(p, rec) };
}

#[inline(always)]
fn record(ctx: &SockAddrContext) -> Option<DnsOrig> {
    let p = unsafe { DNS_ORIG.get_ptr_mut(ctx) };
    if p.is_null() {
        None
    } else {
        Some(unsafe { read_volatile(p) })
    }
}

/// Captures a datagram or connect: records and rewrites. True if rewritten. An AF_INET6
/// `::ffff:a.b.c.d` goes to the mapped IPv4 listener. `v6` is a constant in each caller, so each
/// program keeps only its own family's context accesses.
#[inline(always)]
fn capture(ctx: &SockAddrContext, v6: bool) -> bool {
    let sa = ctx.sock_addr;
    let port = ctx_port(sa);
    let Some(policy) = capture_policy(sa, port) else {
        return false;
    };
    let (orig_addr, target_addr, flags) = if v6 {
        let ip = read_ip6(sa);
        match Dest::from_v6(ip) {
            Dest::V4(_) => (ip, mapped(policy.proxy_addr4), dns_flags::V4),
            Dest::V6(_) => (ip, policy.proxy_addr6, 0),
        }
    } else {
        (
            mapped(ctx_ip4(sa)),
            mapped(policy.proxy_addr4),
            dns_flags::V4,
        )
    };
    let target_port = policy.dns_port.to_be_bytes();
    remember(
        ctx,
        DnsOrig {
            orig_addr,
            target_addr,
            orig_port: port,
            target_port,
            flags,
            _pad: 0,
        },
    );
    if v6 {
        write_ip6(sa, &target_addr);
    } else {
        set_ctx_ip4(sa, policy.proxy_addr4);
    }
    set_port(sa, target_port);
    true
}

/// The type of the context's socket, if DNS capture handles it (UDP or TCP).
#[inline(always)]
fn dns_socket(sa: *mut bpf_sock_addr) -> Option<u32> {
    match unsafe { read_volatile(addr_of!((*sa).type_)) } {
        t @ (SOCK_STREAM | SOCK_DGRAM) => Some(t),
        _ => None,
    }
}

/// connect4/6's DNS step: true if the connect was sent to the DNS listener (connect.rs then
/// returns), false to carry on with the TCP order (or leave a UDP connect alone).
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, v6: bool) -> bool {
    let Some(t) = dns_socket(ctx.sock_addr) else {
        return false;
    };
    if !capture(ctx, v6) {
        return false;
    }
    count(connect_event(t));
    true
}

#[inline(always)]
fn connect_event(sock_type: u32) -> DnsEvent {
    if sock_type == SOCK_STREAM {
        DnsEvent::TcpCaptured
    } else {
        DnsEvent::UdpConnectCaptured
    }
}

/// One DNS program: `$step` (capture or restore) for its family and, when it rewrote the
/// address, `$event`.
macro_rules! dns_program {
    ($(#[$doc:meta])* $hook:ident, $name:ident, $step:ident, $v6:literal, $event:ident) => {
        $(#[$doc])*
        #[cgroup_sock_addr($hook)]
        pub fn $name(ctx: SockAddrContext) -> i32 {
            if $step(&ctx, $v6) {
                count(DnsEvent::$event);
            }
            OK
        }
    };
}

dns_program!(sendmsg4, redirect_dns_sendmsg4, capture, false, UdpCaptured);
dns_program!(sendmsg6, redirect_dns_sendmsg6, capture, true, UdpCaptured);
dns_program!(
    /// A reply from the listener: its source becomes the server the socket addressed. The
    /// context holds the datagram's source; anything not from the recorded listener is left
    /// alone.
    recvmsg4,
    redirect_dns_recvmsg4,
    restore,
    false,
    Restored
);
dns_program!(recvmsg6, redirect_dns_recvmsg6, restore, true, Restored);

/// getpeername4/6's DNS step (origdst.rs runs one program per hook for both records): a
/// connected socket's peer (the listener) shows as the original server. True if rewritten.
#[inline(always)]
pub fn peername(ctx: &SockAddrContext, v6: bool) -> bool {
    let done = restore(ctx, v6);
    if done {
        count(DnsEvent::Peername);
    }
    done
}

/// Rewrites an address that is the recorded listener to the recorded server; `v6` as in
/// [`capture`]. An AF_INET context matches only an IPv4 record (addresses v4-mapped).
#[inline(always)]
fn restore(ctx: &SockAddrContext, v6: bool) -> bool {
    let sa = ctx.sock_addr;
    let Some(rec) = record(ctx) else {
        return false;
    };
    let (ip, family_ok) = if v6 {
        (read_ip6(sa), true)
    } else {
        (mapped(ctx_ip4(sa)), rec.flags & dns_flags::V4 != 0)
    };
    if !family_ok || ip != rec.target_addr || ctx_port(sa) != rec.target_port {
        return false;
    }
    if v6 {
        write_ip6(sa, &rec.orig_addr);
    } else {
        let o = &rec.orig_addr;
        set_ctx_ip4(sa, [o[12], o[13], o[14], o[15]]);
    }
    set_port(sa, rec.orig_port);
    true
}
