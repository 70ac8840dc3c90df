//! Inbound (sk_lookup) state per workload network namespace: the netns link, the record keyed by
//! the netns cookie, and the rule entries, written make-before-break with an id space of their
//! own. Called once per reconcile pass, after the outbound applier.
//!
//! The netns inode and cookie come with the snapshot (the source reads a cookie once per
//! namespace, cgroup/netns_ids.rs), and a netns is linked (or its pinned link adopted) once per
//! agent life: a pass that changes nothing makes no syscall for an unchanged workload.
//!
//! Order of a change: link the netns (adopting a pinned link), write the new entries under a
//! fresh id, swap the record, and delete the old entries after the same grace period as outbound
//! (an sk_lookup run that read the old id a moment before the swap still finds its rules). A removal deletes the record and then
//! releases the link and the entries. A workload whose policy was rejected keeps its inbound
//! state exactly as it is (the last good policy), as outbound does.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use redirect_common::inbound::InboundRecord;
use tracing::warn;

use super::{Snapshot, desired::entries};
use crate::{
    bpf::{PolicyEntries, inbound_maps::InboundMaps, netns},
    cgroup::{self, netns_ids::NetnsId},
    policy::{self, Annotations, WorkloadInputs, inbound},
};

#[derive(Clone, Debug)]
struct Applied {
    workload: String,
    record: InboundRecord,
    entries: PolicyEntries,
    /// From the workload's own good inbound policy (or adopted, so unknown): kept when a later
    /// inbound value is bad. A mesh-default fallback is not kept: it follows the mesh.
    own: bool,
    /// The cgroup whose processes were searched for a listener that predates the agent
    /// ([`netns::backfill`]), once per agent life and proxy cgroup.
    backfilled: Option<PathBuf>,
    /// The netns inode this agent linked (or whose pinned link it adopted): not looked at again.
    linked: Option<u64>,
}

/// What one pass did, for logs and tests.
#[derive(Debug, Default)]
pub struct InboundReport {
    pub applied: usize,
    pub removed: usize,
    /// Netns links made or adopted (each once per agent life).
    pub linked: usize,
    /// Workloads whose inbound state could not be written, with the reason.
    pub errors: Vec<String>,
}

pub struct InboundApplier {
    dir: PathBuf,
    maps: Option<InboundMaps>,
    applied: BTreeMap<u64, Applied>,
    next_id: u32,
    /// Replaced entry sets, deleted `grace` after their swap.
    retired: Vec<(Instant, u32, PolicyEntries)>,
    grace: Duration,
}

struct Want {
    workload: String,
    path: PathBuf,
    /// Where the proxy's processes are: its cgroup, else the workload's.
    proxy_cgroup: PathBuf,
    inode: u64,
    record: InboundRecord,
    entries: PolicyEntries,
    own: bool,
}

impl InboundApplier {
    /// Takes over the pinned records (a restart): they stay until a snapshot says otherwise.
    pub fn adopt(dir: &Path) -> Self {
        let mut applied = BTreeMap::new();
        let maps = match InboundMaps::open(dir) {
            Ok(mut m) => {
                let mut by_id = m.entries().unwrap_or_default();
                for (cookie, record) in m.records().unwrap_or_default() {
                    let entries = by_id.remove(&record.policy_id).unwrap_or_default();
                    let workload = format!("(adopted netns cookie {cookie})");
                    applied.insert(
                        cookie,
                        Applied {
                            workload,
                            record,
                            entries,
                            own: true,
                            backfilled: None,
                            linked: None,
                        },
                    );
                }
                for (id, orphan) in &by_id {
                    m.remove_entries(*id, orphan);
                }
                Some(m)
            }
            Err(e) => {
                warn!(error = %e, "inbound maps not available; no inbound interception");
                None
            }
        };
        let next_id = applied
            .values()
            .map(|a| a.record.policy_id)
            .max()
            .unwrap_or(0)
            .wrapping_add(1)
            .max(1);
        Self {
            dir: dir.to_path_buf(),
            maps,
            applied,
            next_id,
            retired: Vec::new(),
            grace: super::apply::GRACE,
        }
    }

