//! The original destination of redirected connections (docs/architecture.md), so that
//! unmodified proxies work: they ask getsockopt(SO_ORIGINAL_DST) as they would with iptables, and the application's
//! getpeername shows the destination it connected to.
//!
//! A record's life:
//! 1. connect4/6 redirect and call [`record_v4`]/[`record_v6`]: cookie → original destination.
//! 2. sockops, TCP_CONNECT_CB (client): ask for state callbacks, so the close deletes the record.
//! 3. sockops, ACTIVE_ESTABLISHED_CB (client): copy the record to its {netns, 4-tuple}.
//! 4. sockops, PASSIVE_ESTABLISHED_CB (proxy's accepted socket, after 3 since it needs the
//!    client's ACK): if its tuple has a record, ask for state callbacks too.
//! 5. getsockopt on the proxy socket answers from the tuple record; getpeername on the client
//!    socket answers from the cookie record.
//! 6. sockops, STATE_CB → TCP_CLOSE: the client deletes its cookie record, the proxy socket its
//!    tuple record. The tuple record must outlive the client: a short client may be gone before
//!    the proxy even accepts.
use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, copy_nonoverlapping, read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE, bpf_sock, bpf_sock_addr, bpf_sock_ops,
        bpf_sockopt,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sock_ops_cb_flags_set},
    macros::{cgroup_sock_addr, cgroup_sockopt, sock_ops},
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
};
use redirect_common::{
    OrigDst, OrigEvent, OrigTupleKey, Policy, SO_ORIGINAL_DST, flags, orig_flags,
};

use crate::maps::{ORIG_COOKIE, ORIG_TUPLE, orig_count};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const EINVAL: i32 = 22;
/// cgroup sock_addr, sockopt and sockops programs all return 1 for "carry on".
const OK: i32 = 1;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;
/// The smallest PAGE_SIZE Linux runs with: the getsockopt buffer a program sees is capped there.
const MIN_PAGE_SIZE: i32 = 4096;

#[inline(always)]
fn mapped(ip: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip[0], ip[1], ip[2], ip[3],
    ]
}

#[inline(always)]
fn is_mapped(ip: &[u8; 16]) -> bool {
    ip[..10] == [0u8; 10] && ip[10] == 0xff && ip[11] == 0xff
}

/// Called by connect4 right before it rewrites the destination.
#[inline(always)]
pub fn record_v4(sa: *mut bpf_sock_addr, ip: [u8; 4], port: [u8; 2], policy: &Policy) {
    record(sa, mapped(ip), port, orig_flags::V4, policy);
}

/// Called by connect6 right before it rewrites the destination. A v4-mapped destination is an
/// IPv4 connection and is recorded as such.
#[inline(always)]
pub fn record_v6(sa: *mut bpf_sock_addr, ip: [u8; 16], port: [u8; 2], policy: &Policy) {
    let v4 = if is_mapped(&ip) { orig_flags::V4 } else { 0 };
    record(sa, ip, port, v4, policy);
}

#[inline(always)]
fn record(sa: *mut bpf_sock_addr, addr: [u8; 16], port: [u8; 2], mut f: u16, policy: &Policy) {
    if policy.flags & flags::MODE_NODE != 0 {
        f |= orig_flags::NODE;
    }
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let rec = OrigDst {
        addr,
        port,
        flags: f,
    };
    if ORIG_COOKIE.insert(cookie, rec, 0).is_ok() {
        orig_count(OrigEvent::Recorded);
    } else {
        orig_count(OrigEvent::RecordFailed);
    }
}

#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    match unsafe { read_volatile(addr_of!((*ops).op)) } {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ops),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(ops),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(ops),
        BPF_SOCK_OPS_TCP_LISTEN_CB => crate::inbound::on_listen(ops),
        BPF_SOCK_OPS_STATE_CB => {
            let new_state = unsafe { read_volatile(addr_of!((*ops).__bindgen_anon_1.args[1])) };
            if new_state == BPF_TCP_CLOSE {
                on_close(ops);
            }
        }
        _ => {}
    }
    // The reply field is left alone, which the kernel reads as "no opinion" for every op.
    OK as u32
}

