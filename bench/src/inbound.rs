//! Inbound conn/s (issue #11): a client on a "client node" connects to the pod's app port, with
//! the same four modes side by side as outbound (direct-app, direct-proxy, iptables' ISTIO_INBOUND
//! with N excluded ports, the agent's sk_lookup with the same N excluded ports), interleaved in
//! rotating order, ratios within each run.
use std::time::Duration;

use anyhow::Result;

use super::{
    Bins, check_interrupt, iptables,
    lanes::Lane,
    results::{Kind, Mode, Results},
    sample_kind, step,
};

pub fn measure(bins: &Bins, r: &mut Results) -> Result<()> {
    let p = r.params.clone();
    step(
        "inbound: one pod and client node per mode: app, proxy's inbound listener, iptables rules, agent",
    );
    let mut lanes = Mode::ALL
        .iter()
        .map(|&m| Lane::inbound(m, bins))
        .collect::<Result<Vec<_>>>()?;
    for &n in &p.inbound_sizes {
        let ports = iptables::inbound_exclusions(n);
        for lane in lanes.iter_mut() {
            check_interrupt()?;
            if let Some((wall, _)) = lane.configure(&ports, Duration::from_secs(120))? {
                eprintln!(
                    "    {:<9} {n} excluded inbound ports: loaded in {:.1} ms",
                    lane.mode.name(),
                    wall.as_secs_f64() * 1e3
                );
            }
            // One exchange through the forwarding proxy, which must have read the original
            // destination where the mode intercepts.
            lane.set_kind(Kind::InboundProxied)?;
            lane.verify()?;
        }
        step(&format!(
            "inbound, N = {n} excluded ports: {} run(s) × {:?} client threads × {} s per mode",
            p.inbound_runs,
            p.threads,
            p.duration.as_secs_f64()
        ));
        for kind in Kind::INBOUND {
            for lane in lanes.iter_mut() {
                lane.set_kind(kind)?;
            }
            let all: Vec<&Lane> = lanes.iter().collect();
            sample_kind(&all, r, n, kind, p.inbound_runs)?;
        }
    }
    Ok(())
}
