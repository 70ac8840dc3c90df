//! The byte layout of a map's key and value as BTF describes it, for the layout check of the
//! pinned maps (`generation`): two builds whose records have the same size can still disagree on
//! what the bytes mean (a member renamed, retyped or moved: a padding word that became a field, or
//! back under a downgrade), and the sizes the kernel reports cannot tell.
//!
//! The kernel keeps the BTF a map was created with (`bpf_map_info::btf_id` and the key and value
//! type ids); this build's expectation is the BTF of its own eBPF object, for the same map. aya
//! exposes neither the map's BTF ids (its `MapInfo` omits them) nor BTF by id, and aya-obj keeps
//! its type lookups by id private, so the ids and the blob come from the bpf syscall here (with
//! aya-obj's kernel bindings for the structures) and the types are walked with the reader of
//! `kernel_btf`.
use std::{
    fmt,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use aya::maps::MapInfo;
use aya_obj::generated::{bpf_attr, bpf_btf_info, bpf_cmd, bpf_map_info};

use super::kernel_btf::{
    BtfError, KIND_ARRAY, KIND_ENUM, KIND_ENUM64, KIND_INT, KIND_PTR, KIND_RESTRICT, KIND_STRUCT,
    KIND_TYPE_TAG, KIND_TYPEDEF, KIND_UNION, Types,
};

/// How deep records nest before the walk gives up (no map value here nests beyond 3; BTF from
/// the kernel is trusted, but a bound keeps a malformed blob from recursing without end).
const MAX_DEPTH: u32 = 16;

/// The layout of one type as far as reading the bytes depends on it: sizes, offsets, member
/// names and order, element counts, integer encodings. Not type names: a Rust type renamed with
/// the same members reads the same bytes (and aya's wrapper types have mangled names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `bits` wide, `signed`, in `size` bytes.
    Int {
        size: u32,
        bits: u32,
        signed: bool,
    },
    Array {
        elem: Box<Shape>,
        len: u32,
    },
    /// A struct (or a union): its size and members in order.
    Record {
        union: bool,
        size: u32,
        members: Vec<Member>,
    },
    Enum {
        size: u32,
    },
    Ptr,
    /// Any other kind, by its BTF kind number.
    Other {
        kind: u32,
        size: u32,
    },
}

/// One member of a record: its name, its bit offset (with the bit-field width in the top byte
/// when the record has bit fields, as BTF stores it) and its layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub offset: u32,
    pub shape: Shape,
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Int { bits, signed, .. } => {
                write!(f, "{}{bits}", if *signed { 'i' } else { 'u' })
            }
            Shape::Array { elem, len } => write!(f, "[{elem}; {len}]"),
            Shape::Record { members, .. } => {
                f.write_str("{")?;
                for (i, m) in members.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}{}: {} @{}", m.name, m.shape, m.offset / 8)?;
                }
                f.write_str("}")
            }
            Shape::Enum { size } => write!(f, "enum({size})"),
            Shape::Ptr => f.write_str("ptr"),
            Shape::Other { kind, size } => write!(f, "kind{kind}({size})"),
        }
    }
}

/// The layout of type `id` in the BTF blob `data`.
pub fn shape_of(data: &[u8], id: u32) -> Result<Shape, BtfError> {
    walk(&Types::parse(data)?, id, 0)
}

fn walk(types: &Types<'_>, id: u32, depth: u32) -> Result<Shape, BtfError> {
    if depth > MAX_DEPTH {
        return Err(BtfError::Malformed);
    }
    let t = types.get(id)?;
    Ok(match t.kind {
        // Through typedefs and qualifiers (volatile, const, restrict, type tags).
        KIND_TYPEDEF..=KIND_RESTRICT | KIND_TYPE_TAG => walk(types, t.size_or_type, depth + 1)?,
        KIND_INT => {
            let enc = types.word(&t, 0)?;
            Shape::Int {
                size: t.size_or_type,
                bits: enc & 0xff,
                signed: (enc >> 24) & 1 != 0,
            }
        }
        KIND_ARRAY => Shape::Array {
            elem: Box::new(walk(types, types.word(&t, 0)?, depth + 1)?),
            len: types.word(&t, 2)?,
        },
        KIND_STRUCT | KIND_UNION => {
            let members = (0..t.vlen as usize)
                .map(|i| {
                    Ok(Member {
                        name: types.name(types.word(&t, 3 * i)?)?.to_string(),
                        shape: walk(types, types.word(&t, 3 * i + 1)?, depth + 1)?,
                        offset: types.word(&t, 3 * i + 2)?,
                    })
                })
                .collect::<Result<_, BtfError>>()?;
            Shape::Record {
                union: t.kind == KIND_UNION,
                size: t.size_or_type,
                members,
            }
        }
        KIND_ENUM | KIND_ENUM64 => Shape::Enum {
            size: t.size_or_type,
        },
        KIND_PTR => Shape::Ptr,
        kind => Shape::Other {
            kind,
            size: t.size_or_type,
        },
    })
}