/// Adds the state callback to whatever flags the socket already has (other sockops programs
/// may have set their own).
#[inline(always)]
fn want_close_callback(ops: *mut bpf_sock_ops) {
    let current = unsafe { read_volatile(addr_of!((*ops).bpf_sock_ops_cb_flags)) };
    unsafe { bpf_sock_ops_cb_flags_set(ops, (current | BPF_SOCK_OPS_STATE_CB_FLAG) as i32) };
}

#[inline(always)]
fn on_connect(ops: *mut bpf_sock_ops) {
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    if ORIG_COOKIE.get_ptr(cookie).is_some() {
        want_close_callback(ops);
    }
}

#[inline(always)]
fn on_active_established(ops: *mut bpf_sock_ops) {
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    let Some(rec) = ORIG_COOKIE.get_ptr(cookie) else {
        return;
    };
    let rec = unsafe { *rec };
    let netns = if rec.flags & orig_flags::NODE != 0 {
        0
    } else {
        unsafe { bpf_get_netns_cookie(ops.cast()) }
    };
    let key = OrigTupleKey {
        netns,
        src: ops_local_addr(ops),
        dst: ops_remote_addr(ops),
        sport: ops_local_port(ops),
        dport: ops_remote_port(ops),
        _pad: [0; 4],
    };
    if ORIG_TUPLE.insert(key, rec, 0).is_ok() {
        orig_count(OrigEvent::Established);
    }
}

/// The proxy-side key: the accepted socket's peer is the client.
#[inline(always)]
fn passive_key(ops: *mut bpf_sock_ops) -> OrigTupleKey {
    OrigTupleKey {
        netns: unsafe { bpf_get_netns_cookie(ops.cast()) },
        src: ops_remote_addr(ops),
        dst: ops_local_addr(ops),
        sport: ops_remote_port(ops),
        dport: ops_local_port(ops),
        _pad: [0; 4],
    }
}

#[inline(always)]
fn on_passive_established(ops: *mut bpf_sock_ops) {
    let mut key = passive_key(ops);
    if ORIG_TUPLE.get_ptr(key).is_none() {
        key.netns = 0;
        if ORIG_TUPLE.get_ptr(key).is_none() {
            return;
        }
    }
    orig_count(OrigEvent::Accepted);
    want_close_callback(ops);
}

#[inline(always)]
fn on_close(ops: *mut bpf_sock_ops) {
    // Sockets get here because they asked (redirected clients, proxy sockets with a record) or
    // because another sockops program asked. Either way the deletes only hit their own records:
    // a cookie record belongs to its socket, and the socket whose reversed 4-tuple (in its
    // netns) has a record is that record's proxy socket, since a tuple is unique in a netns.
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    if ORIG_COOKIE.remove(cookie).is_ok() {
        orig_count(OrigEvent::ClientClosed);
        return;
    }
    // Same lookup order as on_passive_established, so the record it found is the one removed.
    let mut key = passive_key(ops);
    if ORIG_TUPLE.remove(key).is_ok() {
        orig_count(OrigEvent::ProxyClosed);
        return;
    }
    key.netns = 0;
    if ORIG_TUPLE.remove(key).is_ok() {
        orig_count(OrigEvent::ProxyClosed);
    }
}

/// Reads a `[u32; 4]` IPv6 address field of a context or socket pointer as four independent
/// 4-byte loads at constant offsets: the verifier rejects wider loads, and loads through a
/// computed pointer (which a loop or a field chosen at run time turns into).
macro_rules! read_ip6 {
    ($ptr:expr, $field:ident) => {{
        let w = unsafe {
            [
                read_volatile(addr_of!((*$ptr).$field[0])),
                read_volatile(addr_of!((*$ptr).$field[1])),
                read_volatile(addr_of!((*$ptr).$field[2])),
                read_volatile(addr_of!((*$ptr).$field[3])),
            ]
        };
        words_to_ip6(w)
    }};
}

