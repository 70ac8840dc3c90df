//! Inbound interception without NAT (docs/architecture.md, "Inbound"): an sk_lookup program, linked into each
//! meshed pod's network namespace, picks the socket for a new inbound TCP connection: the proxy's
//! inbound listener, or the normal lookup (the app). The order is
//! `redirect_common::decide::decide_inbound`, shared with `explain` and the property test.
//!
//! One instance per netns carries that netns's cookie ([`INBOUND_NETNS_COOKIE`]).
//!
//! The listeners come from sockops `BPF_SOCK_OPS_TCP_LISTEN_CB` ([`on_listen`], called from
//! origdst.rs): every TCP listener of the attached cgroup tree is recorded by {netns cookie, port,
//! family}, so a proxy that listens before the agent writes its netns record is found as well.
//! The SOCKHASH drops a socket's entry by itself when the socket closes.
//!
//! The proxy's accepted socket keeps the original local address (no NAT); a steered connection
//! also gets an `ORIG_TUPLE` hand-off, keyed exactly as the proxy's accepted socket will look it
//! up, so that socket takes it into its own storage at PASSIVE_ESTABLISHED (origdst.rs) and the
//! existing getsockopt program answers SO_ORIGINAL_DST with that address.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{bpf_sk_lookup, bpf_sock_ops, sk_action},
    btf_maps::{HashMap, SockHash},
    helpers::generated::bpf_get_netns_cookie,
    macros::{btf_map, sk_lookup},
    programs::SkLookupContext,
};
use redirect_common::{
    OrigDst, OrigTupleKey,
    decide::{Dest, decide_inbound},
    inbound::{
        INBOUND_COUNTER_COUNT, InboundCounter, InboundRecord, LISTEN_V4, LISTEN_V6, ListenerKey,
        MAX_INBOUND_NETNS, MAX_INBOUND_RULES, MAX_LISTENERS,
    },
    orig_flags,
};

use crate::{
    addr::{mapped, read_ip6},
    maps::{ORIG_TUPLE, addr_rule, bump, counter_array, port_rule, rule_tries},
};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
/// The loopback device has ifindex 1 in every network namespace (LOOPBACK_IFINDEX).
const LOOPBACK_IFINDEX: u32 = 1;
const ENOENT: i32 = 2;

/// Network namespace cookie → the workload's inbound record.
/// The netns this instance is linked into, by its cookie. bpf_get_netns_cookie is not available
/// to sk_lookup programs (6.18's verifier: "program of this type cannot use helper
/// bpf_get_netns_cookie#122"), so the agent loads one instance per netns with the cookie set
/// here as a read-only global (EbpfLoader::set_global). 0 (the loader's own instance, never
/// linked) leaves every lookup alone.
#[unsafe(no_mangle)]
static INBOUND_NETNS_COOKIE: u64 = 0;

#[btf_map]
pub static INBOUND: HashMap<u64, InboundRecord, { MAX_INBOUND_NETNS as usize }> = HashMap::new();

rule_tries!(MAX_INBOUND_RULES;
    /// {inbound policy id, destination port prefix} → exclude/include.
    IN_PORTS,
    /// {inbound policy id, IPv4 source prefix} → exclude.
    IN_SRC_V4,
    /// {inbound policy id, IPv6 source prefix} → exclude.
    IN_SRC_V6
);

/// TCP listeners of the attached cgroup tree.
#[btf_map]
pub static IN_LISTEN: SockHash<ListenerKey, { MAX_LISTENERS as usize }> = SockHash::new();

counter_array!(
    /// Per-CPU counters indexed by `InboundCounter`.
    IN_STATS,
    INBOUND_COUNTER_COUNT
);

#[inline(always)]
fn count(c: InboundCounter) {
    bump(&IN_STATS, c as u32);
}

/// sockops BPF_SOCK_OPS_TCP_LISTEN_CB: record the listener. An existing entry for the same
/// {netns, port, family} (SO_REUSEPORT siblings) is replaced: sk_assign of any member of a
/// reuseport group still balances over the whole group.
#[inline(always)]
pub fn on_listen(ops: *mut bpf_sock_ops) {
    let family = unsafe { read_volatile(addr_of!((*ops).family)) };
    let port = unsafe { read_volatile(addr_of!((*ops).local_port)) } as u16;
    let mut key = ListenerKey {
        netns: unsafe { bpf_get_netns_cookie(ops.cast()) },
        port,
        family: if family == AF_INET {
            LISTEN_V4
        } else {
            LISTEN_V6
        },
        _pad: 0,
    };
    match IN_LISTEN.update(&mut key, unsafe { &mut *ops }, 0) {
        Ok(()) => count(InboundCounter::ListenerAdded),
        Err(_) => count(InboundCounter::ListenerFailed),
    }
}