    /// When the next retired entry set is due for deletion.
    pub fn next_collect(&self) -> Option<Instant> {
        self.retired.iter().map(|(t, _, _)| *t + self.grace).min()
    }

    /// Deletes the entry sets retired at least the grace period before `now`.
    pub fn collect(&mut self, now: Instant) {
        let Some(maps) = self.maps.as_mut() else {
            return;
        };
        let grace = self.grace;
        self.retired.retain(|(t, id, entries)| {
            let due = *t + grace <= now;
            if due {
                maps.remove_entries(*id, entries);
            }
            !due
        });
    }

    pub fn maps(&self) -> Option<&InboundMaps> {
        self.maps.as_ref()
    }

    /// Applies the inbound part of a snapshot.
    pub fn apply(&mut self, snapshot: &Snapshot) -> InboundReport {
        let mut report = InboundReport::default();
        let (want, keep) = self.desired(snapshot, &mut report);
        if self.maps.is_none() {
            return report;
        }
        for (cookie, w) in &want {
            match self.apply_one(*cookie, w) {
                Err(e) => report
                    .errors
                    .push(format!("workload {}: inbound: {e}", w.workload)),
                Ok(linked) => {
                    report.applied += 1;
                    report.linked += usize::from(linked);
                }
            }
        }
        let gone: Vec<u64> = self
            .applied
            .keys()
            .filter(|c| !want.contains_key(c) && !keep.contains_key(c))
            .copied()
            .collect();
        let maps = self.maps.as_mut().expect("checked");
        for cookie in gone {
            if let Some(old) = self.applied.remove(&cookie) {
                maps.remove_record(cookie);
                self.retired
                    .push((Instant::now(), old.record.policy_id, old.entries));
                report.removed += 1;
            }
        }
        // Links whose netns is no longer wanted (or gone): released after their records.
        let inodes: BTreeSet<u64> = want
            .values()
            .map(|w| w.inode)
            .chain(keep.into_values())
            .collect();
        for inode in netns::linked(&self.dir) {
            if !inodes.contains(&inode) {
                netns::release(&self.dir, inode);
            }
        }
        for e in &report.errors {
            warn!("{e}");
        }
        report
    }

    /// Desired state by netns cookie, and the cookies (with their inodes) to keep as they are.
    fn desired(
        &self,
        s: &Snapshot,
        report: &mut InboundReport,
    ) -> (BTreeMap<u64, Want>, BTreeMap<u64, u64>) {
        let (mut want, mut keep) = (BTreeMap::new(), BTreeMap::new());
        let empty = Annotations::new();
        for w in &s.workloads {
            let Some(path) = &w.netns else { continue };
            let ids = match s.netns.get(path) {
                Some(found) => found.clone(),
                // A snapshot made by hand, not by a source: read it now.
                None => netns::netns_inode(path)
                    .and_then(|i| Ok((i, netns::netns_cookie(path)?)))
                    .map(|(inode, cookie)| NetnsId { inode, cookie })
                    .map_err(|e| e.to_string()),
            };
            let NetnsId { inode, cookie } = match ids {
                Ok(v) => v,
                Err(e) => {
                    report.errors.push(format!("workload {}: {e}", w.id()));
                    continue;
                }
            };
            let resolved = policy::resolve(&WorkloadInputs {
                mesh: &s.mesh,
                namespace: &w.namespace,
                namespace_annotations: s.namespaces.get(&w.namespace).unwrap_or(&empty),
                name: &w.name,
                pod_annotations: &w.annotations,
            });
            // The outbound reconcile reports the bad value. Inbound keeps its last good state;
            // a workload without one gets the mesh default's inbound lists, which `resolve`
            // leaves in the policy when only an inbound key was bad.
            let kept_own = self.applied.get(&cookie).is_some_and(|a| a.own);
            let r = match resolved {
                Ok(r) if r.inbound_error.is_none() || !kept_own => r,
                _ => {
                    if self.applied.contains_key(&cookie) {
                        keep.insert(cookie, inode);
                    }
                    continue;
                }
            };
            let own = r.inbound_error.is_none();
            let port = w.inbound_port.unwrap_or(s.proxy.inbound_port);
            let own_ports = inbound::own_ports(port, s.proxy.outbound_port, &w.annotations);
            want.insert(
                cookie,
                Want {
                    workload: w.id(),
                    path: path.clone(),
                    proxy_cgroup: w.proxy_cgroup.clone().unwrap_or_else(|| w.cgroup.clone()),
                    inode,
                    record: InboundRecord {
                        policy_id: 0,
                        proxy_port: port,
                        _pad: 0,
                    },
                    entries: entries(&inbound::compile_inbound(&r.policy, &own_ports)),
                    own,
                },
            );
        }
        (want, keep)
    }

