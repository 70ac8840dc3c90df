//! The original destination of redirected connections (docs/architecture.md), so that
//! unmodified proxies work: they ask getsockopt(SO_ORIGINAL_DST) as they would with iptables,
//! and the application's getpeername shows the destination it connected to.
//!
//! A record's life (every per-socket copy lives in `SOCK_STATE`, socket-local storage that the
//! kernel frees with the socket: no close callback, nothing to delete, nothing to leak):
//! 1. connect4/6 redirect and call [`record`]: the client socket's own record.
//! 2. sockops, ACTIVE_ESTABLISHED_CB (client): the record is handed off to `ORIG_TUPLE` under
//!    {netns, 4-tuple}, the one thing the proxy's accepted socket can look it up by.
//! 3. sockops, PASSIVE_ESTABLISHED_CB (the proxy's accepted socket, after 2 since it needs the
//!    client's ACK): the hand-off is copied into that socket's own storage and deleted.
//! 4. getsockopt on the proxy socket answers from its copy; getpeername on the client socket
//!    from the client's record.
use core::ptr::{addr_of, addr_of_mut, copy_nonoverlapping, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, bpf_sock, bpf_sock_addr, bpf_sock_ops, bpf_sockopt,
    },
    helpers::generated::bpf_get_netns_cookie,
    macros::{cgroup_sock_addr, cgroup_sockopt, sock_ops},
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
};
use redirect_common::{
    OrigDst, OrigEvent, OrigTupleKey, Policy, SO_ORIGINAL_DST, flags, orig_flags,
    sock_state_flags::{CLIENT_ORIG, HAS_PEER, PROXY_ORIG},
};

use crate::{
    addr::{ctx_ip4, ctx_ip6, ctx_port, mapped, read_ip6, set_ctx_ip4, set_ctx_ip6, set_ctx_port},
    maps::{ORIG_TUPLE, orig_count},
    sockstate::{sock_addr_sk, storage},
};

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

/// Called by connect4/6 right before they rewrite the destination to `target` (the proxy, IPv6
/// form): `addr` (IPv6 form) and `port` (big-endian) are the original destination.
#[inline(always)]
pub fn record(
    sa: *mut bpf_sock_addr,
    addr: [u8; 16],
    port: [u8; 2],
    v4: bool,
    policy: &Policy,
    target: [u8; 16],
) {
    let mut f = if v4 { orig_flags::V4 } else { 0 };
    if policy.flags & flags::MODE_NODE != 0 {
        f |= orig_flags::NODE;
    }
    let st = storage(sock_addr_sk(sa), true);
    if st.is_null() {
        orig_count(OrigEvent::RecordFailed);
        return;
    }
    unsafe {
        (*st).orig = OrigDst {
            addr,
            port,
            flags: f,
        };
        (*st).peer_addr = target;
        (*st).peer_port = policy.proxy_port.to_be_bytes();
        (*st).flags |= HAS_PEER | CLIENT_ORIG;
    }
    orig_count(OrigEvent::Recorded);
}

/// The socket's own original-destination record, if it carries one of the kind `want`
/// (`CLIENT_ORIG` or `PROXY_ORIG`).
#[inline(always)]
fn own_record(sk: *mut bpf_sock, want: u32) -> Option<OrigDst> {
    let st = storage(sk, false);
    if st.is_null() || unsafe { read_volatile(&(*st).flags) } & want == 0 {
        return None;
    }
    Some(unsafe { read_volatile(&(*st).orig) })
}

/// Every op but these three leaves at once: no state callbacks are asked for, so the program
/// runs only for the callbacks every TCP socket gets.
#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    match unsafe { read_volatile(addr_of!((*ops).op)) } {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(ops),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(ops),
        BPF_SOCK_OPS_TCP_LISTEN_CB => crate::inbound::on_listen(ops),
        _ => {}
    }
    // The reply field is left alone, which the kernel reads as "no opinion" for every op.
    OK as u32
}

#[inline(always)]
fn ops_sk(ops: *mut bpf_sock_ops) -> *mut bpf_sock {
    unsafe { read_volatile(addr_of!((*ops).__bindgen_anon_2.sk)) }
}