#[inline(always)]
fn words_to_ip6(w: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    out
}

/// An address in IPv6 form: the IPv4 one v4-mapped on an AF_INET socket.
///
/// Callers read both fields unconditionally and only choose the value here: with a load in
/// each branch, LLVM merges the two loads into one through a pointer chosen at run time,
/// which the verifier rejects for context and socket pointers ("modified ctx ptr").
#[inline(always)]
fn pick(v4: bool, ip4: u32, ip6: [u8; 16]) -> [u8; 16] {
    if v4 { mapped(ip4.to_ne_bytes()) } else { ip6 }
}

#[inline(always)]
fn ops_is_v4(ops: *mut bpf_sock_ops) -> bool {
    unsafe { read_volatile(addr_of!((*ops).family)) == AF_INET }
}

/// Local address of a sockops socket in IPv6 form.
#[inline(always)]
fn ops_local_addr(ops: *mut bpf_sock_ops) -> [u8; 16] {
    let ip4 = unsafe { read_volatile(addr_of!((*ops).local_ip4)) };
    pick(ops_is_v4(ops), ip4, read_ip6!(ops, local_ip6))
}

/// Remote address of a sockops socket in IPv6 form.
#[inline(always)]
fn ops_remote_addr(ops: *mut bpf_sock_ops) -> [u8; 16] {
    let ip4 = unsafe { read_volatile(addr_of!((*ops).remote_ip4)) };
    pick(ops_is_v4(ops), ip4, read_ip6!(ops, remote_ip6))
}

/// `local_port` is in host byte order.
#[inline(always)]
fn ops_local_port(ops: *mut bpf_sock_ops) -> [u8; 2] {
    (unsafe { read_volatile(addr_of!((*ops).local_port)) } as u16).to_be_bytes()
}

/// `remote_port` is the big-endian 16-bit port in the upper half of a big-endian u32.
#[inline(always)]
fn ops_remote_port(ops: *mut bpf_sock_ops) -> [u8; 2] {
    (u32::from_be(unsafe { read_volatile(addr_of!((*ops).remote_port)) }) as u16).to_be_bytes()
}

