//! Rules for the unit tests, sourced as a pod's annotations would source them.
use ipnet::IpNet;

use crate::types::{Origin, PortRange, Source, Sourced};

pub fn src(key: &str) -> Source {
    Source::new(Origin::Pod("demo/app".into()), key)
}

pub fn nets(l: &[&str], key: &str) -> Vec<Sourced<IpNet>> {
    l.iter()
        .map(|s| Sourced {
            value: s.parse().unwrap(),
            source: src(key),
        })
        .collect()
}

pub fn ports(l: &[(u16, u16)], key: &str) -> Vec<Sourced<PortRange>> {
    l.iter()
        .map(|&(lo, hi)| Sourced {
            value: PortRange { lo, hi },
            source: src(key),
        })
        .collect()
}
