//! Layered CIDR tables, so that workloads whose policy is their mesh default plus a few extras
//! share the mesh default's entries (docs/architecture.md, "Shared policies").
//!
//! A workload's *overlay* is looked up first, under its own policy id; where the overlay has no
//! entry the lookup falls back to the *base* table (the mesh default's, under its shared id). An
//! overlay entry can also say [`Layered::Stop`]: "no rule here, and do not fall back", for the
//! places where the workload's own table has no match but the base has one. The overlay is built
//! so that this two-step lookup answers exactly what the workload's own full table answers, for
//! every address; the property test in this module holds it to that.

use super::trie::Prefix;
use crate::types::Action;

/// The value of an overlay entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layered {
    Rule(Action),
    /// No rule for this address, whatever the base says.
    Stop,
}

impl Layered {
    fn of(a: Option<Action>) -> Self {
        a.map_or(Layered::Stop, Layered::Rule)
    }

    /// The map value the kernel program reads (`redirect_common::action`).
    pub fn value(self) -> u32 {
        match self {
            Layered::Rule(a) => a.value(),
            Layered::Stop => redirect_common::action::STOP,
        }
    }
}

/// The walk over the address space: entries emitted so far.
struct Walk {
    width: u8,
    out: Vec<(Prefix, Layered)>,
}

/// True when `inner` lies inside `outer` (or is `outer`).
fn within(outer: Prefix, inner: Prefix, width: u8) -> bool {
    if inner.len < outer.len {
        return false;
    }
    let shift = u32::from(width - outer.len);
    outer.len == 0 || (inner.bits >> shift) == (outer.bits >> shift)
}

/// The overlay of `own` over `base` (both full tables of one family, `width` 32 or 128).
pub(crate) fn overlay(
    width: u8,
    own: &[(Prefix, Action)],
    base: &[(Prefix, Action)],
) -> Vec<(Prefix, Layered)> {
    let mut own: Vec<_> = own.to_vec();
    let mut base: Vec<_> = base.to_vec();
    own.sort_unstable();
    base.sort_unstable();
    let mut w = Walk {
        width,
        out: Vec::new(),
    };
    let root = Prefix { bits: 0, len: 0 };
    w.node(root, &own, &base, None, None);
    w.out
}

impl Walk {
    /// `own`/`base`: the entries inside `p` (including one at `p` itself); `*_cover`: the value of
    /// the longest entry strictly above `p`. Entries are only ever emitted for regions where both
    /// tables are uniform, so no overlay entry covers another, and none covers `p` here.
    fn node(
        &mut self,
        p: Prefix,
        own: &[(Prefix, Action)],
        base: &[(Prefix, Action)],
        own_cover: Option<Action>,
        base_cover: Option<Action>,
    ) {
        let at = |l: &[(Prefix, Action)]| l.iter().find(|(q, _)| *q == p).map(|(_, a)| *a);
        let own_cover = at(own).or(own_cover);
        let base_cover = at(base).or(base_cover);
        let nested = |l: &[(Prefix, Action)]| l.iter().any(|(q, _)| q.len > p.len);
        // Identical below and above: the base answers exactly what the workload's own table does.
        if own_cover == base_cover && own == base {
            return;
        }
        if !nested(own) && !nested(base) || p.len == self.width {
            let want = Layered::of(own_cover);
            if want != Layered::of(base_cover) {
                self.out.push((p, want));
            }
            return;
        }
        for bit in 0..2u128 {
            let child = Prefix {
                bits: p.bits | (bit << (self.width - 1 - p.len)),
                len: p.len + 1,
            };
            let inside = |l: &[(Prefix, Action)]| -> Vec<(Prefix, Action)> {
                l.iter()
                    .filter(|(q, _)| within(child, *q, self.width))
                    .copied()
                    .collect()
            };
            let (o, b) = (inside(own), inside(base));
            self.node(child, &o, &b, own_cover, base_cover);
        }
    }
}

/// Longest-prefix match in a table.
#[cfg(test)]
fn lookup<T: Copy>(table: &[(Prefix, T)], key: u128, width: u8) -> Option<T> {
    let leaf = Prefix {
        bits: key,
        len: width,
    };
    table
        .iter()
        .filter(|(p, _)| within(*p, leaf, width))
        .max_by_key(|(p, _)| p.len)
        .map(|(_, v)| *v)
}

/// The kernel's two-step lookup: the overlay, then the base where the overlay has no entry.
#[cfg(test)]
fn lookup_layered(
    overlay: &[(Prefix, Layered)],
    base: &[(Prefix, Action)],
    key: u128,
    width: u8,
) -> Option<Action> {
    match lookup(overlay, key, width) {
        Some(Layered::Rule(a)) => Some(a),
        Some(Layered::Stop) => None,
        None => lookup(base, key, width),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::trie::minimal;
    use super::*;

    const W: u8 = 8;

    fn prefix(bits: u8, len: u8) -> Prefix {
        let len = len % (W + 1);
        let mask = if len == 0 { 0 } else { u8::MAX << (W - len) };
        Prefix {
            bits: u128::from(bits & mask),
            len,
        }
    }

    fn prefixes() -> impl Strategy<Value = Vec<Prefix>> {
        prop::collection::vec((any::<u8>(), 0u8..=W).prop_map(|(b, l)| prefix(b, l)), 0..6)
    }

    /// A table from exclude and include lists, as `compile` builds them.
    fn table(excl: &[Prefix], incl: &[Prefix]) -> Vec<(Prefix, Action)> {
        minimal(W, excl, incl)
    }

    proptest! {
        /// Over an 8-bit space, every key: overlay-then-base answers what the own table does.
        #[test]
        fn layered_lookup_equals_the_own_table(
            base_excl in prefixes(), base_incl in prefixes(),
            extra_excl in prefixes(), extra_incl in prefixes(),
            replace in any::<bool>(),
        ) {
            let base = table(&base_excl, &base_incl);
            // The workload's own policy: the base plus extras, or (an override) only its own.
            let (oe, oi) = if replace {
                (extra_excl.clone(), extra_incl.clone())
            } else {
                ([base_excl.clone(), extra_excl].concat(), [base_incl.clone(), extra_incl].concat())
            };
            let own = table(&oe, &oi);
            let o = overlay(W, &own, &base);
            for key in 0..=u128::from(u8::MAX) {
                prop_assert_eq!(
                    lookup_layered(&o, &base, key, W),
                    lookup(&own, key, W),
                    "key {} own {:?} base {:?} overlay {:?}", key, own, base, o
                );
            }
            // Same policy: nothing of its own.
            prop_assert!(overlay(W, &base, &base).is_empty());
        }
    }

    /// The case the layering is for: a large shared list plus one extra exclusion costs one entry.
    #[test]
    fn one_extra_exclusion_is_one_entry() {
        let base_excl: Vec<Prefix> = (0..200u32)
            .map(|i| Prefix {
                bits: u128::from(0x0a00_0000u32 | (i << 8)),
                len: 24,
            })
            .collect();
        let all = [Prefix { bits: 0, len: 0 }];
        let base = minimal(32, &base_excl, &all);
        let extra = Prefix {
            bits: u128::from(0xc0a8_0000u32),
            len: 16,
        };
        let own = minimal(32, &[base_excl.clone(), vec![extra]].concat(), &all);
        let o = overlay(32, &own, &base);
        assert_eq!(o, vec![(extra, Layered::Rule(Action::Exclude))]);
    }
}