/// Answers SO_ORIGINAL_DST (SOL_IP, sockaddr_in) and IP6T_SO_ORIGINAL_DST (SOL_IPV6,
/// sockaddr_in6) on a proxy's accepted socket. The kernel has already run its own getsockopt;
/// anything that is not one of those two calls on a socket with a record returns without
/// touching the context, so the kernel's result, optlen and buffer reach the caller unchanged.
///
/// Answers follow netfilter (same structures, EINVAL for a buffer shorter than the address,
/// nothing past the address written) with two deliberate differences: optlen becomes the
/// address's size (netfilter leaves the caller's), and an IPv4 connection on an AF_INET6 socket
/// also answers IP6T_SO_ORIGINAL_DST, v4-mapped, as that socket family expects (netfilter has
/// no IPv6 entry for it and says ENOENT). An IPv6 destination carried over IPv4 (node mode with
/// a v4-mapped proxy address) is only expressible as a sockaddr_in6.
#[cgroup_sockopt(getsockopt)]
pub fn redirect_getsockopt(ctx: SockoptContext) -> i32 {
    // Every path that does not answer leaves through pass_through, which keeps the kernel's
    // result intact even for buffers over a page (see there).
    let so = ctx.sockopt;
    if unsafe { read_volatile(addr_of!((*so).optname)) } != SO_ORIGINAL_DST {
        return pass_through(so);
    }
    let want_v6 = match unsafe { read_volatile(addr_of!((*so).level)) } {
        SOL_IP => false,
        SOL_IPV6 => true,
        _ => return pass_through(so),
    };
    let sk = unsafe { read_volatile(addr_of!((*so).__bindgen_anon_1.sk)) };
    if sk.is_null() {
        return pass_through(so);
    }
    let family = unsafe { read_volatile(addr_of!((*sk).family)) };
    // SOL_IPV6 on an AF_INET socket is the kernel's ENOPROTOOPT, as with netfilter.
    if want_v6 && family != AF_INET6 {
        return pass_through(so);
    }
    let mut key = sock_key(sk, family);
    key.netns = unsafe { bpf_get_netns_cookie(ctx.sockopt.cast()) };
    let rec = match ORIG_TUPLE.get_ptr(key) {
        Some(p) => unsafe { *p },
        None => {
            key.netns = 0;
            match ORIG_TUPLE.get_ptr(key) {
                Some(p) => unsafe { *p },
                None => return pass_through(so),
            }
        }
    };
    // An IPv6 destination has no sockaddr_in form (node mode may carry it over IPv4).
    if !want_v6 && rec.flags & orig_flags::V4 == 0 {
        return pass_through(so);
    }

    let start = unsafe { read_volatile(addr_of!((*so).__bindgen_anon_2.optval)) } as usize;
    let end = unsafe { read_volatile(addr_of!((*so).__bindgen_anon_3.optval_end)) } as usize;
    let len = if want_v6 {
        if start + SOCKADDR_IN6_LEN > end {
            // netfilter's answer to a buffer shorter than the address.
            unsafe { write_volatile(addr_of_mut!((*so).retval), -EINVAL) };
            return OK;
        }
        let sa = sockaddr_in6(&rec);
        unsafe { copy_nonoverlapping(sa.as_ptr(), start as *mut u8, SOCKADDR_IN6_LEN) };
        SOCKADDR_IN6_LEN
    } else {
        if start + SOCKADDR_IN_LEN > end {
            unsafe { write_volatile(addr_of_mut!((*so).retval), -EINVAL) };
            return OK;
        }
        let sa = sockaddr_in(&rec);
        unsafe { copy_nonoverlapping(sa.as_ptr(), start as *mut u8, SOCKADDR_IN_LEN) };
        SOCKADDR_IN_LEN
    };
    // One field per store: LLVM would otherwise merge optlen and retval into one 8-byte store,
    // which the verifier rejects. optlen is the address's size, so exactly the address is copied
    // to the caller and the rest of its buffer is left as it was.
    unsafe {
        write_volatile(addr_of_mut!((*so).optlen), len as i32);
        write_volatile(addr_of_mut!((*so).retval), 0);
    }
    orig_count(OrigEvent::Answered);
    OK
}

/// Hands the kernel's own getsockopt result to the caller untouched. The program sees at most
/// PAGE_SIZE bytes of the buffer; when optlen is larger, the kernel doc ("Large optval") requires
/// the program to set it to 0, meaning "use the kernel's buffer and length as they are". Kernels
/// without the later fallback (5.10, for one) fail such calls with EFAULT otherwise: every
/// getsockopt with a buffer over 4 KiB under the attached cgroup (SO_PEERGROUPS, unknown options,
/// SO_ORIGINAL_DST on an unredirected socket). Up to a page, the program's copy is the kernel's
/// result and is left alone. 4096 is the smallest page size; a bigger page only means optlen 0
/// is set where it was not required, which still means "unchanged".
#[inline(always)]
fn pass_through(so: *mut bpf_sockopt) -> i32 {
    if unsafe { read_volatile(addr_of!((*so).optlen)) } > MIN_PAGE_SIZE {
        unsafe { write_volatile(addr_of_mut!((*so).optlen), 0) };
    }
    OK
}

