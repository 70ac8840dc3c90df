//! Layout generations of the pinned state (issue #13; docs/deploy.md, "Upgrades").
//!
//! aya reuses a pinned map by path with no check, so a build whose map layout differs from the
//! pinned maps would misread them. Before anything is pinned, every pinned map is compared with
//! the definition of the same map in this build's own eBPF object (type, key size, value size,
//! max entries, flags), and its key and value types with the BTF of the same map in the object
//! (member names, order, offsets and types: `btf_layout`), which catches a change that keeps the
//! sizes, such as a padding word that became a field. The expectation comes from the object, so a
//! map changed, added or removed by a later release is covered with nothing to keep in sync by
//! hand.
//!
//! A *generation* is one complete set of maps, programs and links:
//! - generation 0 is `--bpffs-dir` itself (the flat layout of every release so far, and of a
//!   fresh install);
//! - generation N ≥ 1 is the sub-directory `--bpffs-dir/gen<N>`.
//!
//! On start the agent adopts the newest generation whose layout matches. If none matches, it
//! builds generation max+1 beside the old one: new maps (the record maps the kernel alone writes
//! are carried over when their layout still matches, see [`SHARED`]), filled by the normal
//! reconcile, and new links attached next to the old ones (cgroup links are multi-attach). Every
//! other generation is released only once the adopted one is ready (first snapshot applied,
//! nothing failing), so no connect is ever without a program that redirects it. While both are
//! attached, the second connect program that runs finds the destination already rewritten to
//! the proxy and stands aside (redirect-ebpf/src/connect.rs, `at_proxy`; in sidecar mode the
//! loopback step bypasses as well), so a connect is rewritten once.
use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapInfo};
use redirect_common::{dns, inbound, map_names};
use tracing::{info, warn};

use super::{
    BpfError,
    btf_layout::{self, KeyValue},
};

/// Prefix of a generation sub-directory (bpffs refuses dots, and names stay short).
const GEN_PREFIX: &str = "gen";

/// Maps that only the kernel programs write (per-connection and per-socket records, counters)
/// and that a new generation takes over from the old one when their layout still matches: the
/// original destination of a connection redirected by the old programs is still answered after
/// the switch, a listener recorded before it is still found by sk_lookup, and a socket keeps its
/// owner uid. The maps the agent writes (POLICY, the tries, POLICY_GEN, the inbound records) are
/// never shared: a reconcile adopting another generation's entries would retire them under it.
/// Nor is CGROUP_CACHE: its entries point at the old generation's registrations.
pub const SHARED: [&str; 8] = [
    map_names::ORIG_TUPLE,
    map_names::ORIG_STATS,
    map_names::COUNTERS,
    map_names::SOCK_STATE,
    dns::map_names::DNS_ORIG,
    dns::map_names::DNS_STATS,
    inbound::map_names::IN_LISTEN,
    inbound::map_names::IN_STATS,
];

/// What a map looks like to the kernel: what decides whether a build can read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// A map's layout and, where both sides have BTF, its key and value types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub layout: MapLayout,
    /// None: no BTF (a pinned map created without it, or an object map without it). Then only
    /// the sizes are compared, as before the BTF check existed.
    pub btf: Option<KeyValue>,
}

impl MapShape {
    /// Why a pinned map of shape `self` cannot be used as `want`, or None. `capacity`: whether
    /// max entries and flags count too (they do for the agent, which writes; not for readers).
    pub fn incompatible(&self, want: &MapShape, capacity: bool) -> Option<String> {
        let (p, w) = (&self.layout, &want.layout);
        let sizes = |l: &MapLayout| (l.map_type, l.key_size, l.value_size);
        if sizes(p) != sizes(w) || (capacity && p != w) {
            return Some(format!("pinned {p}; this build {w}"));
        }
        match (&self.btf, &want.btf) {
            (Some(got), Some(want)) => got.difference(want),
            _ => None,
        }
    }
}

impl fmt::Display for MapLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, max entries {}, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// A pinned map that this build cannot adopt, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub map: String,
    pub why: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "map {}: {}", self.map, self.why)
    }
}

