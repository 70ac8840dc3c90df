//! What the fake API server checks and parses the way kube-apiserver does: the Event validation
//! rules, field selectors and query strings (tests/tests/kube_support/fake_api.rs).
use std::collections::BTreeMap;

use serde_json::Value;

/// The checks kube-apiserver makes on an events.k8s.io/v1 Event (pkg/apis/core/validation
/// ValidateEventCreate, as 1.36 applies them): the name is a DNS subdomain of at most 253
/// characters; reportingController and reportingInstance at most 128; action and reason at most
/// 128; note at most 1 kB; eventTime, action and reportingInstance set.
pub fn validate_event(ev: &Value) -> Result<(), String> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let name = s(&ev["metadata"]["name"]);
    let subdomain = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !subdomain {
        return Err(format!(
            "Event \"{name}\" is invalid: metadata.name: Invalid value: must be no more than 253 characters and a lowercase RFC 1123 subdomain"
        ));
    }
    for (field, max) in [
        ("reportingController", 128),
        ("reportingInstance", 128),
        ("action", 128),
        ("reason", 128),
        ("note", 1024),
    ] {
        if s(&ev[field]).len() > max {
            return Err(format!(
                "Event \"{name}\" is invalid: {field}: Too long: may not be more than {max} bytes"
            ));
        }
    }
    for field in [
        "eventTime",
        "action",
        "reportingInstance",
        "reportingController",
    ] {
        if ev[field].is_null() {
            return Err(format!(
                "Event \"{name}\" is invalid: {field}: Required value"
            ));
        }
    }
    Ok(())
}

/// Field selectors of the form `a.b=value[,c=value]`.
pub fn matches_selector(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let Some((path, want)) = term.split_once('=') else {
            return true;
        };
        let mut v = obj;
        for part in path.split('.') {
            v = &v[part];
        }
        v.as_str() == Some(want)
    })
}

/// A query string's `key=value` pairs, percent- and `+`-decoded (form encoding, as
/// kube-apiserver reads it).
pub fn url_pairs(q: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}
