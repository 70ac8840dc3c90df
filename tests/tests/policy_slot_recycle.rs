//! Issue #12 item 11, measured in the kernel instead of hoped for under load. A test-only socket
//! filter (raw BPF instructions, run once through BPF_PROG_TEST_RUN, so everything happens on
//! one CPU in a fixed order) looks up key A in the agent's own pinned `POLICY` map, then updates
//! A and then another existing key B from inside the program, exactly the pair of writes a
//! reconcile pass makes, and reads A's record through the pointer it looked up first.
//!
//! - Read late (what `lookup_policy` did before the fix: the record read through the pointer
//!   after other work): the pointer now holds **B's new record**. An update of an existing key
//!   in a preallocated hash parks the old element in a per-CPU spare and the next update of an
//!   existing key on that CPU reuses it at once, with no RCU grace period. A connect would have
//!   used another workload's policy.
//! - Copied first (what `resolve::policy_of` does: one copy straight after the lookup, no map
//!   operation in between): the copy is A's record.
//! - Copied late, then checked (`policy_of`'s guard against being preempted between the lookup
//!   and the end of the copy while the agent writes two records: the updates run between the
//!   lookup and the copy here): the key is looked up again, the element differs, and the record
//!   copied is A's new one, never B's.
//!
//! The same is measured on a twin with `BPF_F_NO_PREALLOC` (bpf_mem_alloc) and on an LRU hash,
//! to show that neither map type would have been the fix: the copy is.
mod escapes_support;

use std::{ffi::CString, os::fd::RawFd};

use escapes_support::{config, world};
use redirect_tests::Agent;

const KEY_A: u64 = 0xffff_ffff_ffff_fff1;
const KEY_B: u64 = 0xffff_ffff_ffff_fff2;
/// The first u32 of each record (its `policy_id`): A and B as userspace wrote them, and as the
/// program rewrites them.
const A1: u32 = 0xA1;
const B1: u32 = 0xB1;
const A2: u32 = 0xA2;
const B2: u32 = 0xB2;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

/// `union bpf_attr`, large enough for every command used here, zeroed.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32(mut self, off: usize, v: u32) -> Attr {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Attr {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().unwrap())
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<i64> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

struct Fd(RawFd);

impl Drop for Fd {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}

/// What the kernel says a map is: type, key size, value size, max entries, flags.
#[derive(Debug, Clone, Copy)]
struct MapShape {
    kind: u32,
    key: u32,
    value: u32,
    max: u32,
    flags: u32,
}

fn shape(fd: &Fd) -> MapShape {
    let mut info = [0u8; 128];
    let mut a = Attr::new()
        .u32(0, fd.0 as u32)
        .u32(4, info.len() as u32)
        .u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).unwrap();
    let at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
    MapShape {
        kind: at(0),
        key: at(8),
        value: at(12),
        max: at(16),
        flags: at(20),
    }
}

fn create(s: MapShape) -> Fd {
    let mut a = Attr::new()
        .u32(0, s.kind)
        .u32(4, s.key)
        .u32(8, s.value)
        .u32(12, s.max)
        .u32(16, s.flags);
    Fd(bpf(BPF_MAP_CREATE, &mut a).expect("creating the twin map") as RawFd)
}

fn update(fd: &Fd, key: u64, marker: u32, value_size: u32) {
    let mut value = vec![0u8; value_size as usize];
    value[..4].copy_from_slice(&marker.to_ne_bytes());
    let mut a = Attr::new()
        .u32(0, fd.0 as u32)
        .u64(8, &key as *const u64 as u64)
        .u64(16, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).unwrap();
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64
        | ((dst | (src << 4)) as u64) << 8
        | (off as u16 as u64) << 16
        | (imm as u32 as u64) << 32
}

/// `dst = imm64` (two slots); `src` 1 makes it a map fd reference.
fn ld_imm64(p: &mut Vec<u64>, dst: u8, src: u8, v: u64) {
    p.push(insn(0x18, dst, src, 0, v as u32 as i32));
    p.push(insn(0, 0, 0, 0, (v >> 32) as u32 as i32));
}

const FP: u8 = 10;
const OFF_A: i16 = -8;
const OFF_B: i16 = -16;
const OFF_VAL_A: i16 = -80;
const OFF_VAL_B: i16 = -144;
const OFF_COPY: i16 = -208;

