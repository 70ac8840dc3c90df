//! Shared by the escape tests: a fixture with one destination, a tag-mode proxy, two workloads
//! registered by the real agent, and a [`Looper`] that connects in a loop from a workload and
//! counts where every connection went. A safety claim is "0 escaped while the bad thing
//! happens".
#![allow(dead_code)]

pub mod inbound;

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use redirect_tests::MeshWorld;

/// The destination every looped connect targets; the mesh redirects it.
pub const DEST: &str = "198.18.0.10:80";
/// A destination the mesh excludes.
pub const EXCLUDED: &str = "198.18.0.11:80";

/// Workload `demo/app`: pod1, its proxy in pod1/proxy. Workload `demo/other`: pod2, nothing
/// running in it unless a test puts it there.
pub type World = MeshWorld;

pub fn world(name: &str) -> World {
    MeshWorld::new(
        name,
        &["198.18.0.10/32", "198.18.0.11/32"],
        [DEST, EXCLUDED],
        &["127.0.0.1:15001"],
    )
    .unwrap()
}

/// Two workloads; `.11` excluded mesh-wide.
pub fn config(w: &World) -> String {
    format!(
        r#"mesh:
  outboundIPRangeExclusionList: ["198.18.0.11/32"]
proxy: {{mode: sidecar, outboundPort: 15001, uid: 1337}}
namespaces:
  demo: {{annotations: {{}}}}
workloads:
  - name: app
    namespace: demo
    cgroup: {pod1}
    proxyCgroup: {proxy}
  - name: other
    namespace: demo
    cgroup: {pod2}
"#,
        pod1 = w.pod1.display(),
        proxy = w.proxy.display(),
        pod2 = w.pod2.display(),
    )
}

/// Where each looped connect went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Reached the proxy, which read the right original destination.
    pub redirected: usize,
    /// Reached the proxy with another original destination (or none): a double rewrite or a
    /// lost record.
    pub wrong_orig: usize,
    pub escaped: usize,
    pub failed: usize,
}

/// A shell in a workload cgroup running the test client against [`DEST`] in a loop.
pub struct Looper {
    child: Child,
    counts: Arc<[AtomicUsize; 4]>,
    reader: Option<JoinHandle<()>>,
}

impl Looper {
    pub fn start(w: &World, cgroup: &std::path::Path) -> Looper {
        let mut child = redirect_tests::spawn_client_shell(
            &w.fx,
            cgroup,
            &format!("while :; do \"$CLIENT\" connect {DEST} --json --timeout-ms 2000; done"),
            Stdio::null(),
        )
        .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let counts: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
        let reader = std::thread::spawn({
            let counts = counts.clone();
            move || {
                let want = format!("proxy orig={DEST} ");
                for line in stdout.lines() {
                    let Ok(line) = line else { break };
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    let reply = v["reply"].as_str().unwrap_or("");
                    let i = if reply.starts_with(&want) {
                        0
                    } else if reply.starts_with("proxy") {
                        1
                    } else if reply.trim() == DEST {
                        2
                    } else {
                        3
                    };
                    counts[i].fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let l = Looper {
            child,
            counts,
            reader: Some(reader),
        };
        l.wait_redirected(5);
        l
    }

    pub fn counts(&self) -> Counts {
        Counts {
            redirected: self.counts[0].load(Ordering::Relaxed),
            wrong_orig: self.counts[1].load(Ordering::Relaxed),
            escaped: self.counts[2].load(Ordering::Relaxed),
            failed: self.counts[3].load(Ordering::Relaxed),
        }
    }

    /// Waits until `n` more connections have been redirected with the right original
    /// destination (the loop is alive and working).
    pub fn wait_redirected(&self, n: usize) {
        let target = self.counts().redirected + n;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.counts().redirected < target {
            assert!(
                Instant::now() < deadline,
                "looped connects stopped being redirected: {:?}",
                self.counts()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Keeps looping for `d` more, then stops and returns the final counts.
    pub fn finish(mut self, d: Duration) -> Counts {
        std::thread::sleep(d);
        self.wait_redirected(5);
        self.stop();
        self.counts()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Looper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Asserts that no looped connection escaped the proxy.
pub fn assert_no_escape(c: Counts, what: &str) {
    assert_eq!(c.escaped, 0, "{what}: {c:?}");
    assert!(c.redirected > 0, "{what}: nothing was redirected: {c:?}");
}

/// The cgroup ids registered in the pinned POLICY map, sorted (from `inspect`).
pub fn registered(agent: &redirect_tests::Agent) -> Vec<u64> {
    let v = agent.inspect().unwrap();
    let mut out: Vec<u64> = v["workloads"]
        .as_array()
        .map(|a| a.iter().filter_map(|w| w["cgroup_id"].as_u64()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// The ids of the world's two workloads, sorted.
pub fn both(w: &World) -> Vec<u64> {
    let mut v = vec![
        redirect_tests::cgroup_id(&w.pod1).unwrap(),
        redirect_tests::cgroup_id(&w.pod2).unwrap(),
    ];
    v.sort();
    v
}

/// Waits until `f` holds (10 s).
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
