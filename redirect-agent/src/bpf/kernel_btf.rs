//! Field offsets of the running kernel's own types, read from its BTF (/sys/kernel/btf/vmlinux)
//! at load time and handed to the programs as read-only globals.
//!
//! The connect programs read the socket owner's uid from `struct sock::sk_uid`
//! (redirect-ebpf/src/sockstate.rs). Its offset differs between kernel builds, and Rust eBPF
//! objects carry no CO-RE relocations, so the agent looks it up here; the verifier then checks
//! the access against the same BTF, so a wrong offset is a load error, never a wrong read.
//!
//! aya-obj parses BTF but keeps type lookups by id private, so this reads the format itself:
//! only the type section ([`Types`], also walked by the pinned maps' layout check, `btf_layout`).
use std::path::Path;

use super::probe::{MissingFeature, ProbeError};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;

pub(super) const KIND_INT: u32 = 1;
pub(super) const KIND_PTR: u32 = 2;
pub(super) const KIND_ARRAY: u32 = 3;
pub(super) const KIND_STRUCT: u32 = 4;
pub(super) const KIND_UNION: u32 = 5;
pub(super) const KIND_ENUM: u32 = 6;
pub(super) const KIND_TYPEDEF: u32 = 8;
// 9 and 10 (volatile, const) sit between these two: qualifiers, resolved like a typedef.
pub(super) const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
pub(super) const KIND_TYPE_TAG: u32 = 18;
pub(super) const KIND_ENUM64: u32 = 19;

/// The byte offset of `sk_uid` in the running kernel's `struct sock`, or the one-line refusal
/// the feature probe gives (nothing is pinned yet when the loader asks).
pub fn sk_uid_offset() -> Result<u32, ProbeError> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let missing = |why: String| MissingFeature {
        kernel: kernel.clone(),
        feature: format!("BTF for struct sock's sk_uid ({why})"),
        program: "redirect_connect4".into(),
        since: ", needs CONFIG_DEBUG_INFO_BTF".into(),
    };
    let data = std::fs::read(Path::new(VMLINUX)).map_err(|e| missing(format!("{VMLINUX}: {e}")))?;
    let off = member_offset(&data, "sock", "sk_uid", 4).map_err(|e| missing(e.to_string()))?;
    // 0 means "unknown" to the programs; sk_uid is never the first field of struct sock.
    if off == 0 {
        return Err(missing("sk_uid at offset 0".into()).into());
    }
    Ok(off)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data, or truncated")]
    Malformed,
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
    #[error("no struct {0}")]
    NoStruct(String),
    #[error("struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("{0}.{1} is a bit field or {2} bytes, not a {3}-byte field")]
    Shape(String, String, u32, u32),
}

/// One type of the type section: its kind, name, size-or-type word and where its trailer
/// (members, params, …) starts.
#[derive(Clone, Copy)]
pub(super) struct Type {
    pub(super) kind: u32,
    pub(super) vlen: u32,
    pub(super) kind_flag: bool,
    pub(super) name_off: u32,
    pub(super) size_or_type: u32,
    trailer: usize,
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u32(&self, at: usize) -> Result<u32, BtfError> {
        let b = self.data.get(at..at + 4).ok_or(BtfError::Malformed)?;
        Ok(u32::from_le_bytes(
            b.try_into().map_err(|_| BtfError::Malformed)?,
        ))
    }

    fn str(&self, at: usize) -> Result<&'a str, BtfError> {
        let data: &'a [u8] = self.data;
        let rest = data.get(at..).ok_or(BtfError::Malformed)?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(BtfError::Malformed)?;
        std::str::from_utf8(&rest[..end]).map_err(|_| BtfError::Malformed)
    }
}

/// The type section of a BTF blob, indexed by type id (id 0 is void), with its strings: what
/// [`member_offset`] and the pinned maps' layout check (`btf_layout`) walk.
pub(super) struct Types<'a> {
    r: Reader<'a>,
    types: Vec<Option<Type>>,
    strings: usize,
}

impl<'a> Types<'a> {
    /// Little-endian BTF only (the host's).
    pub(super) fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        let r = Reader { data };
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Malformed);
        }
        let hdr_len = r.u32(4)? as usize;
        let (type_off, type_len) = (r.u32(8)? as usize, r.u32(12)? as usize);
        let str_off = r.u32(16)? as usize;
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = hdr_len + str_off;
        if types_end > data.len() {
            return Err(BtfError::Malformed);
        }
        // Type ids start at 1; id 0 is void.
        let mut types = vec![None];
        let mut at = types_start;
        while at < types_end {
            let info = r.u32(at + 4)?;
            let t = Type {
                kind: (info >> 24) & 0x1f,
                vlen: info & 0xffff,
                kind_flag: info >> 31 != 0,
                name_off: r.u32(at)?,
                size_or_type: r.u32(at + 8)?,
                trailer: at + 12,
            };
            let trailer = match t.kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * t.vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * t.vlen as usize,
                KIND_PTR | 7 | KIND_TYPEDEF..=KIND_RESTRICT | 12 | 16 | KIND_TYPE_TAG => 0,
                k => return Err(BtfError::UnknownKind(k)),
            };
            types.push(Some(t));
            at = t.trailer + trailer;
        }
        Ok(Self { r, types, strings })
    }

    /// The type of `id`; void (0) and ids past the end are malformed here.
    pub(super) fn get(&self, id: u32) -> Result<Type, BtfError> {
        self.types
            .get(id as usize)
            .copied()
            .flatten()
            .ok_or(BtfError::Malformed)
    }

    pub(super) fn name(&self, name_off: u32) -> Result<&'a str, BtfError> {
        self.r.str(self.strings + name_off as usize)
    }

    /// Word `i` (0-based) of `t`'s trailer (members: 3 words each, an array: 3 words).
    pub(super) fn word(&self, t: &Type, i: usize) -> Result<u32, BtfError> {
        self.r.u32(t.trailer + 4 * i)
    }
}