/// How the experiment reads A's record around the two updates.
#[derive(Clone, Copy, PartialEq)]
enum Read {
    /// Through the looked-up pointer, after the updates (before the fix).
    Late,
    /// Copied to the stack straight after the lookup.
    CopyFirst,
    /// Copied after the updates (a preempted copy), then A looked up again: the same element
    /// keeps the copy, another is copied instead (`resolve::policy_of`).
    CopyLateChecked,
}

/// The experiment's program: lookup A; update A (policy id A2), update B (B2), reading A's
/// record as `read` says; returns the first u32 of what it read.
fn program(map: &Fd, value_size: u32, read: Read) -> Vec<u64> {
    let words = (value_size / 8) as i16;
    let mut p = Vec::new();
    p.push(insn(0xb7, 1, 0, 0, 0)); // r1 = 0
    for off in (OFF_COPY..0).step_by(8) {
        p.push(insn(0x7b, FP, 1, off, 0)); // *(u64 *)(fp + off) = 0
    }
    for (off, key) in [(OFF_A, KEY_A), (OFF_B, KEY_B)] {
        ld_imm64(&mut p, 1, 0, key);
        p.push(insn(0x7b, FP, 1, off, 0));
    }
    p.push(insn(0x62, FP, 0, OFF_VAL_A, A2 as i32)); // *(u32 *)(fp + off) = imm
    p.push(insn(0x62, FP, 0, OFF_VAL_B, B2 as i32));
    ld_imm64(&mut p, 1, 1, map.0 as u64);
    p.push(insn(0xbf, 2, FP, 0, 0)); // r2 = fp
    p.push(insn(0x07, 2, 0, 0, OFF_A as i32)); // r2 += off
    p.push(insn(0x85, 0, 0, 0, 1)); // call bpf_map_lookup_elem
    let null_check = p.len();
    p.push(0); // if r0 == 0 goto fail (patched below)
    p.push(insn(0xbf, 6, 0, 0, 0)); // r6 = r0
    let copy = |p: &mut Vec<u64>| {
        for i in 0..words {
            p.push(insn(0x79, 1, 6, i * 8, 0)); // r1 = *(u64 *)(r6 + 8i)
            p.push(insn(0x7b, FP, 1, OFF_COPY + i * 8, 0));
        }
    };
    if read == Read::CopyFirst {
        copy(&mut p);
    }
    for (key, val) in [(OFF_A, OFF_VAL_A), (OFF_B, OFF_VAL_B)] {
        ld_imm64(&mut p, 1, 1, map.0 as u64);
        p.push(insn(0xbf, 2, FP, 0, 0));
        p.push(insn(0x07, 2, 0, 0, key as i32));
        p.push(insn(0xbf, 3, FP, 0, 0));
        p.push(insn(0x07, 3, 0, 0, val as i32));
        p.push(insn(0xb7, 4, 0, 0, 0)); // BPF_ANY
        p.push(insn(0x85, 0, 0, 0, 2)); // call bpf_map_update_elem
    }
    let mut null_checks = vec![null_check];
    match read {
        Read::Late => p.push(insn(0x61, 0, 6, 0, 0)), // r0 = *(u32 *)(r6 + 0)
        Read::CopyFirst => p.push(insn(0x61, 0, FP, OFF_COPY, 0)), // r0 = *(u32 *)(fp + copy)
        Read::CopyLateChecked => {
            copy(&mut p);
            ld_imm64(&mut p, 1, 1, map.0 as u64);
            p.push(insn(0xbf, 2, FP, 0, 0));
            p.push(insn(0x07, 2, 0, 0, OFF_A as i32));
            p.push(insn(0x85, 0, 0, 0, 1)); // call bpf_map_lookup_elem
            null_checks.push(p.len());
            p.push(0); // if r0 == 0 goto fail
            p.push(insn(0x1d, 0, 6, 2, 0)); // if r0 == r6 goto +2 (the same element)
            p.push(insn(0x61, 0, 0, 0, 0)); // r0 = *(u32 *)(r0 + 0): copy the current one
            p.push(insn(0x95, 0, 0, 0, 0));
            p.push(insn(0x61, 0, FP, OFF_COPY, 0)); // r0 = *(u32 *)(fp + copy)
        }
    }
    p.push(insn(0x95, 0, 0, 0, 0)); // exit
    let fail = p.len();
    for at in null_checks {
        p[at] = insn(0x15, 0, 0, (fail - at - 1) as i16, 0);
    }
    p.push(insn(0xb7, 0, 0, 0, 0xffff));
    p.push(insn(0x95, 0, 0, 0, 0));
    p
}

