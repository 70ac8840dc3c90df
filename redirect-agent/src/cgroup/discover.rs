//! Pod UID → pod cgroup directory, for both kubelet cgroup drivers and every QoS class:
//!
//! | driver   | QoS        | pod directory                                                     |
//! |----------|------------|-------------------------------------------------------------------|
//! | systemd  | guaranteed | `kubepods.slice/kubepods-pod<uid_>.slice`                          |
//! | systemd  | burstable  | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` |
//! | cgroupfs | guaranteed | `kubepods/pod<uid>`                                                |
//! | cgroupfs | besteffort | `kubepods/besteffort/pod<uid>`                                     |
//!
//! (`<uid_>` is the UID with `-` replaced by `_`.) The layout is recognised from directory names,
//! never configured: a kubelet `--cgroup-root` prefix (`kubelet.slice/kubelet-kubepods.slice`, as
//! kind uses) works the same way.
use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// A pod's cgroup directory and its inode (the cgroup id the kernel reports). A new inode under
/// the same name is a new pod sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub path: PathBuf,
    pub ino: u64,
}

/// What a directory below the cgroup root is, judged by its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A pod's directory; holds the pod UID (with dashes).
    Pod(String),
    /// Part of the kubepods tree (the kubepods root or a QoS directory): watched and searched.
    Tree,
    /// Anything else (system.slice, container directories, ...): ignored.
    Other,
}

/// How deep below the cgroup root a kubepods tree is searched for (kind nests it two levels down).
pub const MAX_DEPTH: usize = 6;

/// Classifies `name`, a directory `depth` levels below the root (1 = a child of the root), whose
/// parent is (`in_tree`) or is not part of the kubepods tree.
pub fn classify(name: &str, depth: usize, in_tree: bool) -> Kind {
    // systemd: `[prefix-]kubepods[-qos]-pod<uid_>.slice`.
    if let Some(stem) = name.strip_suffix(".slice")
        && stem.contains("kubepods")
        && let Some((_, uid)) = stem.rsplit_once("-pod")
        && is_uid(uid)
    {
        return Kind::Pod(uid.replace('_', "-"));
    }
    // cgroupfs: `pod<uid>` inside the tree.
    if in_tree
        && let Some(uid) = name.strip_prefix("pod")
        && is_uid(uid)
    {
        return Kind::Pod(uid.to_string());
    }
    if name.contains("kubepods")
        || (in_tree && matches!(name, "burstable" | "besteffort"))
        || (depth == 1 && matches!(name, "kubelet.slice" | "kubelet"))
    {
        return Kind::Tree;
    }
    Kind::Other
}

/// Pod UIDs are UUIDs (36 chars); static pods use a 32-hex-digit config hash. Dashes appear as
/// underscores in systemd unit names.
fn is_uid(s: &str) -> bool {
    (32..=36).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-' || b == b'_')
}

/// The inode of a directory, or None if it is gone.
pub fn inode(path: &Path) -> Option<u64> {
    fs::metadata(path)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| m.ino())
}

/// Everything found by a walk of the tree.
#[derive(Debug, Default)]
pub struct Scan {
    pub pods: BTreeMap<String, PodCgroup>,
    /// kubepods tree directories (to watch), parents before children.
    pub tree: Vec<PathBuf>,
}

/// Walks `root` for the kubepods tree and the pod directories in it. Directories that vanish
/// during the walk are skipped.
pub fn scan(root: &Path) -> Scan {
    let mut out = Scan::default();
    let mut queue = vec![(root.to_path_buf(), 0usize, false)];
    while let Some((dir, depth, in_tree)) = queue.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            match classify(name, depth + 1, in_tree) {
                Kind::Pod(uid) => {
                    if let Ok(m) = entry.metadata() {
                        out.pods.insert(uid, PodCgroup { path, ino: m.ino() });
                    }
                }
                Kind::Tree if depth + 1 < MAX_DEPTH => {
                    out.tree.push(path.clone());
                    queue.push((path, depth + 1, true));
                }
                _ => {}
            }
        }
    }
    out
}

/// Where the pod `uid` would be in each tree directory: a direct probe for the case where the pod
/// event arrives before the directory's inotify event has been read.
pub fn probe(tree: &[PathBuf], uid: &str) -> Option<PodCgroup> {
    tree.iter().find_map(|dir| {
        let name = dir.file_name()?.to_str()?;
        let candidate = match name.strip_suffix(".slice") {
            Some(stem) => dir.join(format!("{stem}-pod{}.slice", uid.replace('-', "_"))),
            None => dir.join(format!("pod{uid}")),
        };
        inode(&candidate).map(|ino| PodCgroup {
            path: candidate,
            ino,
        })
    })
}

