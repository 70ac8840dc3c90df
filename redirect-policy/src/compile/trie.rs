//! The smallest longest-prefix-match table for "exclude if in any exclude prefix, else include if
//! in any include prefix, else no match", over keys of a fixed width (32, 128 or 16 bits).
//!
//! This is ORTC (Draves et al., "Constructing optimal IP routing tables") with three values, one of
//! which ("no match") can only be had by *not* being covered by any entry: an LPM table has no
//! entry that means "nothing". A dynamic programme over the binary trie of the input prefixes
//! computes, for every node and every value inherited from above, the fewest entries its subtree
//! needs; the table it rebuilds is therefore minimal, which subsumes merging duplicates, overlaps
//! and sibling pairs, dropping entries shadowed by an equal shorter one, and dropping includes
//! nested in an exclude.

use crate::types::Action;

/// A prefix of a `width`-bit key: `bits` is the key value (right-aligned in `width`) with every
/// bit after the first `len` cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Prefix {
    pub bits: u128,
    pub len: u8,
}

/// What a key maps to. The index is the position in the cost arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Val {
    NoMatch = 0,
    Exclude = 1,
    Include = 2,
}

const VALS: [Val; 3] = [Val::NoMatch, Val::Exclude, Val::Include];
/// Cost of an impossible subtree (one that must answer "no match" under a covering entry).
const INF: u32 = 1 << 30;

#[derive(Default)]
struct Node {
    child: [Option<usize>; 2],
    exclude: bool,
    include: bool,
    /// Fewest entries for this subtree, by the value inherited from the nearest entry above.
    cost: [u32; 3],
}

struct Trie {
    width: u8,
    nodes: Vec<Node>,
}

/// Entries of the minimal table, in trie pre-order.
pub(crate) fn minimal(width: u8, exclude: &[Prefix], include: &[Prefix]) -> Vec<(Prefix, Action)> {
    let mut t = Trie {
        width,
        nodes: vec![Node::default()],
    };
    for p in exclude {
        t.insert(*p).exclude = true;
    }
    for p in include {
        t.insert(*p).include = true;
    }
    let root_val = t.value(0, Val::NoMatch);
    t.solve(0, root_val);
    let mut out = Vec::new();
    let root = Prefix { bits: 0, len: 0 };
    t.emit(0, root, root_val, Val::NoMatch, &mut out);
    out
}

/// Cost of a region that maps uniformly to `f` when `inherited` is what covers it.
fn leaf_cost(f: Val, inherited: Val) -> u32 {
    if f == inherited {
        0
    } else if f == Val::NoMatch {
        INF
    } else {
        1
    }
}

fn leaf_costs(f: Val) -> [u32; 3] {
    VALS.map(|c| leaf_cost(f, c))
}

impl Trie {
    fn insert(&mut self, p: Prefix) -> &mut Node {
        let len = p.len.min(self.width);
        let mut n = 0;
        for depth in 0..len {
            let bit = ((p.bits >> (self.width - 1 - depth)) & 1) as usize;
            n = match self.nodes[n].child[bit] {
                Some(c) => c,
                None => {
                    self.nodes.push(Node::default());
                    let c = self.nodes.len() - 1;
                    self.nodes[n].child[bit] = Some(c);
                    c
                }
            };
        }
        &mut self.nodes[n]
    }

    /// The function's value on node `n`'s whole region, given its parent's value: an exclude
    /// anywhere on the path wins, then an include.
    fn value(&self, n: usize, parent: Val) -> Val {
        let node = &self.nodes[n];
        if parent == Val::Exclude || node.exclude {
            Val::Exclude
        } else if parent == Val::Include || node.include {
            Val::Include
        } else {
            Val::NoMatch
        }
    }

    /// A subtree is uniform if it has no children, or if it is excluded as a whole.
    fn is_leaf(&self, n: usize, val: Val) -> bool {
        val == Val::Exclude || self.nodes[n].child.iter().all(Option::is_none)
    }

    /// Cost arrays of both halves of node `n` (a missing child is a uniform region of `val`).
    fn halves(&self, n: usize, val: Val) -> [[u32; 3]; 2] {
        self.nodes[n].child.map(|c| match c {
            Some(c) => self.nodes[c].cost,
            None => leaf_costs(val),
        })
    }

    fn solve(&mut self, n: usize, val: Val) {
        if self.is_leaf(n, val) {
            self.nodes[n].cost = leaf_costs(val);
            return;
        }
        for c in self.nodes[n].child.into_iter().flatten() {
            let v = self.value(c, val);
            self.solve(c, v);
        }
        let [l, r] = self.halves(n, val);
        let put = |d: Val| 1 + l[d as usize] + r[d as usize];
        let best_put = put(Val::Exclude).min(put(Val::Include));
        self.nodes[n].cost = VALS.map(|c| (l[c as usize] + r[c as usize]).min(best_put).min(INF));
    }

    /// Rebuilds the table that achieves `cost[inherited]` for node `n` at prefix `p`.
    fn emit(&self, n: usize, p: Prefix, val: Val, inherited: Val, out: &mut Vec<(Prefix, Action)>) {
        if self.is_leaf(n, val) {
            emit_leaf(p, val, inherited, out);
            return;
        }
        let [l, r] = self.halves(n, val);
        let keep = l[inherited as usize] + r[inherited as usize];
        let put = |d: Val| 1 + l[d as usize] + r[d as usize];
        let mut below = inherited;
        // Prefer no entry on ties: fewer entries high up means fewer updates when lists change.
        if keep > put(Val::Exclude).min(put(Val::Include)) {
            below = if put(Val::Exclude) <= put(Val::Include) {
                Val::Exclude
            } else {
                Val::Include
            };
            out.push((p, action(below)));
        }
        for (bit, c) in self.nodes[n].child.iter().enumerate() {
            let cp = Prefix {
                bits: p.bits | ((bit as u128) << (self.width - 1 - p.len)),
                len: p.len + 1,
            };
            match c {
                Some(c) => self.emit(*c, cp, self.value(*c, val), below, out),
                None => emit_leaf(cp, val, below, out),
            }
        }
    }
}

fn emit_leaf(p: Prefix, val: Val, inherited: Val, out: &mut Vec<(Prefix, Action)>) {
    // val == NoMatch under a covering entry cannot happen: the costs make it INF and the root
    // inherits NoMatch, so the minimum never chooses it.
    if val != inherited && val != Val::NoMatch {
        out.push((p, action(val)));
    }
}

fn action(v: Val) -> Action {
    match v {
        Val::Include => Action::Include,
        _ => Action::Exclude,
    }
}