/// The layout of every map this build pins, read from its eBPF object. `max_rule_entries`
/// overrides the tries' capacity as the loader does.
pub fn expected(
    object: &[u8],
    max_rule_entries: Option<u32>,
) -> Result<BTreeMap<&'static str, MapShape>, BpfError> {
    let obj = aya_obj::Object::parse(object)
        .map_err(|e| BpfError::Probe(super::probe::ProbeError::Object(e)))?;
    let tries = [map_names::CIDR_V4, map_names::CIDR_V6, map_names::PORTS];
    Ok(super::loader::all_map_names()
        .filter_map(|name| {
            let m = obj.maps.get(name)?;
            let max_entries = match max_rule_entries {
                Some(n) if tries.contains(&name) => n,
                _ => m.max_entries(),
            };
            let layout = MapLayout {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries,
                flags: m.map_flags(),
            };
            let btf = btf_layout::expected(&obj, name);
            Some((name, MapShape { layout, btf }))
        })
        .collect())
}

/// The layout of a pinned map, as the kernel reports it, with the BTF it keeps for the map.
pub fn pinned(path: &Path) -> Option<MapShape> {
    let info = MapInfo::from_pin(path).ok()?;
    let layout = MapLayout {
        map_type: info.map_type().ok()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    };
    let btf = btf_layout::pinned(&info);
    Some(MapShape { layout, btf })
}

/// The maps pinned in `dir` that cannot be used as `expected` (with `capacity`: as the agent
/// uses them, max entries and flags included). A map this build has and the directory lacks is
/// no mismatch: it is created next to the others.
pub fn mismatches(
    dir: &Path,
    expected: &BTreeMap<&'static str, MapShape>,
    capacity: bool,
) -> Vec<Mismatch> {
    expected
        .iter()
        .filter(|(name, _)| dir.join(name).exists())
        .filter_map(|(name, want)| {
            let why = match pinned(&dir.join(name)) {
                None => Some(format!("pin unreadable; this build {}", want.layout)),
                Some(got) => got.incompatible(want, capacity),
            }?;
            Some(Mismatch {
                map: (*name).to_string(),
                why,
            })
        })
        .collect()
}

/// For readers (`inspect`, `explain`): fails, naming the maps, when `dir` holds maps whose key
/// or value layout is not this build's. Capacity does not matter to a reader.
pub fn check_readable(dir: &Path) -> Result<(), BpfError> {
    if super::loader::OBJECT.is_empty() {
        return Ok(());
    }
    let bad: Vec<String> = mismatches(dir, &expected(super::loader::OBJECT, None)?, false)
        .into_iter()
        .map(|m| m.to_string())
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(BpfError::Layout {
        dir: dir.to_path_buf(),
        mismatches: bad.join("; "),
    })
}

/// One generation: its number and directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    pub number: u32,
    pub dir: PathBuf,
}

fn number_of(name: &str) -> Option<u32> {
    let n = name.strip_prefix(GEN_PREFIX)?;
    // `gen7`, never `gen07` or `gen+7`: one directory per number.
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0'))
        .then(|| n.parse().ok())
        .flatten()
}

/// Every generation under `base`, oldest first. Generation 0 exists when `base` itself holds a
/// map pin of this project.
pub fn list(base: &Path) -> Vec<Generation> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(base) else {
        return out;
    };
    let mut flat = false;
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(number) = number_of(&name).filter(|_| e.path().is_dir()) {
            out.push(Generation {
                number,
                dir: e.path(),
            });
        } else if super::loader::all_map_names().any(|m| m == name) {
            flat = true;
        }
    }
    if flat {
        out.push(Generation {
            number: 0,
            dir: base.to_path_buf(),
        });
    }
    out.sort_by_key(|g| g.number);
    out
}

/// The generation readers (`inspect`, `explain`, metrics) show: the newest one. During an
/// upgrade that is the one being filled, which is the one that stays.
pub fn current(base: &Path) -> PathBuf {
    list(base)
        .pop()
        .map_or_else(|| base.to_path_buf(), |g| g.dir)
}

