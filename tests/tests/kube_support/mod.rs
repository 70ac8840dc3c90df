//! Shared pieces of the Kubernetes-source tests: the fake API server, the agent run in-process
//! against it (real datapath, attached to the test's own cgroup subtree), real API JSON for
//! the objects, and kubepods cgroup layouts built inside the Fixture.
#![allow(dead_code, unused_imports)] // each test binary uses a different subset

mod api_rules;
pub mod fake_api;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use fake_api::{FakeApi, Kind};
use redirect_agent::{
    bpf::{self, AttachOptions, PinnedMaps},
    metrics::Metrics,
    reconcile::{Applier, Owner},
    source::kube::{self as kube_source, KubeOptions},
};
use redirect_tests::Fixture;
use serde_json::{Value, json};

pub const NODE: &str = "node-1";

/// The agent, in-process, with its kube source talking to a [`FakeApi`].
pub struct Agent {
    pub rt: tokio::runtime::Runtime,
    pub api: FakeApi,
    pub owner: Option<Owner>,
    pub metrics: Arc<Metrics>,
    task: Option<tokio::task::JoinHandle<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pin_dir: PathBuf,
    opts: KubeOptions,
}

pub fn options(fx: &Fixture) -> KubeOptions {
    let mut o = KubeOptions::new(NODE, fx.cgroup_root());
    o.proxy.uid = None;
    // Inbound interception is the subject of kube_inbound.rs ([`inbound_options`]); elsewhere
    // it would link every test pod's netns (all in the fixture's) for nothing.
    o.inbound = false;
    o
}

/// [`options`] with inbound interception on, as `run` has it by default.
pub fn inbound_options(fx: &Fixture) -> KubeOptions {
    KubeOptions {
        inbound: true,
        ..options(fx)
    }
}

impl Agent {
    /// A fresh fake API (filled by `setup`) and the agent on it.
    pub fn start(fx: &Fixture, setup: impl FnOnce(&FakeApi)) -> Agent {
        Self::start_with(fx, options(fx), setup)
    }

    pub fn start_with(fx: &Fixture, opts: KubeOptions, setup: impl FnOnce(&FakeApi)) -> Agent {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (client, api) = {
            let _guard = rt.enter();
            FakeApi::start()
        };
        setup(&api);
        let mut agent = Agent {
            rt,
            api,
            owner: None,
            metrics: Arc::new(Metrics::new(Some(fx.pin_dir()))),
            task: None,
            thread: None,
            pin_dir: fx.pin_dir().to_path_buf(),
            opts,
        };
        agent.launch(client);
        agent
    }

    /// Attaches (or adopts) the datapath, starts the owner and the kube source.
    fn launch(&mut self, client: kube::Client) {
        let maps = bpf::load_and_attach(&AttachOptions {
            bpffs_dir: self.pin_dir.clone(),
            cgroup_root: self.opts.cgroup_root.clone(),
            max_rule_entries: None,
            inbound: self.opts.inbound,
        })
        .expect("load_and_attach");
        // The inbound applier too, as `run` does: pods with a netns get the sk_lookup link.
        let inbound = redirect_agent::reconcile::inbound::InboundApplier::adopt(&self.pin_dir);
        let applier = Applier::adopt(maps).expect("adopt").with_inbound(inbound);
        let (owner, thread) = Owner::spawn(applier, self.metrics.clone()).unwrap();
        let (o, m, opts) = (owner.clone(), self.metrics.clone(), self.opts.clone());
        self.task = Some(self.rt.spawn(async move {
            if let Err(e) = kube_source::run(client, opts, o, m).await {
                panic!("kube source stopped: {e}");
            }
        }));
        self.owner = Some(owner);
        self.thread = Some(thread);
    }

