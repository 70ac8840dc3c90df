//! Per-socket state in socket-local storage (`SOCK_STATE`): freed by the kernel with the socket,
//! so nothing here can leak or be read for a later socket.
//!
//! - **Owner uid.** iptables' `--uid-owner` matches the socket's owner (the creator's credentials
//!   at socket creation), not the task that calls connect() later. cgroup/sock_create records the
//!   creator's uid for TCP sockets created in a meshed cgroup with a proxy uid; connect compares
//!   the proxy uid with it, and only falls back to the calling task's uid for sockets created
//!   before the programs were attached (or outside the mesh and passed in).
//! - **Original destination.** A redirected client socket keeps where it meant to go (for
//!   getpeername, and for the hand-off to the proxy's socket) and where the redirect sent it:
//!   getpeername answers only while the socket's real peer is that target, as Cilium's reverse
//!   translation checks its backend, so a socket whose redirected connect failed early and which
//!   then connected elsewhere shows its real peer. The proxy's accepted socket keeps its own copy
//!   of the original destination (for getsockopt(SO_ORIGINAL_DST)); see origdst.rs.
use core::ptr::{self, addr_of, read_volatile};

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock, bpf_sock_addr},
    btf_maps::SkStorage,
    helpers::generated::{bpf_get_current_uid_gid, bpf_sk_storage_get},
    macros::{btf_map, cgroup_sock},
    programs::SockContext,
};
use redirect_common::{SockState, flags, sock_state_flags};

#[btf_map]
pub static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

const OK: i32 = 1;
const SOCK_STREAM: u32 = 1;

/// The socket's state, created (zeroed) if `create` and missing; null if there is none (or the
/// kernel could not allocate it).
#[inline(always)]
pub fn storage(sk: *mut bpf_sock, create: bool) -> *mut SockState {
    if sk.is_null() {
        return ptr::null_mut();
    }
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE as u64
    } else {
        0
    };
    unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&SOCK_STATE).cast_mut().cast(),
            sk.cast(),
            ptr::null_mut(),
            flags,
        )
    }
    .cast()
}

#[inline(always)]
pub fn sock_addr_sk(sa: *mut bpf_sock_addr) -> *mut bpf_sock {
    unsafe { read_volatile(addr_of!((*sa).__bindgen_anon_1.sk)) }
}

/// cgroup/sock_create: runs in the creating task, so the current uid is the creator's. Only
/// sockets of workloads with a proxy uid need an owner, so other sockets cost no storage; the
/// workload comes from the per-cgroup cache, not a walk per socket.
#[cgroup_sock(sock_create)]
pub fn redirect_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    if unsafe { read_volatile(addr_of!((*sk).type_)) } != SOCK_STREAM {
        return OK;
    }
    match crate::resolve::current_workload() {
        Some((p, _, _)) if p.flags & flags::HAS_PROXY_UID != 0 => {}
        _ => return OK,
    }
    let st = storage(sk, true);
    if !st.is_null() {
        unsafe {
            (*st).owner_uid = bpf_get_current_uid_gid() as u32;
            (*st).flags |= sock_state_flags::HAS_OWNER;
        }
    }
    OK
}

/// The uid iptables' `--uid-owner` would compare for this connect: the socket's owner if
/// sock_create saw the socket, else the calling task's uid.
#[inline(always)]
pub fn owner_uid(sa: *mut bpf_sock_addr) -> u32 {
    let st = storage(sock_addr_sk(sa), false);
    if !st.is_null() {
        let (f, uid) = unsafe { (read_volatile(&(*st).flags), read_volatile(&(*st).owner_uid)) };
        if f & sock_state_flags::HAS_OWNER != 0 {
            return uid;
        }
    }
    unsafe { bpf_get_current_uid_gid() as u32 }
}