/// Chooses the generation this build runs: the newest one whose layout matches, or a new one
/// beside the others (created, and seeded with the shared maps that still match). Called before
/// anything is pinned.
pub fn prepare(
    base: &Path,
    expected: &BTreeMap<&'static str, MapShape>,
) -> Result<Generation, BpfError> {
    let gens = list(base);
    let Some(newest) = gens.last().cloned() else {
        // A fresh install: the flat layout, as every earlier release had it.
        return Ok(Generation {
            number: 0,
            dir: base.to_path_buf(),
        });
    };
    for g in gens.iter().rev() {
        let bad = mismatches(&g.dir, expected, true);
        if bad.is_empty() {
            info!(generation = g.number, dir = %g.dir.display(), "pinned map layout matches this build; adopting");
            return Ok(g.clone());
        }
        for m in &bad {
            warn!(generation = g.number, "layout differs: {m}");
        }
    }
    let next = Generation {
        number: newest.number + 1,
        dir: base.join(format!("{GEN_PREFIX}{}", newest.number + 1)),
    };
    fs::create_dir_all(&next.dir).map_err(|e| BpfError::io("creating", &next.dir, e))?;
    for name in SHARED {
        let (from, to) = (newest.dir.join(name), next.dir.join(name));
        let Some(want) = expected.get(name) else {
            continue;
        };
        if to.exists() || pinned(&from).is_none_or(|got| got.incompatible(want, true).is_some()) {
            continue;
        }
        // A second pin of the same map: the old generation's pin goes with it, the map stays.
        let data = MapData::from_pin(&from).map_err(|e| BpfError::OpenPin {
            path: from.clone(),
            source: Box::new(e),
        })?;
        data.pin(&to)
            .map_err(|e| BpfError::io("pinning", &to, std::io::Error::other(e)))?;
    }
    info!(
        generation = next.number,
        dir = %next.dir.display(),
        old = newest.number,
        "map layout changed: building a new generation beside the old one, which stays attached until the new one is ready"
    );
    Ok(next)
}

/// What releasing a generation removed.
#[derive(Debug, Default)]
pub struct Released {
    pub links: Vec<PathBuf>,
    pub programs: Vec<PathBuf>,
    pub maps: Vec<PathBuf>,
}

/// Releases every generation under `base` but `keep`: links first (the pin is a link's last
/// reference, so removing it detaches), then programs and maps. Called once `keep` is ready.
pub fn release_others(base: &Path, keep: &Path) -> Result<Vec<u32>, BpfError> {
    let mut released = Vec::new();
    for g in list(base).into_iter().filter(|g| g.dir != keep) {
        let r = release(base, &g)?;
        info!(
            generation = g.number,
            links = r.links.len(),
            programs = r.programs.len(),
            maps = r.maps.len(),
            "released an older layout generation"
        );
        released.push(g.number);
    }
    Ok(released)
}

