//! Per-socket state in socket-local storage (`SOCK_STATE`): freed by the kernel with the socket,
//! so nothing here can leak or be read for a later socket.
//!
//! - **Owner uid.** iptables' `--uid-owner` matches the socket's owner (the fsuid of its file,
//!   fixed at socket creation), not the task that calls connect() later. The kernel keeps that
//!   uid in the socket itself (`sk->sk_uid`, set from the socket inode's owner at creation), so
//!   connect reads it there ([`owner_uid`]): no per-socket program, no storage for it.
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
    helpers::generated::{bpf_get_current_uid_gid, bpf_sk_storage_get, bpf_skc_to_tcp_sock},
    macros::btf_map,
};
use redirect_common::SockState;

#[btf_map]
pub static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

/// Byte offset of `sk_uid` in the running kernel's `struct sock` (which starts every
/// `tcp_sock`), read from its BTF by the agent at load time and set here as a read-only global
/// (redirect-agent/src/bpf/kernel_btf.rs). The verifier folds it into a constant, so the load in
/// [`owner_uid`] is checked against the kernel's own type like a field access. 0 (the
/// per-netns loader's instances, which run no connect program) means unknown.
#[unsafe(no_mangle)]
static SK_UID_OFFSET: u32 = 0;

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

/// The uid iptables' `--uid-owner` compares for this connect: the socket's owner
/// (`sk->sk_uid`), read through the BTF pointer `bpf_skc_to_tcp_sock` gives. A socket that is
/// not TCP (MPTCP, or UDP for DNS capture) falls back to the calling task's uid.
#[inline(always)]
pub fn owner_uid(sa: *mut bpf_sock_addr) -> u32 {
    let off = unsafe { read_volatile(&raw const SK_UID_OFFSET) } as usize;
    let sk = sock_addr_sk(sa);
    if off != 0 && !sk.is_null() {
        let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
        if !tp.is_null() {
            return unsafe { read_volatile(tp.cast::<u8>().add(off).cast::<u32>()) };
        }
    }
    unsafe { bpf_get_current_uid_gid() as u32 }
}