/// The byte offset of `member` in the struct named `strukt`, which must be a whole field of
/// `size` bytes (through typedefs and qualifiers). Little-endian BTF only (the host's).
pub fn member_offset(data: &[u8], strukt: &str, member: &str, size: u32) -> Result<u32, BtfError> {
    let table = Types::parse(data)?;
    let (r, types, strings) = (&table.r, &table.types, table.strings);
    let name = |t: &Type| r.str(strings + t.name_off as usize);
    let found = types
        .iter()
        .flatten()
        .find(|t| t.kind == KIND_STRUCT && name(t).is_ok_and(|n| n == strukt))
        .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
    for i in 0..found.vlen as usize {
        let m = found.trailer + 12 * i;
        if r.str(strings + r.u32(m)? as usize)? != member {
            continue;
        }
        let raw = r.u32(m + 8)?;
        let (bitfield, bits) = if found.kind_flag {
            (raw >> 24, raw & 0xff_ffff)
        } else {
            (0, raw)
        };
        let shape = |got| BtfError::Shape(strukt.into(), member.into(), got, size);
        // Through typedefs and qualifiers to the sized type (kuid_t is a one-member struct).
        let mut id = r.u32(m + 4)? as usize;
        let sized = loop {
            let t = types
                .get(id)
                .copied()
                .flatten()
                .ok_or(BtfError::Malformed)?;
            match t.kind {
                KIND_TYPEDEF..=KIND_RESTRICT | KIND_TYPE_TAG => id = t.size_or_type as usize,
                KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => break t,
                _ => return Err(shape(0)),
            }
        };
        if bitfield != 0 || bits % 8 != 0 || sized.size_or_type != size {
            return Err(shape(sized.size_or_type));
        }
        return Ok(bits / 8);
    }
    Err(BtfError::NoMember(strukt.into(), member.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with: 1 int "unsigned int" (4 bytes), 2 struct (anonymous) { val: 1 },
    /// 3 typedef kuid_t → 2, 4 struct sock { pad: 1 at 0, sk_uid: 3 at byte `uid_at`,
    /// bits: 1 as a 3-bit field }.
    fn blob(uid_at: u32, kind_flag: bool) -> Vec<u8> {
        let strings = b"\0unsigned int\0val\0kuid_t\0sock\0pad\0sk_uid\0bits\0";
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            (strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap()
                + 1) as u32
        };
        let mut t: Vec<u32> = vec![];
        t.extend([s("unsigned int"), KIND_INT << 24, 4, 32]);
        t.extend([0, (KIND_STRUCT << 24) | 1, 4, s("val"), 1, 0]);
        t.extend([s("kuid_t"), KIND_TYPEDEF << 24, 2]);
        let flag = if kind_flag { 1 << 31 } else { 0 };
        let bits_off = if kind_flag { (3 << 24) | 64 } else { 64 };
        t.extend([s("sock"), flag | (KIND_STRUCT << 24) | 3, 16]);
        t.extend([
            s("pad"),
            1,
            0,
            s("sk_uid"),
            3,
            uid_at * 8,
            s("bits"),
            1,
            bits_off,
        ]);
        let types: Vec<u8> = t.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = vec![];
        out.extend(MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(w.to_le_bytes());
        }
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn finds_a_member_through_its_typedef() {
        assert_eq!(member_offset(&blob(12, false), "sock", "sk_uid", 4), Ok(12));
        assert_eq!(member_offset(&blob(8, true), "sock", "sk_uid", 4), Ok(8));
    }

    #[test]
    fn refuses_what_is_not_a_whole_field_of_that_size() {
        let b = blob(12, false);
        assert!(matches!(
            member_offset(&b, "sock", "sk_uid", 8),
            Err(BtfError::Shape(..))
        ));
        assert!(matches!(
            member_offset(&blob(12, true), "sock", "bits", 4),
            Err(BtfError::Shape(..))
        ));
        assert!(matches!(
            member_offset(&b, "sock", "nope", 4),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            member_offset(&b, "tcp_sock", "sk_uid", 4),
            Err(BtfError::NoStruct(_))
        ));
        assert_eq!(
            member_offset(&b[..30], "sock", "sk_uid", 4),
            Err(BtfError::Malformed)
        );
    }

    /// The running kernel's own BTF (every kernel redirect supports has it).
    #[test]
    fn the_running_kernel_has_sk_uid() {
        let off = sk_uid_offset().unwrap();
        assert!(off > 0 && off.is_multiple_of(4), "{off}");
    }
}
