//! DNS capture: dialect values, precedence and the mesh default.

use super::*;
use crate::MeshTraffic;

fn run(
    mesh: &MeshTraffic,
    ns: &[(&str, &str)],
    pod: &[(&str, &str)],
) -> Result<DnsPolicy, PolicyError> {
    crate::test_inputs::run(mesh, ns, pod).map(|r| r.policy.dns)
}

fn run_pod(pod: &[(&str, &str)]) -> Result<DnsPolicy, PolicyError> {
    run(&MeshTraffic::default(), &[], pod)
}

fn mesh(capture: bool, port: u16) -> MeshTraffic {
    MeshTraffic {
        dns: DnsDefault {
            capture,
            port: NonZeroU16::new(port).unwrap(),
            ..Default::default()
        },
        ..Default::default()
    }
}

const ISTIO_ON: &str = "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n";

#[test]
fn off_by_default() {
    let d = run_pod(&[]).unwrap();
    assert!(!d.enabled());
    assert_eq!(d.record_port(), 0);
}

#[test]
fn istio_pod_annotation_turns_it_on_at_15053() {
    let d = run_pod(&[(ISTIO_PROXY_CONFIG, ISTIO_ON)]).unwrap();
    assert!(d.enabled());
    assert_eq!(d.record_port(), 15053);
    let c = d.capture.unwrap();
    assert_eq!(c.source.origin, Origin::Pod("demo/app".into()));
    assert_eq!(c.source.key, ISTIO_PROXY_CONFIG);
}

#[test]
fn istio_json_and_parse_bool_values() {
    for (v, on) in [("true", true), ("1", true), ("False", false), ("f", false)] {
        let raw = format!(r#"{{"proxyMetadata": {{"ISTIO_META_DNS_CAPTURE": "{v}"}}}}"#);
        let d = run_pod(&[(ISTIO_PROXY_CONFIG, &raw)]).unwrap();
        assert_eq!(d.enabled(), on, "{v}");
    }
    // A ProxyConfig without the variable says nothing: the mesh default stands.
    let other = "concurrency: 2\nproxyMetadata: {OTHER: x}\n";
    let d = run(&mesh(true, 15053), &[], &[(ISTIO_PROXY_CONFIG, other)]).unwrap();
    assert!(d.enabled());
    assert_eq!(d.capture.unwrap().source.origin, Origin::Mesh);
}

#[test]
fn bad_values_name_pod_key_and_value() {
    let e = run_pod(&[(
        ISTIO_PROXY_CONFIG,
        "proxyMetadata: {ISTIO_META_DNS_CAPTURE: yes-please}",
    )])
    .unwrap_err();
    assert_eq!(e.object, "pod demo/app");
    assert_eq!(e.key, ISTIO_PROXY_CONFIG);
    assert!(e.value.contains("yes-please"), "{e}");
    let e = run_pod(&[(ISTIO_PROXY_CONFIG, "[")]).unwrap_err();
    assert_eq!(e.key, ISTIO_PROXY_CONFIG);
    let e = run_pod(&[(KUMA_BUILTIN_DNS, "on")]).unwrap_err();
    assert_eq!((e.key.as_str(), e.value.as_str()), (KUMA_BUILTIN_DNS, "on"));
    let e = run_pod(&[(KUMA_BUILTIN_DNS_PORT, "70000")]).unwrap_err();
    assert_eq!(
        (e.key.as_str(), e.value.as_str()),
        (KUMA_BUILTIN_DNS_PORT, "70000")
    );
    assert!(e.to_string().contains("pod demo/app"), "{e}");
}

#[test]
fn kuma_enabled_with_its_port() {
    let d = run_pod(&[
        (KUMA_BUILTIN_DNS, "enabled"),
        (KUMA_BUILTIN_DNS_PORT, "25053"),
    ])
    .unwrap();
    assert!(d.enabled());
    assert_eq!(d.record_port(), 25053);
    assert_eq!(d.port.unwrap().source.key, KUMA_BUILTIN_DNS_PORT);
}

#[test]
fn pod_over_namespace_over_mesh() {
    // Mesh on, namespace off, pod on.
    let m = mesh(true, 15053);
    let d = run(&m, &[(KUMA_BUILTIN_DNS, "disabled")], &[]).unwrap();
    assert!(!d.enabled());
    assert_eq!(
        d.capture.unwrap().source.origin,
        Origin::Namespace("demo".into())
    );
    let d = run(
        &m,
        &[(KUMA_BUILTIN_DNS, "disabled")],
        &[(ISTIO_PROXY_CONFIG, ISTIO_ON)],
    )
    .unwrap();
    assert!(d.enabled());
    // Port on its own: the namespace's Kuma port beats the mesh's.
    let d = run(&m, &[(KUMA_BUILTIN_DNS_PORT, "35053")], &[]).unwrap();
    assert_eq!(d.record_port(), 35053);
    // The mesh default's own port.
    assert_eq!(
        run(&mesh(true, 5353), &[], &[]).unwrap().record_port(),
        5353
    );
}

#[test]
fn disagreeing_keys_on_one_object_are_an_error() {
    let e = run_pod(&[
        (ISTIO_PROXY_CONFIG, ISTIO_ON),
        (KUMA_BUILTIN_DNS, "disabled"),
    ])
    .unwrap_err();
    assert!(e.to_string().contains("conflicts"), "{e}");
    // Agreeing keys are fine.
    run_pod(&[
        (ISTIO_PROXY_CONFIG, ISTIO_ON),
        (KUMA_BUILTIN_DNS, "enabled"),
    ])
    .unwrap();
}

#[test]
fn interception_mode_none_switches_dns_off() {
    let d = run(
        &mesh(true, 15053),
        &[],
        &[
            ("sidecar.istio.io/interceptionMode", "NONE"),
            (ISTIO_PROXY_CONFIG, ISTIO_ON),
        ],
    )
    .unwrap();
    assert!(!d.enabled());
    assert_eq!(
        d.capture.unwrap().source.key,
        "sidecar.istio.io/interceptionMode"
    );
}

#[test]
fn empty_include_ranges_keep_dns_capture() {
    // istio-iptables installs its DNS rules even when no outbound TCP is captured.
    let d = run(
        &mesh(true, 15053),
        &[],
        &[("traffic.sidecar.istio.io/includeOutboundIPRanges", "")],
    )
    .unwrap();
    assert!(d.enabled());
}

#[test]
fn file_default_parses_and_refuses_port_zero() {
    let d: DnsDefault = serde_yaml::from_str("{capture: true, port: 15053}").unwrap();
    assert!(d.capture);
    assert_eq!(d.port.get(), 15053);
    assert_eq!(d.key, FILE_DEFAULT);
    let d: DnsDefault = serde_yaml::from_str("{capture: true}").unwrap();
    assert_eq!(d.port.get(), DEFAULT_DNS_PORT);
    assert!(serde_yaml::from_str::<DnsDefault>("{capture: true, port: 0}").is_err());
    assert!(serde_yaml::from_str::<DnsDefault>("{capture: true, prot: 53}").is_err());
}

#[test]
fn the_keys_are_policy_keys() {
    for k in keys::ALL {
        assert!(crate::keys::is_policy_key(k), "{k}");
    }
}