    /// True when it linked (or adopted) the netns.
    fn apply_one(&mut self, cookie: u64, w: &Want) -> Result<bool, crate::bpf::BpfError> {
        // Entries, record (and backfilled listeners) before the link: a link that runs before
        // the netns has a record takes the normal lookup, so a new pod's first inbound
        // connections would reach the app (tests/tests/inbound_escapes_kube.rs measured a few
        // per sandbox restart when the link came first). A record without a link steers nothing.
        let backfilled = self.backfill(cookie, w);
        match self.applied.get_mut(&cookie) {
            Some(old)
                if old.record.proxy_port == w.record.proxy_port && old.entries == w.entries =>
            {
                old.workload = w.workload.clone();
                old.own = w.own;
                old.backfilled = backfilled;
            }
            _ => {
                let id = self.allocate_id();
                let maps = self.maps.as_mut().expect("checked by apply");
                maps.insert_entries(id, &w.entries)?;
                let record = InboundRecord {
                    policy_id: id,
                    ..w.record
                };
                if let Err(e) = maps.set_record(cookie, &record) {
                    maps.remove_entries(id, &w.entries);
                    return Err(e);
                }
                // A cookie names one netns for its whole life, so a link made (or adopted)
                // for it stays right across record changes.
                let linked = self.applied.get(&cookie).and_then(|a| a.linked);
                let new = Applied {
                    workload: w.workload.clone(),
                    record,
                    entries: w.entries.clone(),
                    own: w.own,
                    backfilled,
                    linked,
                };
                if let Some(old) = self.applied.insert(cookie, new) {
                    self.retired
                        .push((Instant::now(), old.record.policy_id, old.entries));
                }
            }
        }
        // The link last, once per agent life; a failed attach is retried by the next pass
        // with the record already in place.
        let applied = self.applied.get_mut(&cookie).expect("inserted above");
        let link = applied.linked != Some(w.inode);
        if link {
            netns::attach(&self.dir, &w.path, w.inode, cookie)?;
            applied.linked = Some(w.inode);
        }
        Ok(link)
    }

    /// A proxy that was listening before the sockops program was attached is not in
    /// `IN_LISTEN`: put it there before the record steers anything to it. Once per agent life
    /// and proxy cgroup (and port); a listener that starts later is recorded by the kernel.
    fn backfill(&self, cookie: u64, w: &Want) -> Option<PathBuf> {
        let old = self.applied.get(&cookie);
        if old.is_some_and(|a| {
            a.backfilled.as_ref() == Some(&w.proxy_cgroup)
                && a.record.proxy_port == w.record.proxy_port
        }) {
            return old.and_then(|a| a.backfilled.clone());
        }
        let pids = cgroup::netns::subtree_pids(&w.proxy_cgroup).unwrap_or_default();
        if let Err(e) = netns::backfill(&self.dir, &pids, cookie, w.record.proxy_port) {
            warn!(workload = %w.workload, "inbound: a listener that predates the agent could not be recorded: {e}");
        }
        Some(w.proxy_cgroup.clone())
    }

    fn allocate_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            let retired = self.retired.iter().any(|(_, r, _)| *r == id);
            if id != 0 && !retired && !self.applied.values().any(|a| a.record.policy_id == id) {
                return id;
            }
        }
    }
}