/// The tuple key of an accepted socket (netns left 0 for the caller): its peer is the client.
#[inline(always)]
fn sock_key(sk: *mut bpf_sock, family: u32) -> OrigTupleKey {
    let v4 = family == AF_INET;
    let peer4 = unsafe { read_volatile(addr_of!((*sk).dst_ip4)) };
    let local4 = unsafe { read_volatile(addr_of!((*sk).src_ip4)) };
    let src = pick(v4, peer4, read_ip6!(sk, dst_ip6));
    let dst = pick(v4, local4, read_ip6!(sk, src_ip6));
    // src_port is in host byte order, dst_port in network byte order.
    let local_port = unsafe { read_volatile(addr_of!((*sk).src_port)) } as u16;
    let peer_port = unsafe { read_volatile(addr_of!((*sk).dst_port)) };
    OrigTupleKey {
        netns: 0,
        src,
        dst,
        sport: peer_port.to_ne_bytes(),
        dport: local_port.to_be_bytes(),
        _pad: [0; 4],
    }
}

#[inline(always)]
fn sockaddr_in(rec: &OrigDst) -> [u8; SOCKADDR_IN_LEN] {
    let mut sa = [0u8; SOCKADDR_IN_LEN];
    sa[0..2].copy_from_slice(&(AF_INET as u16).to_ne_bytes());
    sa[2..4].copy_from_slice(&rec.port);
    sa[4..8].copy_from_slice(&rec.addr[12..16]);
    sa
}

/// flowinfo and scope id 0, as netfilter reports for a global address.
#[inline(always)]
fn sockaddr_in6(rec: &OrigDst) -> [u8; SOCKADDR_IN6_LEN] {
    let mut sa = [0u8; SOCKADDR_IN6_LEN];
    sa[0..2].copy_from_slice(&(AF_INET6 as u16).to_ne_bytes());
    sa[2..4].copy_from_slice(&rec.port);
    sa[8..24].copy_from_slice(&rec.addr);
    sa
}

/// The client's getpeername on an AF_INET socket: the original destination, not the proxy.
#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let Some(rec) = cookie_record(sa) else {
        return OK;
    };
    if rec.flags & orig_flags::V4 == 0 {
        return OK;
    }
    // The kernel's answer: only while it is the redirect target is the record this socket's.
    let peer = unsafe { read_volatile(addr_of!((*sa).user_ip4)) }.to_ne_bytes();
    let peer_port = (unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16).to_ne_bytes();
    if !crate::sockstate::peer_is_target(sa, &mapped(peer), peer_port) {
        return OK;
    }
    let ip = [rec.addr[12], rec.addr[13], rec.addr[14], rec.addr[15]];
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip4), u32::from_ne_bytes(ip));
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u16::from_ne_bytes(rec.port) as u32,
        );
    }
    orig_count(OrigEvent::Peername);
    OK
}

/// The client's getpeername on an AF_INET6 socket; an IPv4 destination shows v4-mapped, as the
/// kernel itself reports IPv4 peers of such sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn redirect_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let Some(rec) = cookie_record(sa) else {
        return OK;
    };
    let peer = read_ip6!(sa, user_ip6);
    let peer_port = (unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16).to_ne_bytes();
    if !crate::sockstate::peer_is_target(sa, &peer, peer_port) {
        return OK;
    }
    let a = &rec.addr;
    let word = |i: usize| u32::from_ne_bytes([a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]]);
    // Constant offsets, one 4-byte store each (see read_ip6!).
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), word(0));
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), word(1));
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), word(2));
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), word(3));
    }
    unsafe {
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u16::from_ne_bytes(rec.port) as u32,
        )
    };
    orig_count(OrigEvent::Peername);
    OK
}

#[inline(always)]
fn cookie_record(sa: *mut bpf_sock_addr) -> Option<OrigDst> {
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut c_void) };
    ORIG_COOKIE.get_ptr(cookie).map(|p| unsafe { *p })
}
