//! The rule tries, one writer for all six: the outbound ones (CIDR_V4, CIDR_V6, PORTS) and the
//! inbound ones (IN_SRC_V4, IN_SRC_V6, IN_PORTS) share key layouts and differ only in their
//! policy-id space. A key is {prefix length counting the 32 policy-id bits, policy id, address
//! or port} (docs/architecture.md, "Maps").
use std::{collections::BTreeMap, path::Path};

use aya::maps::{LpmTrie, MapData, lpm_trie::Key as LpmKey};
use redirect_common::{CidrV4Key, CidrV6Key, POLICY_ID_BITS, PortKey, Rule};

use super::{BpfError, PolicyEntries, maps::open};

/// One trie's key type: how its data part is built from and split into (policy id, address or
/// port), and which part of [`PolicyEntries`] it holds.
pub trait TrieKey: aya::Pod {
    /// The address or port, as `PolicyEntries` keys it.
    type Raw: Copy + Ord;
    /// Prefix bits of a full-length lookup, after the policy id.
    const FULL_BITS: u32;
    fn new(policy_id: [u8; 4], raw: Self::Raw) -> Self;
    fn parts(&self) -> ([u8; 4], Self::Raw);
    fn of(e: &PolicyEntries) -> &BTreeMap<(u32, Self::Raw), u32>;
    fn of_mut(e: &mut PolicyEntries) -> &mut BTreeMap<(u32, Self::Raw), u32>;
}

/// The address keys differ only in the address's width and their field of `PolicyEntries`.
macro_rules! addr_key {
    ($key:ident, $bytes:literal, $field:ident) => {
        impl TrieKey for $key {
            type Raw = [u8; $bytes];
            const FULL_BITS: u32 = $bytes * 8;
            fn new(policy_id: [u8; 4], addr: [u8; $bytes]) -> Self {
                $key { policy_id, addr }
            }
            fn parts(&self) -> ([u8; 4], [u8; $bytes]) {
                (self.policy_id, self.addr)
            }
            fn of(e: &PolicyEntries) -> &BTreeMap<(u32, [u8; $bytes]), u32> {
                &e.$field
            }
            fn of_mut(e: &mut PolicyEntries) -> &mut BTreeMap<(u32, [u8; $bytes]), u32> {
                &mut e.$field
            }
        }
    };
}

addr_key!(CidrV4Key, 4, v4);
addr_key!(CidrV6Key, 16, v6);

impl TrieKey for PortKey {
    type Raw = u16;
    const FULL_BITS: u32 = 16;
    fn new(policy_id: [u8; 4], port: u16) -> Self {
        PortKey {
            policy_id,
            port: port.to_be_bytes(),
            _pad: [0; 2],
        }
    }
    fn parts(&self) -> ([u8; 4], u16) {
        (self.policy_id, u16::from_be_bytes(self.port))
    }
    fn of(e: &PolicyEntries) -> &BTreeMap<(u32, u16), u32> {
        &e.ports
    }
    fn of_mut(e: &mut PolicyEntries) -> &mut BTreeMap<(u32, u16), u32> {
        &mut e.ports
    }
}

/// One pinned trie and the name errors carry.
pub struct Trie<K: TrieKey> {
    map: LpmTrie<MapData, K, Rule>,
    name: &'static str,
}

impl<K: TrieKey> Trie<K> {
    fn open(dir: &Path, name: &'static str) -> Result<Self, BpfError> {
        Ok(Self {
            map: open(dir, name)?,
            name,
        })
    }

    fn key(id: u32, bits: u32, raw: K::Raw) -> LpmKey<K> {
        LpmKey::new(POLICY_ID_BITS + bits, K::new(id.to_be_bytes(), raw))
    }

    fn read_into(&self, out: &mut BTreeMap<u32, PolicyEntries>) -> Result<(), BpfError> {
        for item in self.map.iter() {
            let (k, v) = item.map_err(|e| BpfError::map(self.name, e))?;
            let (id, raw) = k.data().parts();
            let bits = k.prefix_len() - POLICY_ID_BITS;
            K::of_mut(out.entry(u32::from_be_bytes(id)).or_default()).insert((bits, raw), v.action);
        }
        Ok(())
    }

