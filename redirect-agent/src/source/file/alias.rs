//! A bound on YAML alias expansion. serde_yaml replays an anchor's events at every alias, and
//! nested aliases multiply: a 562 KB "billion laughs" file took 13 s and 9 GB. [`Budget::walk`]
//! visits the document as serde sees it (aliases expanded), allocating nothing, and fails once
//! more than `limit` nodes have been seen, so the cost of refusing a bomb is bounded too.
use std::cell::Cell;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};

pub struct Budget {
    left: Cell<usize>,
    exhausted: Cell<bool>,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget {
            left: Cell::new(limit),
            exhausted: Cell::new(false),
        }
    }

    /// Walks one document. An error is a syntax error, or the budget running out
    /// ([`Budget::exhausted`] tells which).
    pub fn walk<'de, D: Deserializer<'de>>(&self, d: D) -> Result<(), D::Error> {
        Node(self).deserialize(d)
    }

    pub fn exhausted(&self) -> bool {
        self.exhausted.get()
    }

    fn take<E: de::Error>(&self) -> Result<(), E> {
        match self.left.get().checked_sub(1) {
            Some(n) => {
                self.left.set(n);
                Ok(())
            }
            None => {
                self.exhausted.set(true);
                Err(E::custom("alias expansion limit reached"))
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Node<'a>(&'a Budget);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! scalar {
    ($($name:ident: $ty:ty),*) => {$(
        fn $name<E: de::Error>(self, _: $ty) -> Result<(), E> {
            self.0.take()
        }
    )*};
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML node")
    }

    scalar!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128,
        visit_u128: u128, visit_f64: f64, visit_str: &str, visit_bytes: &[u8]);

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.take()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.0.take()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.take()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.take()?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }

    /// A tagged node (`!tag value`).
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use serde::de::VariantAccess as _;
        self.0.take()?;
        let ((), variant) = data.variant_seed(self)?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(text: &str, limit: usize) -> (bool, bool) {
        let b = Budget::new(limit);
        let ok = b.walk(serde_yaml::Deserializer::from_str(text)).is_ok();
        (ok, b.exhausted())
    }

    /// Nine levels of ten aliases each: 10^9 leaves once expanded.
    fn bomb() -> String {
        let mut s = String::from("a0: &a0 [\"lol\"]\n");
        for i in 1..=9 {
            let refs = vec![format!("*a{}", i - 1); 10].join(",");
            s.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        s
    }

    #[test]
    fn ordinary_aliases_fit_and_a_bomb_stops_at_the_bound() {
        let shared = "common: &c {a: \"1\", b: \"2\"}\nx: *c\ny: *c\n";
        assert_eq!(walk(shared, shared.len() + 4096), (true, false));
        let bomb = bomb();
        assert_eq!(walk(&bomb, bomb.len() + 4096), (false, true));
    }

    #[test]
    fn a_syntax_error_is_not_reported_as_a_bomb() {
        assert_eq!(walk("a: [", 100), (false, false));
    }
}
