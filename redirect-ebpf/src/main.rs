//! Kernel programs of redirect. See docs/architecture.md for the contract.
#![no_std]
#![no_main]

mod addr;
mod connect;
mod dns;
mod inbound;
mod maps;
mod origdst;
mod resolve;
mod sockstate;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible licence: bpf_get_current_ancestor_cgroup_id and friends are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
