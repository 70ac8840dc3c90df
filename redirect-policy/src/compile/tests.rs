use super::*;
use crate::types::{Action, Origin, Source};

fn src() -> Source {
    Source::new(Origin::Default, "test")
}

fn nets(l: &[&str]) -> Vec<Sourced<IpNet>> {
    l.iter()
        .map(|s| Sourced {
            value: s.parse().unwrap(),
            source: src(),
        })
        .collect()
}

fn v4(c: &Compiled) -> Vec<String> {
    c.v4.iter().map(|(n, a)| format!("{n} {a:?}")).collect()
}

fn policy(ex: &[&str], inc: &[&str]) -> EffectivePolicy {
    EffectivePolicy {
        enabled: true,
        exclude_cidrs: nets(ex),
        include_cidrs: nets(inc),
        ..Default::default()
    }
}

#[test]
fn range_prefixes_are_minimal_and_exact() {
    let r = |lo, hi| range_prefixes(&PortRange { lo, hi });
    assert_eq!(r(80, 80), vec![Prefix { bits: 80, len: 16 }]);
    assert_eq!(r(1, 65535).len(), 16);
    // 8000-8063, 8064-8191, 8192-8703, 8704-8959, 8960-8991, 8992-8999.
    assert_eq!(r(8000, 8999).len(), 6);
    for (lo, hi) in [
        (1u16, 65535u16),
        (1, 1),
        (65535, 65535),
        (1000, 1999),
        (3, 17),
    ] {
        let ps = r(lo, hi);
        for port in 0..=65535u16 {
            let hits = ps
                .iter()
                .filter(|p| {
                    PortPrefix {
                        port: p.bits as u16,
                        len: p.len,
                    }
                    .contains(port)
                })
                .count();
            assert_eq!(
                hits,
                usize::from((lo..=hi).contains(&port)),
                "{lo}-{hi} {port}"
            );
        }
    }
}

#[test]
fn exclude_beats_nested_include() {
    let c = compile(&policy(&["10.0.0.0/8"], &["10.1.0.0/16"]));
    assert_eq!(v4(&c), vec!["10.0.0.0/8 Exclude"]);
    // Include around an exclude: both entries needed.
    let c = compile(&policy(&["10.1.0.0/16"], &["10.0.0.0/8"]));
    assert_eq!(v4(&c), vec!["10.0.0.0/8 Include", "10.1.0.0/16 Exclude"]);
}

#[test]
fn merges_duplicates_overlaps_and_siblings() {
    let c = compile(&policy(
        &["10.0.0.0/9", "10.128.0.0/9", "10.1.0.0/16", "10.0.0.0/9"],
        &[],
    ));
    assert_eq!(v4(&c), vec!["10.0.0.0/8 Exclude"]);
    let c = compile(&policy(&[], &["0.0.0.0/0", "1.0.0.0/8"]));
    assert_eq!(v4(&c), vec!["0.0.0.0/0 Include"]);
    assert!(c.v6.is_empty());
}

#[test]
fn uses_the_cheaper_cover() {
    // Three of four /10 quarters of 10/8 included, one excluded: one /8 include plus one exclude
    // beats three includes.
    let c = compile(&policy(
        &["10.192.0.0/10"],
        &["10.0.0.0/10", "10.64.0.0/10", "10.128.0.0/10"],
    ));
    assert_eq!(v4(&c), vec!["10.0.0.0/8 Include", "10.192.0.0/10 Exclude"]);
}

#[test]
fn ports_exclude_beats_include() {
    let p = EffectivePolicy {
        enabled: true,
        exclude_ports: vec![Sourced {
            value: PortRange { lo: 8080, hi: 8080 },
            source: src(),
        }],
        include_ports: vec![Sourced {
            value: PortRange { lo: 8000, hi: 8999 },
            source: src(),
        }],
        ..Default::default()
    };
    let c = compile(&p);
    let look = |port| crate::lookup_port(&c, port);
    assert_eq!(look(8080), Some(Action::Exclude));
    assert_eq!(look(8081), Some(Action::Include));
    assert_eq!(look(7999), None);
    assert_eq!(look(9000), None);
}

/// Exhaustive minimality on 2-bit keys: every table of the 7 prefixes, with every assignment of
/// nothing / exclude / include, against the compiler's size for the function that table computes.
#[test]
fn minimal_on_all_two_bit_functions() {
    let prefixes: Vec<Prefix> = (0..=2u8)
        .flat_map(|len| {
            (0..(1u128 << len)).map(move |v| Prefix {
                bits: v << (2 - len),
                len,
            })
        })
        .collect();
    let answer = |table: &[(Prefix, Action)], key: u128| {
        table
            .iter()
            .filter(|(p, _)| p.len == 0 || (key >> (2 - p.len)) == (p.bits >> (2 - p.len)))
            .max_by_key(|(p, _)| p.len)
            .map(|(_, a)| *a)
    };
    let mut best = std::collections::HashMap::<Vec<Option<Action>>, usize>::new();
    for mut code in 0..3usize.pow(7) {
        let mut table = Vec::new();
        for p in &prefixes {
            match code % 3 {
                1 => table.push((*p, Action::Exclude)),
                2 => table.push((*p, Action::Include)),
                _ => {}
            }
            code /= 3;
        }
        let f: Vec<_> = (0..4).map(|k| answer(&table, k)).collect();
        let e = best.entry(f).or_insert(usize::MAX);
        *e = (*e).min(table.len());
    }
    assert_eq!(best.len(), 81);
    for (f, size) in best {
        let pick = |a| -> Vec<Prefix> {
            (0..4u128)
                .filter(|k| f[*k as usize] == Some(a))
                .map(|k| Prefix { bits: k, len: 2 })
                .collect()
        };
        let table = trie::minimal(2, &pick(Action::Exclude), &pick(Action::Include));
        let got: Vec<_> = (0..4).map(|k| answer(&table, k)).collect();
        assert_eq!(got, f);
        assert_eq!(table.len(), size, "{f:?}: {table:?}");
    }
}

/// Thousands of adjacent host routes collapse to one prefix (and compile without blowing up).
#[test]
fn many_adjacent_hosts_merge() {
    let hosts: Vec<String> = (0..4096u32)
        .map(|i| format!("{}/32", std::net::Ipv4Addr::from(0x0a00_0000 + i)))
        .collect();
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let c = compile(&policy(&hosts, &["0.0.0.0/0"]));
    assert_eq!(v4(&c), vec!["0.0.0.0/0 Include", "10.0.0.0/20 Exclude"]);
    let v6: Vec<String> = (0..2048u128)
        .map(|i| format!("{}/128", std::net::Ipv6Addr::from((0xfd00u128 << 112) + i)))
        .collect();
    let v6: Vec<&str> = v6.iter().map(String::as_str).collect();
    let c = compile(&policy(&[], &v6));
    assert_eq!(c.v6.len(), 1);
    assert_eq!(c.v6[0].0.to_string(), "fd00::/117");
}
