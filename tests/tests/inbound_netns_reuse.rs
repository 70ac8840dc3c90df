//! Issue #12, the netns cache's release (cgroup/netns_ids.rs) under a looping inbound client. A
//! workload's netns is replaced by a new namespace, round after round, and the old one is
//! released (the workload stops naming it) and freed. The kernel hands a freed namespace's
//! inode number to a later one (an IDA, lowest free first), so a new namespace often has the
//! inode of an earlier one: a cookie cached by inode alone, or a link pin (named by the inode) kept from the old
//! namespace, would then leave the new one unsteered. Asserted: from the pass that names the
//! new namespace on, the looped connections reach the proxy and none reach its app; and that
//! the condition did occur (some round had the inode of an earlier, freed namespace). Before
//! the cache held its namespaces open (a cookie kept by inode alone), a round with a reused
//! inode got a dead cookie and every looped connection was refused.
mod escapes_support;
mod inbound_support;

use std::{os::unix::fs::MetadataExt as _, path::Path, time::Duration};

use escapes_support::inbound::{NetnsLooper, assert_inbound_no_escape};
use inbound_support::{INBOUND_PORT, kube::link_pin, start_proxy, world};
use redirect_tests::{Fixture, serve_identity, veth_pair};

/// The replacement namespace's address, on its own veth pair to the client node.
const NEW4: &str = "198.19.3.2";
const ROUNDS: usize = 6;

fn config(w: &inbound_support::World, netns: &Path) -> String {
    format!(
        "proxy: {{mode: sidecar, outboundPort: 15001, inboundPort: {INBOUND_PORT}, uid: 1337}}\n\
         workloads:\n  - {{name: pod1, namespace: test, cgroup: {}, proxyCgroup: {}, netns: {}}}\n",
        w.pod.display(),
        w.proxy_cg.display(),
        netns.display()
    )
}

#[test]
fn a_replaced_netns_is_steered_even_with_the_old_ones_inode() {
    let w = world("esc-nsreuse");
    let mut agent = w.agent(&[]);
    let pins = w.fx.pin_dir().to_path_buf();
    let mut inodes = Vec::new();
    for round in 0..ROUNDS {
        let pod = Fixture::new(&format!("in-esc-nsreuse-{round}")).unwrap();
        veth_pair(&pod, "vpod3", &w.node, "vnode3").unwrap();
        pod.ip(&["addr", "add", &format!("{NEW4}/24"), "dev", "vpod3"])
            .unwrap();
        w.node
            .ip(&["addr", "add", "198.19.3.1/24", "dev", "vnode3"])
            .unwrap();
        let inode = std::fs::metadata(pod.netns_path()).unwrap().ino();
        inodes.push(inode);
        let app = serve_identity(&pod, "[::]:8080".parse().unwrap(), "app-8080").unwrap();
        let proxy = start_proxy(&w.proxy_cg, pod.netns_file(), &["[::]:15006"], true);
        agent.reconfigure(&config(&w, &pod.netns_path())).unwrap();
        let link = link_pin(&pins, &pod.netns_path());
        assert!(
            link.exists(),
            "round {round}: no link pinned for the new netns"
        );
        let looper = NetnsLooper::start(w.node.netns_file(), &format!("{NEW4}:8080"));
        looper.wait_for("proxy", 100);
        let t = looper.finish();
        assert_inbound_no_escape(
            &t,
            app.connections(),
            100,
            &format!("round {round} (netns inode {inode})"),
        );
        // The workload goes back to the world's netns: the replaced one is released by the
        // cache, and freed once its last process and its fixture are gone.
        drop(proxy);
        drop(app);
        agent.reconfigure(&w.config(&[])).unwrap();
        drop(pod);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while link.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !link.exists(),
            "round {round}: the released netns's link pin stayed"
        );
        // The kernel frees a netns in a work item of its own, later, and the veth peer in the
        // node's netns goes with it; under load (other test binaries running) that can outlast
        // the pin, and the next round's `vnode3` would then exist already. Wait for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while w.node.ip(&["link", "show", "vnode3"]).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the freed netns's veth peer vnode3 stayed in the node's netns for 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let reused = (1..inodes.len())
        .filter(|&i| inodes[..i].contains(&inodes[i]))
        .count();
    println!(
        "netns inodes by round: {inodes:?}; {reused} of {} replacements had the inode of an earlier, freed netns",
        ROUNDS - 1
    );
    assert!(
        reused > 0,
        "no round reused a freed netns's inode: the test did not meet its condition"
    );
}