/// Loads and runs the program once; its return value.
fn run(p: &[u64]) -> u32 {
    let license = CString::new("GPL").unwrap();
    let mut log = vec![0u8; 1 << 16];
    let mut a = Attr::new()
        .u32(0, BPF_PROG_TYPE_SOCKET_FILTER)
        .u32(4, p.len() as u32)
        .u64(8, p.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64);
    let prog = match bpf(BPF_PROG_LOAD, &mut a) {
        Ok(fd) => Fd(fd as RawFd),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            panic!(
                "loading the experiment: {e}\n{}",
                String::from_utf8_lossy(&log[..end])
            );
        }
    };
    let data = [0u8; 64];
    let mut a = Attr::new()
        .u32(0, prog.0 as u32)
        .u32(8, data.len() as u32)
        .u64(16, data.as_ptr() as u64)
        .u32(32, 1);
    bpf(BPF_PROG_TEST_RUN, &mut a).unwrap();
    a.get_u32(4)
}

/// Seeds A and B, runs the experiment; what A's record said.
fn experiment(map: &Fd, value_size: u32, read: Read) -> u32 {
    update(map, KEY_A, A1, value_size);
    update(map, KEY_B, B1, value_size);
    run(&program(map, value_size, read))
}

fn name(v: u32) -> &'static str {
    match v {
        A1 => "A's record (as looked up)",
        A2 => "A's new record",
        B1 => "B's old record",
        B2 => "B's new record (the slot was recycled to B)",
        0xffff => "A missing",
        _ => "a torn record",
    }
}

#[test]
fn a_record_copied_before_any_other_map_operation_is_its_own_and_a_late_read_is_not() {
    let w = world("slot-recycle");
    let mut agent = Agent::start(&w.fx, &config(&w)).unwrap();
    // The agent pinned POLICY as production does, and goes away: the test is its only writer.
    agent.kill9().unwrap();
    let pin = redirect_agent::bpf::generation::current(w.fx.pin_dir())
        .join(redirect_common::map_names::POLICY);
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).unwrap();
    let mut a = Attr::new().u64(0, path.as_ptr() as u64);
    let policy = Fd(bpf(BPF_OBJ_GET, &mut a).expect("opening the pinned POLICY") as RawFd);
    let s = shape(&policy);
    println!("POLICY as pinned by the agent: {s:?}");
    assert_eq!(s.kind, BPF_MAP_TYPE_HASH, "{s:?}");
    assert_eq!(s.key, 8, "{s:?}");
    assert_eq!(
        s.flags & BPF_F_NO_PREALLOC,
        0,
        "POLICY is preallocated: {s:?}"
    );
    assert!(s.value as usize >= 8 && s.value <= 64, "{s:?}");

    let no_prealloc = create(MapShape {
        flags: s.flags | BPF_F_NO_PREALLOC,
        ..s
    });
    let lru = create(MapShape {
        kind: BPF_MAP_TYPE_LRU_HASH,
        ..s
    });
    let mut rows = Vec::new();
    for (what, map) in [
        ("POLICY (pinned, preallocated hash)", &policy),
        ("twin with BPF_F_NO_PREALLOC", &no_prealloc),
        ("twin as LRU hash", &lru),
    ] {
        let late = experiment(map, s.value, Read::Late);
        let copied = experiment(map, s.value, Read::CopyFirst);
        let checked = experiment(map, s.value, Read::CopyLateChecked);
        println!(
            "{what}: read late → {late:#x} {}; copied first → {copied:#x} {}; copied late and checked → {checked:#x} {}",
            name(late),
            name(copied),
            name(checked)
        );
        rows.push((what, late, copied, checked));
    }
    // The hazard, on the production map: the pre-fix read returns another key's record.
    assert_eq!(
        rows[0].1,
        B2,
        "POLICY: a late read saw {} (expected the slot recycled to B)",
        name(rows[0].1)
    );
    // The fix: a copy taken straight after the lookup is A's own record, on every map type.
    for (what, _, copied, checked) in &rows {
        assert_eq!(*copied, A1, "{what}: the copy saw {}", name(*copied));
        // A copy that came too late is caught by the second lookup: A's record, never B's.
        assert_eq!(
            *checked,
            A2,
            "{what}: the checked copy saw {}",
            name(*checked)
        );
    }
}