/// Removes one generation's pins. Generation 0 shares `base` with the others' directories and
/// possibly with other software's pins, so only this project's names go there; a generation
/// directory holds nothing but this project's pins and is removed whole.
pub fn release(base: &Path, g: &Generation) -> Result<Released, BpfError> {
    let flat = g.dir == base;
    let mut r = Released::default();
    let entries = |dir: &Path| -> Result<Vec<PathBuf>, BpfError> {
        let rd = fs::read_dir(dir).map_err(|e| BpfError::io("listing", dir, e))?;
        Ok(rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| !p.is_dir())
            .filter(|p| {
                !flat
                    || p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(super::loader::owned_name)
            })
            .collect())
    };
    let name = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string()
    };
    let (links, rest): (Vec<_>, Vec<_>) = entries(&g.dir)?
        .into_iter()
        .partition(|p| name(p).starts_with("link_"));
    for p in links {
        fs::remove_file(&p).map_err(|e| BpfError::io("unpinning", &p, e))?;
        r.links.push(p);
    }
    for p in rest {
        fs::remove_file(&p).map_err(|e| BpfError::io("unpinning", &p, e))?;
        if name(&p).starts_with("prog_") {
            r.programs.push(p);
        } else {
            r.maps.push(p);
        }
    }
    if !flat {
        fs::remove_dir(&g.dir).map_err(|e| BpfError::io("removing", &g.dir, e))?;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_names_are_canonical() {
        assert_eq!(number_of("gen1"), Some(1));
        assert_eq!(number_of("gen42"), Some(42));
        for bad in [
            "gen",
            "gen0",
            "gen01",
            "gen+1",
            "gen1x",
            "POLICY",
            "link_gen1",
        ] {
            assert_eq!(number_of(bad), None, "{bad}");
        }
    }

    /// Same sizes, one member renamed: only the BTF tells; without BTF on either side the sizes
    /// decide, and readers ignore capacity.
    #[test]
    fn a_same_size_member_change_is_incompatible_where_both_sides_have_btf() {
        use btf_layout::{Member, Shape};
        let u32_ = Shape::Int {
            size: 4,
            bits: 32,
            signed: false,
        };
        let record = |second: &str| Shape::Record {
            union: false,
            size: 8,
            members: [("policy_id", 0), (second, 32)]
                .map(|(name, offset)| Member {
                    name: name.into(),
                    offset,
                    shape: u32_.clone(),
                })
                .into(),
        };
        let layout = MapLayout {
            map_type: 1,
            key_size: 8,
            value_size: 8,
            max_entries: 16,
            flags: 0,
        };
        let shape = |second: &str, btf: bool| MapShape {
            layout,
            btf: btf.then(|| KeyValue {
                key: u32_.clone(),
                value: record(second),
            }),
        };
        let (old, new) = (shape("_pad1", true), shape("base_id", true));
        assert_eq!(old.incompatible(&old, true), None);
        let why = old.incompatible(&new, true).unwrap();
        assert!(
            why.contains("value") && why.contains("_pad1") && why.contains("base_id"),
            "{why}"
        );
        assert!(
            old.incompatible(&new, false).is_some(),
            "a reader must refuse it too"
        );
        assert_eq!(shape("_pad1", false).incompatible(&new, true), None);
        assert_eq!(old.incompatible(&shape("base_id", false), true), None);
        let mut bigger = new.clone();
        bigger.layout.max_entries = 32;
        assert!(new.incompatible(&bigger, true).is_some());
        assert_eq!(new.incompatible(&bigger, false), None);
        bigger.layout.value_size = 12;
        assert!(
            shape("base_id", false)
                .incompatible(&bigger, false)
                .is_some()
        );
    }

    #[test]
    fn the_expectation_comes_from_the_object() {
        let object = super::super::loader::OBJECT;
        if object.is_empty() {
            // AYA_BUILD_SKIP=1 (clippy): nothing to read.
            return;
        }
        let e = expected(object, Some(8)).unwrap();
        let policy = e[map_names::POLICY].layout;
        assert_eq!(policy.key_size, 8);
        assert_eq!(
            policy.value_size as usize,
            std::mem::size_of::<redirect_common::Policy>()
        );
        assert_eq!(e[map_names::CIDR_V4].layout.max_entries, 8);
        assert_eq!(
            e[map_names::ORIG_TUPLE].layout.max_entries,
            expected(object, None).unwrap()[map_names::ORIG_TUPLE]
                .layout
                .max_entries
        );
        for name in SHARED {
            assert!(e.contains_key(name), "{name} is not a map of the object");
        }
        // The Policy record's members, from the object's BTF, in declaration order.
        let Some(KeyValue {
            value: btf_layout::Shape::Record { members, .. },
            ..
        }) = &e[map_names::POLICY].btf
        else {
            panic!("POLICY has no BTF record: {:?}", e[map_names::POLICY].btf);
        };
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names.last(), Some(&"base_id"), "{names:?}");
        assert_eq!(names.len(), 9, "{names:?}");
    }
}
