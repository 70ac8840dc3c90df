//! The scenario files (`scenarios/*.yaml`, embedded), shared by `e2e-kind` and `e2e-local`.
//!
//! A scenario names the client pod's namespace (with annotations), optionally the FSM MeshConfig's
//! `spec.traffic` at the start, and a list of steps. Each step does exactly one thing:
//!
//! | key | what |
//! |---|---|
//! | `say` | prints a line (the narrative of the demo it comes from) |
//! | `meshConfig` | sets MeshConfig `spec.traffic` (what `kubectl patch meshconfig` does) |
//! | `podAnnotations` / `namespaceAnnotations` | sets (or with `null` removes) annotations on the running objects |
//! | `expect` | connects from the client pod until every line holds (the agent applies asynchronously) |
//! | `expectNow` | the same, but every line must hold on the first try |
//! | `expectInbound` | connects into the client pod (to its address, from outside it) until every line holds: `via: app` (direct) or `proxy` |
//! | `expectEvent` | waits for an Event on the client pod with this reason and text |
//! | `restartAgentDuringLoop` | loops connects from the pod while the agent is replaced; counts them |
//!
//! Strings may use `{{api}}`, `{{db}}`, `{{external}}` (destination addresses) and
//! `{{cluster_cidr}}`; each runner supplies its own values. In `to:` a destination may also be
//! named directly (`db:5432`).
use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use serde_json::Value;

/// The scenario files, in order.
const FILES: [(&str, &str); 6] = [
    (
        "1-fsm-000-ip-range-exclusion.yaml",
        include_str!("scenarios/1-fsm-000-ip-range-exclusion.yaml"),
    ),
    (
        "2-asm-003-pod-over-namespace.yaml",
        include_str!("scenarios/2-asm-003-pod-over-namespace.yaml"),
    ),
    (
        "3-istio-001-include-ranges.yaml",
        include_str!("scenarios/3-istio-001-include-ranges.yaml"),
    ),
    (
        "4-bad-annotation.yaml",
        include_str!("scenarios/4-bad-annotation.yaml"),
    ),
    (
        "5-agent-rollout.yaml",
        include_str!("scenarios/5-agent-rollout.yaml"),
    ),
    (
        "6-asm-003-exclude-inbound-ports.yaml",
        include_str!("scenarios/6-asm-003-exclude-inbound-ports.yaml"),
    ),
];

/// Destination names and CIDRs a runner provides for the `{{...}}` placeholders.
pub type Vars = BTreeMap<String, String>;

/// The placeholders every runner must define.
pub const VAR_NAMES: [&str; 4] = ["api", "db", "external", "cluster_cidr"];

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub title: String,
    /// The seed document it follows (informational).
    #[serde(default)]
    pub seed: Option<String>,
    pub namespace: NamespaceSpec,
    #[serde(default)]
    pub pod: PodSpec,
    /// MeshConfig `spec.traffic` at the start; none means no MeshConfig object.
    #[serde(default)]
    pub mesh_config: Option<Value>,
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Annotation changes: a value sets the key, `null` removes it.
pub type AnnotationPatch = BTreeMap<String, Option<String>>;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    pub say: Option<String>,
    pub mesh_config: Option<Value>,
    pub pod_annotations: Option<AnnotationPatch>,
    pub namespace_annotations: Option<AnnotationPatch>,
    pub expect: Option<Vec<Expect>>,
    pub expect_now: Option<Vec<Expect>>,
    pub expect_inbound: Option<Vec<InboundExpect>>,
    pub expect_event: Option<ExpectEvent>,
    pub restart_agent_during_loop: Option<Loop>,
}