/// One context read per field, each at a constant offset (the verifier rejects reads through a
/// pointer chosen at run time); the family only picks among values already read.
struct Lookup {
    v4: bool,
    ifindex: u32,
    remote4: [u8; 4],
    remote6: [u8; 16],
    local4: [u8; 4],
    local6: [u8; 16],
    /// Big-endian bytes.
    remote_port: [u8; 2],
    local_port: u16,
}

#[inline(always)]
fn read(c: *mut bpf_sk_lookup) -> Lookup {
    let remote6 = read_ip6!(c, remote_ip6);
    let local6 = read_ip6!(c, local_ip6);
    unsafe {
        Lookup {
            v4: read_volatile(addr_of!((*c).family)) == AF_INET,
            ifindex: read_volatile(addr_of!((*c).ingress_ifindex)),
            remote4: read_volatile(addr_of!((*c).remote_ip4)).to_ne_bytes(),
            remote6,
            local4: read_volatile(addr_of!((*c).local_ip4)).to_ne_bytes(),
            local6,
            remote_port: read_volatile(addr_of!((*c).remote_port)).to_ne_bytes(),
            local_port: read_volatile(addr_of!((*c).local_port)) as u16,
        }
    }
}

#[sk_lookup]
pub fn redirect_sk_lookup(ctx: SkLookupContext) -> u32 {
    let c = ctx.lookup;
    if unsafe { read_volatile(addr_of!((*c).protocol)) } != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let netns = unsafe { read_volatile(&raw const INBOUND_NETNS_COOKIE) };
    if netns == 0 {
        return sk_action::SK_PASS;
    }
    // Copied to the stack: an update of the same key may recycle the slot a pointer refers to.
    let Some(rec) = INBOUND.get_ptr(netns).map(|p| unsafe { read_volatile(p) }) else {
        count(InboundCounter::NotInMesh);
        return sk_action::SK_PASS;
    };
    let l = read(c);
    let source = if l.v4 {
        Dest::V4(l.remote4)
    } else {
        Dest::V6(l.remote6)
    };
    let id = rec.policy_id.to_be_bytes();
    // Step 1 means "not through PREROUTING", i.e. sent from inside this netns. A connection to
    // 127.0.0.0/8 arrives on lo, but one from the pod to its own address reports that address's
    // device as ingress (the route's fib device, not lo), with the address itself as source.
    let local_origin = l.ifindex == LOOPBACK_IFINDEX
        || if l.v4 {
            l.remote4 == l.local4
        } else {
            l.remote6 == l.local6
        };
    let step = decide_inbound(
        local_origin,
        &source,
        || port_rule(&IN_PORTS, id, l.local_port.to_be_bytes()),
        |s| addr_rule(&IN_SRC_V4, &IN_SRC_V6, id, s),
    );
    if !step.steers() {
        count(step.counter());
        return sk_action::SK_PASS;
    }
    let mut key = ListenerKey {
        netns,
        port: rec.proxy_port,
        family: if l.v4 { LISTEN_V4 } else { LISTEN_V6 },
        _pad: 0,
    };
    let mut res = IN_LISTEN.redirect_sk_lookup(&ctx, key, 0);
    if l.v4 && res == Err(-ENOENT) {
        // No AF_INET listener: a dual-stack (`::`) one takes IPv4 too.
        key.family = LISTEN_V6;
        res = IN_LISTEN.redirect_sk_lookup(&ctx, key, 0);
    }
    match res {
        Ok(()) => {
            record_orig(netns, &l);
            count(InboundCounter::Steered);
            sk_action::SK_PASS
        }
        // Fail closed, as iptables REDIRECT to a closed port: the lookup ends with no socket and
        // the client gets a reset; never the app.
        Err(e) if e == -ENOENT => {
            count(InboundCounter::NoListener);
            sk_action::SK_DROP
        }
        Err(_) => {
            count(InboundCounter::AssignFailed);
            sk_action::SK_DROP
        }
    }
}

/// The original destination of a steered connection is its own local address; the key is the
/// proxy side's view of the tuple (peer = client), in IPv6 form as the getsockopt program reads it.
#[inline(always)]
fn record_orig(netns: u64, l: &Lookup) {
    let (src, dst, flags) = if l.v4 {
        (mapped(l.remote4), mapped(l.local4), orig_flags::V4)
    } else {
        (l.remote6, l.local6, 0)
    };
    let port = l.local_port.to_be_bytes();
    let key = OrigTupleKey {
        netns,
        src,
        dst,
        sport: l.remote_port,
        dport: port,
        _pad: [0; 4],
    };
    let rec = OrigDst {
        addr: dst,
        port,
        flags,
    };
    // Best effort: a full map only costs the proxy the original destination, which it can
    // still read with getsockname.
    let _ = ORIG_TUPLE.insert(key, rec, 0);
}
