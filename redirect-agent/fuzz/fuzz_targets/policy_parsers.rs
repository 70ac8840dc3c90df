//! Fuzzes the annotation dialect parsers and the MeshConfig parser end to end: `resolve` must
//! never panic, errors must name their object and key, and whatever resolves must compile to
//! tables that answer exactly like the reference evaluator.
//!
//! Inputs are structured: list items are mostly well-formed tokens (CIDRs, ports, ranges, `*`)
//! rendered with random separators and padding, mixed with raw text, so that runs get past
//! validation into precedence and compilation instead of dying on the first bad character.
#![no_main]

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use redirect_policy::{
    self as policy, Annotations, MeshTraffic, WorkloadInputs, evaluate, evaluate_compiled, keys,
};

#[derive(Arbitrary, Debug)]
enum Item {
    Raw(String),
    V4 { addr: u32, len: u8 },
    V6 { addr: u128, len: u8 },
    Mapped { addr: u32, len: u8 },
    Bare4(u32),
    Bare6(u128),
    Port(u32),
    Range { lo: u32, hi: u32, sep: u8 },
    Star,
    Empty,
}

impl Item {
    fn render(&self, out: &mut String) {
        let _ = match self {
            Item::Raw(s) => write!(out, "{s}"),
            Item::V4 { addr, len } => write!(out, "{}/{}", Ipv4Addr::from(*addr), len % 40),
            Item::V6 { addr, len } => write!(out, "{}/{}", Ipv6Addr::from(*addr), len % 140),
            Item::Mapped { addr, len } => {
                write!(out, "::ffff:{}/{}", Ipv4Addr::from(*addr), 96 + len % 40)
            }
            Item::Bare4(a) => write!(out, "{}", Ipv4Addr::from(*a)),
            Item::Bare6(a) => write!(out, "{}", Ipv6Addr::from(*a)),
            Item::Port(p) => write!(out, "{}", p % 70000),
            Item::Range { lo, hi, sep } => {
                let sep = ["-", ":", " - ", "..", ""][usize::from(*sep) % 5];
                write!(out, "{}{sep}{}", lo % 70000, hi % 70000)
            }
            Item::Star => write!(out, "*"),
            Item::Empty => Ok(()),
        };
    }
}

#[derive(Arbitrary, Debug)]
struct Value {
    items: Vec<Item>,
    /// Bits: leading space, trailing space, space after commas, tab padding.
    pad: u8,
}

impl Value {
    fn render(&self) -> String {
        let ws = if self.pad & 8 != 0 { "\t" } else { " " };
        let mut s = String::new();
        if self.pad & 1 != 0 {
            s.push_str(ws);
        }
        for (i, item) in self.items.iter().enumerate() {
            if i > 0 {
                s.push(',');
                if self.pad & 4 != 0 {
                    s.push_str(ws);
                }
            }
            item.render(&mut s);
        }
        if self.pad & 2 != 0 {
            s.push_str(ws);
        }
        s
    }
}

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Raw(String),
}

fn known_keys() -> Vec<String> {
    let mut k: Vec<String> = [keys::istio::ALL, keys::linkerd::ALL, keys::kuma::ALL]
        .concat()
        .iter()
        .map(|s| s.to_string())
        .collect();
    for prefix in [keys::FSM_PREFIX, keys::OSM_PREFIX] {
        k.extend(keys::FSM_KEYS.iter().map(|n| format!("{prefix}{n}")));
    }
    k
}

fn annotations(pairs: &[(Key, Value)], known: &[String]) -> Annotations {
    pairs
        .iter()
        .map(|(k, v)| {
            let key = match k {
                Key::Known(i) => known[usize::from(*i) % known.len()].clone(),
                Key::Raw(s) => s.clone(),
            };
            (key, v.render())
        })
        .collect()
}

#[derive(Arbitrary, Debug)]
enum Mesh {
    Json(String),
    Yaml(String),
    Fields {
        exclude: Vec<Item>,
        include: Vec<Item>,
        ports: Vec<i64>,
        string_ports: Vec<String>,
        inbound: Vec<i64>,
        interfaces: Vec<String>,
        egress: Option<bool>,
        mode: Option<String>,
    },
}

fn render_items(items: &[Item]) -> Vec<String> {
    items
        .iter()
        .map(|i| {
            let mut s = String::new();
            i.render(&mut s);
            s
        })
        .collect()
}

/// None when the text is not a MeshConfig at all (deserialisation is the caller's error).
fn mesh(m: &Mesh) -> Option<MeshTraffic> {
    match m {
        Mesh::Json(s) => serde_json::from_str(s).ok(),
        Mesh::Yaml(s) => serde_yaml::from_str(s).ok(),
        Mesh::Fields {
            exclude,
            include,
            ports,
            string_ports,
            inbound,
            interfaces,
            egress,
            mode,
        } => {
            let mut out_ports: Vec<serde_json::Value> = ports.iter().map(|p| (*p).into()).collect();
            out_ports.extend(string_ports.iter().map(|s| s.clone().into()));
            Some(MeshTraffic {
                outbound_ip_range_exclusion_list: render_items(exclude),
                outbound_ip_range_inclusion_list: render_items(include),
                outbound_port_exclusion_list: out_ports,
                inbound_port_exclusion_list: inbound.iter().map(|p| (*p).into()).collect(),
                network_interface_exclusion_list: interfaces.clone(),
                enable_egress: *egress,
                interception_mode: mode.clone(),
                // DNS capture is fuzzed through its annotations; the mesh default stays off.
                ..MeshTraffic::default()
            })
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    mesh: Mesh,
    namespace: String,
    name: String,
    ns: Vec<(Key, Value)>,
    pod: Vec<(Key, Value)>,
    dests: Vec<(u128, u16, bool)>,
}

fuzz_target!(|input: Input| {
    let known = known_keys();
    let Some(mesh) = mesh(&input.mesh) else {
        return;
    };
    let ns = annotations(&input.ns, &known);
    let pod = annotations(&input.pod, &known);
    let inputs = WorkloadInputs {
        mesh: &mesh,
        namespace: &input.namespace,
        namespace_annotations: &ns,
        name: &input.name,
        pod_annotations: &pod,
    };
    let resolved = match policy::resolve(&inputs) {
        Ok(r) => r,
        Err(e) => {
            let shown = e.to_string();
            assert!(!e.key.is_empty() && shown.contains(&e.key), "{shown}");
            assert!(shown.contains(&e.object), "{shown}");
            return;
        }
    };
    let p = &resolved.policy;
    let c = policy::compile(p);
    // Probe the boundaries of every rule and the fuzzer's own destinations.
    let mut probes: Vec<IpAddr> = Vec::new();
    for s in p.exclude_cidrs.iter().chain(&p.include_cidrs) {
        probes.push(s.value.network());
        probes.push(s.value.broadcast());
    }
    for (i, (addr, port, v4)) in input.dests.iter().enumerate() {
        let ip = if *v4 {
            IpAddr::V4(Ipv4Addr::from(*addr as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(*addr))
        };
        probes.push(ip);
        let proxy = i % 11 == 10;
        for ip in &probes {
            let dest = SocketAddr::new(*ip, *port);
            let want = evaluate(p, dest, proxy);
            let got = evaluate_compiled(&c, p.enabled, dest, proxy);
            assert_eq!((want.redirect, want.step), got, "{dest}: {p:?} {c:?}");
        }
    }
});