/// A map's key and value layouts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Shape,
    pub value: Shape,
}

impl KeyValue {
    /// The first difference between `self` (pinned) and `want` (this build), in words.
    pub fn difference(&self, want: &KeyValue) -> Option<String> {
        let diff = |what: &str, got: &Shape, want: &Shape| {
            (got != want).then(|| format!("{what} pinned {got}, this build {want}"))
        };
        diff("key", &self.key, &want.key).or_else(|| diff("value", &self.value, &want.value))
    }
}

/// The key and value layouts of `map` in this build's object, or None when the object's map has
/// no BTF (a legacy `maps` section definition, or no key type: an array's key is its index).
pub fn expected(obj: &aya_obj::Object, map: &str) -> Option<KeyValue> {
    let aya_obj::Map::Btf(m) = obj.maps.get(map)? else {
        return None;
    };
    let data = obj.btf.as_ref()?.to_bytes();
    described(&data, m.def.btf_key_type_id, m.def.btf_value_type_id)
}

/// The key and value layouts of a pinned map from the BTF the kernel keeps with it, or None when
/// the map was created without BTF (`btf_id` 0) or its BTF cannot be read: then only the sizes are
/// compared, as before this check existed.
pub fn pinned(info: &MapInfo) -> Option<KeyValue> {
    let fd = info.fd().ok()?;
    let m = map_info(fd.as_fd()).ok()?;
    if m.btf_id == 0 {
        return None;
    }
    let data = btf_by_id(m.btf_id).ok()?;
    described(&data, m.btf_key_type_id, m.btf_value_type_id)
}

fn described(data: &[u8], key: u32, value: u32) -> Option<KeyValue> {
    // A type id 0 (void) means "no BTF for this part": an array's key, or a map without it.
    if key == 0 || value == 0 {
        return None;
    }
    Some(KeyValue {
        key: shape_of(data, key).ok()?,
        value: shape_of(data, value).ok()?,
    })
}

/// `bpf(cmd, attr)` with the whole `bpf_attr`, zeroed but for what the caller set.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised bpf_attr of the size passed; the kernel reads and
    // writes only within it and within the buffers it points at, which outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            (attr as *mut bpf_attr).cast::<libc::c_void>(),
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// BPF_OBJ_GET_INFO_BY_FD into `info`.
fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> std::io::Result<()> {
    // SAFETY: all-zero is a valid bpf_attr (a union of plain integers).
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<T>() as u32;
    attr.info.info = (info as *mut T) as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

/// The map's full `bpf_map_info` (aya's `MapInfo` has no accessor for the BTF ids).
fn map_info(fd: BorrowedFd<'_>) -> std::io::Result<bpf_map_info> {
    // SAFETY: all-zero is a valid bpf_map_info (plain integers).
    let mut info: bpf_map_info = unsafe { std::mem::zeroed() };
    obj_info(fd, &mut info)?;
    Ok(info)
}

/// The raw BTF blob of the kernel's BTF object `id`.
fn btf_by_id(id: u32) -> std::io::Result<Vec<u8>> {
    // SAFETY: as in `obj_info`.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_6.__bindgen_anon_1.btf_id = id;
    let raw = bpf(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: BPF_BTF_GET_FD_BY_ID returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    // First the size (a zero-sized buffer gets nothing copied), then the blob.
    // SAFETY: all-zero is a valid bpf_btf_info (plain integers).
    let mut info: bpf_btf_info = unsafe { std::mem::zeroed() };
    obj_info(fd.as_fd(), &mut info)?;
    let mut data = vec![0u8; info.btf_size as usize];
    // SAFETY: as above.
    let mut info: bpf_btf_info = unsafe { std::mem::zeroed() };
    info.btf = data.as_mut_ptr() as u64;
    info.btf_size = data.len() as u32;
    obj_info(fd.as_fd(), &mut info)?;
    data.truncate(info.btf_size as usize);
    Ok(data)
}
