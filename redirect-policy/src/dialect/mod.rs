//! Annotation dialects. Each module knows one mesh's keys and value syntax and adds what it finds
//! to a [`Layer`]; none of them knows about precedence.

mod fsm;
mod istio;
mod kuma;
mod linkerd;
mod read;

/// Every annotation key the policy core reads, by dialect.
pub mod keys {
    pub use super::fsm::{FSM_PREFIX, OSM_PREFIX, UNION_KEYS as FSM_KEYS};
    pub use super::istio::keys as istio;
    pub use super::kuma::keys as kuma;
    pub use super::linkerd::keys as linkerd;

    /// True if `key` sets an inbound field: a bad value there fails only the workload's inbound
    /// policy, never its outbound one (`Resolved::inbound_error`).
    pub fn is_inbound_key(key: &str) -> bool {
        [
            istio::INCLUDE_INBOUND_PORTS,
            istio::EXCLUDE_INBOUND_PORTS,
            linkerd::SKIP_INBOUND_PORTS,
            linkerd::SKIP_SUBNETS,
            kuma::EXCLUDE_INBOUND_PORTS,
            kuma::EXCLUDE_INBOUND_IPS,
        ]
        .contains(&key)
            || [FSM_PREFIX, OSM_PREFIX]
                .iter()
                .any(|p| key.strip_prefix(p) == Some(super::fsm::INBOUND_EXCLUDE_PORTS))
    }

    /// True if `key` is an annotation the policy core reads: a watcher can ignore changes to
    /// any other annotation.
    pub fn is_policy_key(key: &str) -> bool {
        let known = [istio::ALL, linkerd::ALL, kuma::ALL];
        known.iter().any(|l| l.contains(&key))
            || crate::dns::keys::ALL.contains(&key)
            || crate::inbound::OWN_PORT_KEYS.contains(&key)
            || [FSM_PREFIX, OSM_PREFIX]
                .iter()
                .any(|p| key.strip_prefix(p).is_some_and(|k| FSM_KEYS.contains(&k)))
    }
}

use super::layer::Layer;
use super::types::{Annotations, Origin, PolicyError};

/// One object's annotations split into (everything else, the inbound keys).
pub(crate) fn split_inbound(annotations: &Annotations) -> (Annotations, Annotations) {
    annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .partition(|(k, _)| !keys::is_inbound_key(k))
}

/// Reads every dialect's keys from one object's annotations. The first bad value fails the whole
/// object: a policy is applied whole or not at all.
pub(crate) fn layer(
    origin: &Origin,
    annotations: &Annotations,
    warnings: &mut Vec<String>,
) -> Result<Layer, PolicyError> {
    let mut layer = Layer::default();
    let mut r = read::Reader::new(origin, annotations, warnings, super::layer::Merge::Override);
    istio::parse(&mut r, &mut layer)?;
    fsm::parse(&mut r, &mut layer)?;
    r.table("", linkerd::TABLE, &mut layer)?;
    r.table("", kuma::TABLE, &mut layer)?;
    Ok(layer)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub fn ann(pairs: &[(&str, &str)]) -> Annotations {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn pod() -> Origin {
        Origin::Pod("demo/app".into())
    }

    /// Parses one object's annotations as a pod.
    pub fn parse(pairs: &[(&str, &str)]) -> Result<Layer, PolicyError> {
        layer(&pod(), &ann(pairs), &mut Vec::new())
    }

    /// Asserts that each (key, value) alone is refused with an error naming the pod, the key and
    /// the bad item (the third element: the item of a list that failed, or the whole value).
    pub fn assert_rejects(cases: &[(&str, &str, &str)]) {
        for &(key, value, named) in cases {
            let e = parse(&[(key, value)]).expect_err(&format!("{key}={value:?} must be refused"));
            assert_names(&e, key, named);
        }
    }

    /// Display forms, for comparing parsed lists with what a user writes.
    pub fn strings<T: ToString>(v: &[T]) -> Vec<String> {
        v.iter().map(T::to_string).collect()
    }

    /// Asserts that the error and its Display name the pod, the key and the value.
    pub fn assert_names(e: &PolicyError, key: &str, value: &str) {
        assert_eq!(e.object, "pod demo/app");
        assert_eq!(e.key, key);
        assert_eq!(e.value, value);
        let s = e.to_string();
        assert!(
            s.contains("pod demo/app") && s.contains(key) && s.contains(&format!("{value:?}")),
            "{s}"
        );
    }
}