/// One step, checked to hold exactly one action.
pub enum Action<'a> {
    Say(&'a str),
    MeshConfig(&'a Value),
    PodAnnotations(&'a AnnotationPatch),
    NamespaceAnnotations(&'a AnnotationPatch),
    Expect { lines: &'a [Expect], wait: bool },
    ExpectInbound(&'a [InboundExpect]),
    ExpectEvent(&'a ExpectEvent),
    RestartAgentDuringLoop(&'a Loop),
}

impl Step {
    pub fn action(&self) -> Result<Action<'_>> {
        let mut found = Vec::new();
        if let Some(s) = &self.say {
            found.push(Action::Say(s));
        }
        if let Some(v) = &self.mesh_config {
            found.push(Action::MeshConfig(v));
        }
        if let Some(p) = &self.pod_annotations {
            found.push(Action::PodAnnotations(p));
        }
        if let Some(p) = &self.namespace_annotations {
            found.push(Action::NamespaceAnnotations(p));
        }
        if let Some(e) = &self.expect {
            found.push(Action::Expect {
                lines: e,
                wait: true,
            });
        }
        if let Some(e) = &self.expect_now {
            found.push(Action::Expect {
                lines: e,
                wait: false,
            });
        }
        if let Some(e) = &self.expect_inbound {
            found.push(Action::ExpectInbound(e));
        }
        if let Some(e) = &self.expect_event {
            found.push(Action::ExpectEvent(e));
        }
        if let Some(l) = &self.restart_agent_during_loop {
            found.push(Action::RestartAgentDuringLoop(l));
        }
        if found.len() != 1 {
            bail!(
                "a step must hold exactly one action, this one holds {}",
                found.len()
            );
        }
        Ok(found.remove(0))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Proxy,
    /// Not through the proxy: to the destination itself, or inbound to the app (`app`).
    #[serde(alias = "app")]
    Direct,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// `name:port` (a destination name) or `ip:port`.
    pub to: String,
    pub via: Via,
}

/// An inbound connection to the client pod's own address on `port`, made from outside the pod.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundExpect {
    pub port: u16,
    pub via: Via,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectEvent {
    pub reason: String,
    #[serde(default)]
    pub contains: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Loop {
    pub to: String,
    pub via: Via,
    /// Connections that must have happened before the agent is replaced...
    pub before: usize,
    /// ...and after its replacement is ready.
    pub after: usize,
}

/// All scenarios with `vars` filled in, optionally only those whose name contains `filter`.
pub fn load(vars: &Vars, filter: Option<&str>) -> Result<Vec<Scenario>> {
    for v in VAR_NAMES {
        if !vars.contains_key(v) {
            bail!("the runner defines no value for {{{{{v}}}}}");
        }
    }
    let mut out = Vec::new();
    for (file, text) in FILES {
        let s = parse(text, vars).with_context(|| format!("scenario {file}"))?;
        if filter.is_none_or(|f| s.name.contains(f)) {
            out.push(s);
        }
    }
    if out.is_empty() {
        bail!("no scenario matches {:?}", filter.unwrap_or(""));
    }
    Ok(out)
}

fn parse(text: &str, vars: &Vars) -> Result<Scenario> {
    let yaml: serde_yaml::Value = serde_yaml::from_str(text)?;
    let mut json = serde_json::to_value(yaml)?;
    substitute(&mut json, vars)?;
    let s: Scenario = serde_json::from_value(json)?;
    for (i, step) in s.steps.iter().enumerate() {
        step.action().with_context(|| format!("step {}", i + 1))?;
    }
    Ok(s)
}

/// Replaces `{{name}}` in every string (keys included).
fn substitute(v: &mut Value, vars: &Vars) -> Result<()> {
    match v {
        Value::String(s) => *s = fill(s, vars)?,
        Value::Array(a) => {
            for x in a {
                substitute(x, vars)?;
            }
        }
        Value::Object(m) => {
            let old = std::mem::take(m);
            for (k, mut x) in old {
                substitute(&mut x, vars)?;
                m.insert(fill(&k, vars)?, x);
            }
        }
        _ => {}
    }
    Ok(())
}

fn fill(s: &str, vars: &Vars) -> Result<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .with_context(|| format!("unclosed {{{{ in {s:?}"))?;
        let name = after[..end].trim();
        let value = vars
            .get(name)
            .with_context(|| format!("unknown placeholder {{{{{name}}}}} in {s:?}"))?;
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The destinations of e2e-local (addresses on its netns's `lo`: `api` and `db` in the "cluster
/// range", `external` outside it), also used by the unit tests here.
pub fn local_vars() -> Vars {
    [
        ("api", "198.18.0.10"),
        ("db", "198.18.0.11"),
        ("external", "198.19.0.10"),
        ("cluster_cidr", "198.18.0.0/16"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `db:5432` or `198.18.0.11:5432` → a socket address.
pub fn resolve(to: &str, vars: &Vars) -> Result<SocketAddr> {
    if let Ok(a) = to.parse() {
        return Ok(a);
    }
    let (name, port) = to
        .rsplit_once(':')
        .with_context(|| format!("destination {to:?}: expected name:port or ip:port"))?;
    let ip = vars
        .get(name)
        .with_context(|| format!("destination {to:?}: unknown name {name:?}"))?;
    format!("{ip}:{port}")
        .parse()
        .with_context(|| format!("destination {to:?} → {ip}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        local_vars()
    }

    #[test]
    fn every_scenario_parses_and_has_one_action_per_step() {
        let all = load(&vars(), None).unwrap();
        assert_eq!(all.len(), FILES.len());
        let fsm = &all[0];
        let patch = fsm
            .steps
            .iter()
            .find_map(|s| s.mesh_config.as_ref())
            .unwrap();
        assert_eq!(patch["outboundIPRangeExclusionList"][0], "198.18.0.11/32");
    }

    #[test]
    fn placeholders_are_checked() {
        assert_eq!(fill("{{db}}/32", &vars()).unwrap(), "198.18.0.11/32");
        assert!(fill("{{nope}}", &vars()).is_err());
        assert!(fill("{{db", &vars()).is_err());
        assert_eq!(
            resolve("db:5432", &vars()).unwrap(),
            "198.18.0.11:5432".parse().unwrap()
        );
        assert!(resolve("nowhere:1", &vars()).is_err());
    }

    #[test]
    fn a_step_with_two_actions_is_rejected() {
        let text = "name: x\ntitle: x\nnamespace: {name: x}\nsteps:\n  - {say: a, expect: []}\n";
        assert!(parse(text, &vars()).is_err());
    }
}
