//! Address forms shared by the programs: every record holds addresses in IPv6 form (IPv4
//! v4-mapped), and context fields are read and written one 4-byte word at a constant offset,
//! the only access the verifier accepts for them.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::bindings::bpf_sock_addr;

/// ::ffff:a.b.c.d
#[inline(always)]
pub fn mapped(ip: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip[0], ip[1], ip[2], ip[3],
    ]
}

#[inline(always)]
pub fn words_to_ip6(w: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    out
}

/// Reads a `[u32; 4]` IPv6 address field of a context or socket pointer as four independent
/// 4-byte loads at constant offsets: the verifier rejects wider loads, and loads through a
/// computed pointer (which a loop or a field chosen at run time turns into).
macro_rules! read_ip6 {
    ($ptr:expr, $field:ident) => {{
        let w = unsafe {
            [
                core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field[0])),
                core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field[1])),
                core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field[2])),
                core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field[3])),
            ]
        };
        $crate::addr::words_to_ip6(w)
    }};
}
pub(crate) use read_ip6;

/// The destination (or peer) of a sock_addr context, IPv4 as it is.
#[inline(always)]
pub fn ctx_ip4(sa: *mut bpf_sock_addr) -> [u8; 4] {
    unsafe { read_volatile(addr_of!((*sa).user_ip4)) }.to_ne_bytes()
}

#[inline(always)]
pub fn ctx_ip6(sa: *mut bpf_sock_addr) -> [u8; 16] {
    read_ip6!(sa, user_ip6)
}

#[inline(always)]
pub fn set_ctx_ip4(sa: *mut bpf_sock_addr, ip: [u8; 4]) {
    unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), u32::from_ne_bytes(ip)) };
}

/// One 4-byte store per word, at constant offsets.
#[inline(always)]
pub fn set_ctx_ip6(sa: *mut bpf_sock_addr, ip: &[u8; 16]) {
    let w = |i: usize| u32::from_ne_bytes([ip[i * 4], ip[i * 4 + 1], ip[i * 4 + 2], ip[i * 4 + 3]]);
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), w(0));
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), w(1));
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), w(2));
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), w(3));
    }
}

/// Big-endian port of the context (`user_port` holds it in the low 16 bits, network order).
#[inline(always)]
pub fn ctx_port(sa: *mut bpf_sock_addr) -> [u8; 2] {
    (unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16).to_ne_bytes()
}

#[inline(always)]
pub fn set_ctx_port(sa: *mut bpf_sock_addr, port_be: [u8; 2]) {
    unsafe {
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u16::from_ne_bytes(port_be) as u32,
        )
    };
}