    /// Writes this trie's part of `e`, noting each entry written in `done`.
    fn insert(
        &mut self,
        id: u32,
        e: &PolicyEntries,
        done: &mut PolicyEntries,
    ) -> Result<(), BpfError> {
        for (&(bits, raw), &action) in K::of(e) {
            self.map
                .insert(&Self::key(id, bits, raw), Rule { action }, 0)
                .map_err(|err| BpfError::map(self.name, err))?;
            K::of_mut(done).insert((bits, raw), action);
        }
        Ok(())
    }

    /// Best effort: an entry that is already gone is not an error.
    fn remove(&mut self, id: u32, e: &PolicyEntries) {
        for &(bits, raw) in K::of(e).keys() {
            let _ = self.map.remove(&Self::key(id, bits, raw));
        }
    }

    /// A full-length longest-prefix lookup, exactly as the kernel programs make it.
    fn lookup(&self, id: u32, raw: K::Raw) -> Option<u32> {
        self.map
            .get(&Self::key(id, K::FULL_BITS, raw), 0)
            .ok()
            .map(|r| r.action)
    }
}

/// The three tries of one direction.
pub struct RuleTries {
    pub v4: Trie<CidrV4Key>,
    pub v6: Trie<CidrV6Key>,
    pub ports: Trie<PortKey>,
}

impl RuleTries {
    /// Opens the pinned tries named `[v4, v6, ports]` under `dir`.
    pub fn open(dir: &Path, [v4, v6, ports]: [&'static str; 3]) -> Result<Self, BpfError> {
        Ok(Self {
            v4: Trie::open(dir, v4)?,
            v6: Trie::open(dir, v6)?,
            ports: Trie::open(dir, ports)?,
        })
    }

    /// Every entry, grouped by policy id.
    pub fn entries(&self) -> Result<BTreeMap<u32, PolicyEntries>, BpfError> {
        let mut out = BTreeMap::new();
        self.v4.read_into(&mut out)?;
        self.v6.read_into(&mut out)?;
        self.ports.read_into(&mut out)?;
        Ok(out)
    }

    /// Writes all of a policy's entries. On failure (a full map, typically) the entries written
    /// so far are removed again, so a policy lands whole or not at all.
    pub fn insert_entries(&mut self, id: u32, e: &PolicyEntries) -> Result<(), BpfError> {
        let mut done = PolicyEntries::default();
        let result = self
            .v4
            .insert(id, e, &mut done)
            .and_then(|()| self.v6.insert(id, e, &mut done))
            .and_then(|()| self.ports.insert(id, e, &mut done));
        if result.is_err() {
            self.remove_entries(id, &done);
        }
        result
    }

    /// Best effort: an entry that is already gone is not an error.
    pub fn remove_entries(&mut self, id: u32, e: &PolicyEntries) {
        self.v4.remove(id, e);
        self.v6.remove(id, e);
        self.ports.remove(id, e);
    }

    /// Longest-prefix lookups exactly as the kernel programs make them (the kernel answers), for
    /// `explain --bpffs-dir`.
    pub fn lookup_port(&self, id: u32, port: u16) -> Option<u32> {
        self.ports.lookup(id, port)
    }

    pub fn lookup_v4(&self, id: u32, addr: [u8; 4]) -> Option<u32> {
        self.v4.lookup(id, addr)
    }

    pub fn lookup_v6(&self, id: u32, addr: [u8; 16]) -> Option<u32> {
        self.v6.lookup(id, addr)
    }
}

/// `Deref` to the `RuleTries` field `tries`: the rule tries' reads and writes (`entries`,
/// `insert_entries`, `lookup_port`, …) are `RuleTries`' own, for the outbound and the inbound
/// maps alike.
macro_rules! deref_to_tries {
    ($maps:ty) => {
        impl std::ops::Deref for $maps {
            type Target = $crate::bpf::tries::RuleTries;
            fn deref(&self) -> &Self::Target {
                &self.tries
            }
        }

        impl std::ops::DerefMut for $maps {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.tries
            }
        }
    };
}
pub(crate) use deref_to_tries;
