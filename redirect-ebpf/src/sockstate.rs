//! Per-socket state in socket-local storage (`SOCK_STATE`): freed by the kernel with the socket,
//! so nothing here can leak or be read for a later socket.
//!
//! - **Owner uid.** iptables' `--uid-owner` matches the socket's owner (the creator's credentials
//!   at socket creation), not the task that calls connect() later. cgroup/sock_create records the
//!   creator's uid for TCP sockets created in a meshed cgroup; connect compares the proxy uid
//!   with it, and only falls back to the calling task's uid for sockets created before the
//!   programs were attached (or outside the mesh and passed in).
//! - **Redirect target.** connect records where it sent a redirected socket (the proxy), so that
//!   getpeername answers from the original-destination record only while the socket's real peer
//!   is that target, as Cilium's reverse translation checks its backend: a socket whose
//!   redirected connect failed early and which then connected elsewhere shows its real peer.
use core::ptr::{self, addr_of, read_volatile};

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock, bpf_sock_addr},
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_uid_gid, bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock},
    programs::SockContext,
};
use redirect_common::{MAX_CGROUP_DEPTH, SockState, flags, sock_state_flags};

use crate::maps::POLICY;

#[btf_map]
pub static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

const OK: i32 = 1;
const SOCK_STREAM: u32 = 1;

#[inline(always)]
fn storage(sk: *mut bpf_sock, create: bool) -> *mut SockState {
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
fn sock_addr_sk(sa: *mut bpf_sock_addr) -> *mut bpf_sock {
    unsafe { read_volatile(addr_of!((*sa).__bindgen_anon_1.sk)) }
}

/// True when the calling task's cgroup (or an ancestor) is a registered workload with a proxy
/// uid: only those sockets need an owner, so other sockets cost no storage.
#[inline(always)]
fn meshed_with_proxy_uid() -> bool {
    let mut found = false;
    for level in 1..=MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        if let Some(p) = POLICY.get_ptr(id) {
            found = unsafe { read_volatile(addr_of!((*p).flags)) } & flags::HAS_PROXY_UID != 0;
        }
    }
    found
}

/// cgroup/sock_create: runs in the creating task, so the current uid is the creator's.
#[cgroup_sock(sock_create)]
pub fn redirect_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    if unsafe { read_volatile(addr_of!((*sk).type_)) } != SOCK_STREAM || !meshed_with_proxy_uid() {
        return OK;
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
        let st = unsafe { read_volatile(st) };
        if st.flags & sock_state_flags::HAS_OWNER != 0 {
            return st.owner_uid;
        }
    }
    unsafe { bpf_get_current_uid_gid() as u32 }
}

/// connect4/6, redirecting: the socket now goes to `addr` (IPv6 form) and `port` (big-endian).
#[inline(always)]
pub fn set_peer(sa: *mut bpf_sock_addr, addr: [u8; 16], port: [u8; 2]) {
    let st = storage(sock_addr_sk(sa), true);
    if !st.is_null() {
        unsafe {
            (*st).peer_addr = addr;
            (*st).peer_port = port;
            (*st).flags |= sock_state_flags::HAS_PEER;
        }
    }
}

/// getpeername: is the socket's real peer still where the redirect sent it? A socket with no
/// recorded target (redirected before this check existed) is trusted, as before.
#[inline(always)]
pub fn peer_is_target(sa: *mut bpf_sock_addr, addr: &[u8; 16], port: [u8; 2]) -> bool {
    let st = storage(sock_addr_sk(sa), false);
    if st.is_null() {
        return true;
    }
    let st = unsafe { read_volatile(st) };
    st.flags & sock_state_flags::HAS_PEER == 0 || (st.peer_addr == *addr && st.peer_port == port)
}