/// The client is established: hand its record off under the tuple the proxy will see.
#[inline(always)]
fn on_active_established(ops: *mut bpf_sock_ops) {
    let Some(rec) = own_record(ops_sk(ops), CLIENT_ORIG) else {
        return;
    };
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
    } else {
        orig_count(OrigEvent::HandOffFailed);
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

/// The proxy's accepted socket is established: take the hand-off (sidecar key first, then the
/// node-mode one with netns 0) into the socket's own storage. A tuple is unique in a netns, so
/// the record found is this connection's. Should the storage fail, the hand-off stays and
/// getsockopt answers from it (LRU bounds it then).
#[inline(always)]
fn on_passive_established(ops: *mut bpf_sock_ops) {
    let mut key = passive_key(ops);
    let rec = match ORIG_TUPLE.get_ptr(key) {
        Some(p) => unsafe { read_volatile(p) },
        None => {
            key.netns = 0;
            match ORIG_TUPLE.get_ptr(key) {
                Some(p) => unsafe { read_volatile(p) },
                None => return,
            }
        }
    };
    let st = storage(ops_sk(ops), true);
    if st.is_null() {
        orig_count(OrigEvent::AcceptFailed);
        return;
    }
    unsafe {
        (*st).orig = rec;
        (*st).flags |= PROXY_ORIG;
    }
    let _ = ORIG_TUPLE.remove(key);
    orig_count(OrigEvent::Accepted);
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
    let Some(rec) = own_record(sk, PROXY_ORIG).or_else(|| handed_off(so, sk, family)) else {
        return pass_through(so);
    };
    // An IPv6 destination has no sockaddr_in form (node mode may carry it over IPv4).
    if !want_v6 && rec.flags & orig_flags::V4 == 0 {
        return pass_through(so);
    }

    if want_v6 {
        answer(so, sockaddr_in6(&rec))
    } else {
        answer(so, sockaddr_in(&rec))
    }
}

/// Copies the address into the caller's buffer as netfilter would: EINVAL for a buffer shorter
/// than the address, else exactly the address, with optlen set to its size so that the rest of
/// the caller's buffer is left as it was.
#[inline(always)]
fn answer<const N: usize>(so: *mut bpf_sockopt, sa: [u8; N]) -> i32 {
    let start = unsafe { read_volatile(addr_of!((*so).__bindgen_anon_2.optval)) } as usize;
    let end = unsafe { read_volatile(addr_of!((*so).__bindgen_anon_3.optval_end)) } as usize;
    if start + N > end {
        unsafe { write_volatile(addr_of_mut!((*so).retval), -EINVAL) };
        return OK;
    }
    unsafe { copy_nonoverlapping(sa.as_ptr(), start as *mut u8, N) };
    // One field per store: LLVM would otherwise merge optlen and retval into one 8-byte store,
    // which the verifier rejects.
    unsafe {
        write_volatile(addr_of_mut!((*so).optlen), N as i32);
        write_volatile(addr_of_mut!((*so).retval), 0);
    }
    orig_count(OrigEvent::Answered);
    OK
}

/// A hand-off still in `ORIG_TUPLE` for this socket: its copy could not be stored, or it was
/// established before this build's programs ran.
#[inline(always)]
fn handed_off(so: *mut bpf_sockopt, sk: *mut bpf_sock, family: u32) -> Option<OrigDst> {
    let mut key = sock_key(sk, family);
    key.netns = unsafe { bpf_get_netns_cookie(so.cast()) };
    if let Some(p) = ORIG_TUPLE.get_ptr(key) {
        return Some(unsafe { read_volatile(p) });
    }
    key.netns = 0;
    ORIG_TUPLE.get_ptr(key).map(|p| unsafe { read_volatile(p) })
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

/// The client socket's record, if the socket has one and its real peer (`peer`, IPv6 form, and
/// `port`, big-endian: the kernel's answer) is still where the redirect sent it. Sockets with
/// no storage, the common case, return after one helper call.
#[inline(always)]
fn client_record(sa: *mut bpf_sock_addr) -> Option<(OrigDst, [u8; 16], [u8; 2])> {
    let st = storage(sock_addr_sk(sa), false);
    if st.is_null() {
        return None;
    }
    let st = unsafe { read_volatile(st) };
    if st.flags & CLIENT_ORIG == 0 {
        return None;
    }
    Some((st.orig, st.peer_addr, st.peer_port))
}

/// getpeername on an AF_INET socket: a redirected client's original destination, not the
/// proxy; else a DNS-captured socket's original server (dns.rs). One program for both records,
/// so a socket with neither costs one program run and two storage lookups.
#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    if !client_peername4(ctx.sock_addr) {
        crate::dns::peername(&ctx, false);
    }
    OK
}

/// getpeername on an AF_INET6 socket, as [`redirect_getpeername4`].
#[cgroup_sock_addr(getpeername6)]
pub fn redirect_getpeername6(ctx: SockAddrContext) -> i32 {
    if !client_peername6(ctx.sock_addr) {
        crate::dns::peername(&ctx, true);
    }
    OK
}

/// The client's getpeername on an AF_INET socket: the original destination, not the proxy.
#[inline(always)]
fn client_peername4(sa: *mut bpf_sock_addr) -> bool {
    let Some((rec, target, target_port)) = client_record(sa) else {
        return false;
    };
    if rec.flags & orig_flags::V4 == 0
        || mapped(ctx_ip4(sa)) != target
        || ctx_port(sa) != target_port
    {
        return false;
    }
    set_ctx_ip4(sa, [rec.addr[12], rec.addr[13], rec.addr[14], rec.addr[15]]);
    set_ctx_port(sa, rec.port);
    orig_count(OrigEvent::Peername);
    true
}

/// The client's getpeername on an AF_INET6 socket; an IPv4 destination shows v4-mapped, as the
/// kernel itself reports IPv4 peers of such sockets.
#[inline(always)]
fn client_peername6(sa: *mut bpf_sock_addr) -> bool {
    let Some((rec, target, target_port)) = client_record(sa) else {
        return false;
    };
    if ctx_ip6(sa) != target || ctx_port(sa) != target_port {
        return false;
    }
    set_ctx_ip6(sa, &rec.addr);
    set_ctx_port(sa, rec.port);
    orig_count(OrigEvent::Peername);
    true
}