/// A container's cgroup directory below its pod's, from `status.containerStatuses[].containerID`
/// (`<runtime>://<id>`), by the runtime's naming:
///
/// | runtime              | systemd driver              | cgroupfs driver |
/// |----------------------|-----------------------------|-----------------|
/// | containerd           | `cri-containerd-<id>.scope` | `<id>`          |
/// | CRI-O                | `crio-<id>.scope`           | `crio-<id>`     |
/// | Docker (cri-dockerd) | `docker-<id>.scope`         | `<id>`          |
///
/// The driver is the pod directory's (a `.slice` is systemd's). Err names an unknown runtime or a
/// malformed ID; Ok(None) means the directory does not exist (the container is not running).
pub fn container_cgroup(pod_dir: &Path, container_id: &str) -> Result<Option<PathBuf>, String> {
    let (runtime, id) = container_id
        .split_once("://")
        .ok_or_else(|| format!("container ID {container_id:?} is not <runtime>://<id>"))?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "container ID {container_id:?}: the id is not hexadecimal"
        ));
    }
    let systemd = pod_dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".slice"));
    let name = match (runtime, systemd) {
        ("containerd", true) => format!("cri-containerd-{id}.scope"),
        ("cri-o", true) => format!("crio-{id}.scope"),
        ("cri-o", false) => format!("crio-{id}"),
        ("docker", true) => format!("docker-{id}.scope"),
        ("containerd" | "docker", false) => id.to_string(),
        _ => {
            return Err(format!(
                "container runtime {runtime:?} (container ID {container_id:?}): its cgroup naming is unknown (known: containerd, cri-o, docker)"
            ));
        }
    };
    let path = pod_dir.join(name);
    Ok(inode(&path).map(|_| path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_cgroups_for_each_runtime_and_driver() {
        let tmp = std::env::temp_dir().join(format!("redirect-ctr-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let id = "4f6b".repeat(16);
        let sd = tmp.join(format!("kubepods-burstable-pod{UID_}.slice"));
        let cf = tmp.join(format!("pod{UID}"));
        for (pod, runtime, dir) in [
            (&sd, "containerd", format!("cri-containerd-{id}.scope")),
            (&sd, "cri-o", format!("crio-{id}.scope")),
            (&sd, "docker", format!("docker-{id}.scope")),
            (&cf, "containerd", id.clone()),
            (&cf, "cri-o", format!("crio-{id}")),
        ] {
            let cid = format!("{runtime}://{id}");
            assert_eq!(
                container_cgroup(pod, &cid),
                Ok(None),
                "{cid}: not there yet"
            );
            fs::create_dir_all(pod.join(&dir)).unwrap();
            assert_eq!(
                container_cgroup(pod, &cid),
                Ok(Some(pod.join(&dir))),
                "{cid}"
            );
            fs::remove_dir(pod.join(&dir)).unwrap();
        }
        assert!(
            container_cgroup(&sd, &format!("kata://{id}"))
                .unwrap_err()
                .contains("kata")
        );
        assert!(container_cgroup(&sd, "containerd://../x").is_err());
        assert!(container_cgroup(&sd, &id).is_err());
        fs::remove_dir_all(&tmp).unwrap();
    }

    const UID: &str = "0f9d5b8e-6c1a-4d2b-9e3f-7a8b9c0d1e2f";
    const UID_: &str = "0f9d5b8e_6c1a_4d2b_9e3f_7a8b9c0d1e2f";

    #[test]
    fn systemd_names() {
        assert_eq!(classify("kubepods.slice", 1, false), Kind::Tree);
        assert_eq!(classify("kubepods-burstable.slice", 2, true), Kind::Tree);
        assert_eq!(classify("kubepods-besteffort.slice", 2, true), Kind::Tree);
        let pod = Kind::Pod(UID.into());
        assert_eq!(classify(&format!("kubepods-pod{UID_}.slice"), 2, true), pod);
        assert_eq!(
            classify(&format!("kubepods-burstable-pod{UID_}.slice"), 3, true),
            pod
        );
        // kind / a kubelet --cgroup-root of /kubelet.
        assert_eq!(classify("kubelet.slice", 1, false), Kind::Tree);
        assert_eq!(classify("kubelet-kubepods.slice", 2, true), Kind::Tree);
        assert_eq!(
            classify(
                &format!("kubelet-kubepods-besteffort-pod{UID_}.slice"),
                4,
                true
            ),
            pod
        );
        // Containers and other slices are not pods.
        assert_eq!(
            classify("cri-containerd-0123abcd.scope", 4, true),
            Kind::Other
        );
        assert_eq!(classify("system.slice", 1, false), Kind::Other);
    }

    #[test]
    fn cgroupfs_names() {
        assert_eq!(classify("kubepods", 1, false), Kind::Tree);
        assert_eq!(classify("burstable", 2, true), Kind::Tree);
        assert_eq!(classify("besteffort", 2, true), Kind::Tree);
        assert_eq!(
            classify(&format!("pod{UID}"), 2, true),
            Kind::Pod(UID.into())
        );
        // Outside the tree a `pod...` directory is somebody else's.
        assert_eq!(classify(&format!("pod{UID}"), 1, false), Kind::Other);
        assert_eq!(classify("burstable", 1, false), Kind::Other);
        // A container directory (64 hex digits) is not a pod.
        assert_eq!(classify(&"ab".repeat(32), 3, true), Kind::Other);
    }

    #[test]
    fn scans_and_probes_both_drivers() {
        let tmp = std::env::temp_dir().join(format!("redirect-discover-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let sd = tmp.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-x.scope"
        ));
        let other = "11111111-2222-3333-4444-555555555555";
        let fs_guaranteed = tmp.join(format!("kubepods/pod{other}"));
        fs::create_dir_all(&sd).unwrap();
        fs::create_dir_all(&fs_guaranteed).unwrap();
        fs::create_dir_all(tmp.join("system.slice/pod-not-ours")).unwrap();
        let scan = scan(&tmp);
        assert_eq!(scan.pods.len(), 2, "{scan:?}");
        assert_eq!(scan.pods[UID].path, sd.parent().unwrap());
        assert_eq!(scan.pods[other].path, fs_guaranteed);
        assert_eq!(
            probe(&scan.tree, UID).map(|p| p.path),
            Some(sd.parent().unwrap().to_path_buf())
        );
        assert_eq!(
            probe(&scan.tree, other).map(|p| p.path),
            Some(fs_guaranteed)
        );
        assert_eq!(
            probe(&scan.tree, "99999999-2222-3333-4444-555555555555"),
            None
        );
        fs::remove_dir_all(&tmp).unwrap();
    }
}