    /// Stops the source and the owner (the pins stay, as when the agent process exits).
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = self.rt.block_on(t);
        }
        self.owner = None;
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    /// Stops the agent and starts a new one on the same pins and the same API: a restart.
    pub fn restart(&mut self) {
        self.stop();
        self.metrics = Arc::new(Metrics::new(Some(&self.pin_dir)));
        let client = {
            let _guard = self.rt.enter();
            self.api.reconnect()
        };
        self.launch(client);
    }

    pub fn owner(&self) -> &Owner {
        self.owner.as_ref().expect("running")
    }

    pub fn wait_ready(&self) {
        let h = self.owner().health();
        fake_api::wait_for(Duration::from_secs(20), || h.ready().then_some(()))
            .unwrap_or_else(|| panic!("agent not ready: {}", h.reason()));
    }

    /// Waits until a pass newer than `after` has been applied and nothing is queued.
    pub fn wait_pass(&self, after: u64) -> u64 {
        let h = self.owner().health();
        fake_api::wait_for(Duration::from_secs(20), || {
            (h.generation() > after && h.ready()).then_some(h.generation())
        })
        .expect("no reconcile pass")
    }

    pub fn maps(&self) -> PinnedMaps {
        PinnedMaps::open(&self.pin_dir).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A pod as the API server returns it: an app container plus an Istio sidecar (runAsUser
/// 1337), scheduled on `node`.
pub fn pod(namespace: &str, name: &str, uid: &str, node: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"app": name, "security.istio.io/tlsMode": "istio"},
            "annotations": annotations
        },
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "app", "image": "registry.example/app:1.0",
                 "ports": [{"containerPort": 8080, "protocol": "TCP"}]},
                {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.22.0",
                 "args": ["proxy", "sidecar"],
                 "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true}}
            ],
            "restartPolicy": "Always",
            "serviceAccountName": "default"
        },
        "status": {"phase": "Running", "qosClass": "Burstable", "podIP": "10.244.1.7"}
    })
}

/// A pod without any sidecar or injection key.
pub fn plain_pod(namespace: &str, name: &str, uid: &str, node: &str) -> Value {
    let mut p = pod(namespace, name, uid, node, json!({}));
    p["spec"]["containers"] = json!([{"name": "app", "image": "registry.example/app:1.0"}]);
    p["metadata"]["labels"] = json!({"app": name});
    p
}

pub fn namespace(name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("ns-{name}"), "annotations": annotations,
                     "labels": {"kubernetes.io/metadata.name": name}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}

/// FSM's MeshConfig `fsm-mesh-config` in `fsm-system` with the given `spec.traffic`.
pub fn meshconfig(traffic: Value) -> Value {
    json!({
        "apiVersion": "config.flomesh.io/v1alpha3",
        "kind": "MeshConfig",
        "metadata": {"name": "fsm-mesh-config", "namespace": "fsm-system",
                     "uid": "5a0d8c3e-55b4-4a8e-9a59-0d0b9a1f3c11"},
        "spec": {
            "sidecar": {"logLevel": "error", "sidecarClass": "pipy"},
            "traffic": traffic
        }
    })
}

/// A kubelet cgroup driver.
#[derive(Clone, Copy, Debug)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// The pod directory of `uid` (relative to the cgroup root) for `qos` ("guaranteed",
/// "burstable", "besteffort").
pub fn pod_cgroup_rel(driver: Driver, qos: &str, uid: &str) -> String {
    match (driver, qos) {
        (Driver::Systemd, "guaranteed") => {
            format!("kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_"))
        }
        (Driver::Systemd, q) => format!(
            "kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{}.slice",
            uid.replace('-', "_")
        ),
        (Driver::Cgroupfs, "guaranteed") => format!("kubepods/pod{uid}"),
        (Driver::Cgroupfs, q) => format!("kubepods/{q}/pod{uid}"),
    }
}

/// A UID that is unique per call.
pub fn uid(n: u32) -> String {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let s = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        n,
        std::process::id() & 0xffff,
        s
    )
}

/// Percentile of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Busy-polls `f` (every 100 µs) until it is true; returns when it became true.
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Instant> {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return Some(Instant::now());
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The kind names, re-exported for the tests.
pub use fake_api::Kind as Res;

pub fn put_defaults(api: &FakeApi) {
    api.put(Kind::Namespaces, namespace("demo", json!({})));
    api.put(Kind::Namespaces, namespace("fsm-system", json!({})));
}
