//! Kernel packages for the matrix, fetched with `apt-get download` under a private apt state per
//! archive (its own sources list, lists and cache; the machine's /etc/apt is never touched).
//!
//! Debian's archive is the one the machine's own apt sources name. No Debian suite ships a
//! kernel between 5.10 and 6.1, so the kernels around the minimum (5.14, 5.15) come from
//! Ubuntu's archive: its signing keys come from Debian's `ubuntu-keyring` package and its
//! address from the default mirror in Debian's `debootstrap` scripts, both fetched from the
//! Debian archive, so that the trust chain starts at Debian's keyring.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::sh;
use crate::util;

/// One line of kernels.txt.
pub struct Kernel {
    pub archive: String,
    pub suite: String,
    pub package: String,
    pub expect: String,
}

/// The files of one kernel, extracted from its packages.
pub struct Fetched {
    pub release: String,
    pub vmlinuz: PathBuf,
    /// veth.ko, uncompressed (the inbound checks need a veth pair; every kernel listed builds it
    /// as a module).
    pub veth: PathBuf,
}

const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// apt-get with a private state, cache and sources list under `dir`.
pub struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// `uri` and `keyring` name the archive; `suites` its suites (component main).
    fn new(dir: PathBuf, uri: &str, keyring: &Path, suites: &[&str]) -> Result<Apt> {
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let list: String = suites
            .iter()
            .map(|s| {
                format!(
                    "deb [arch=amd64 signed-by={}] {uri} {s} main\n",
                    keyring.display()
                )
            })
            .collect();
        let path = dir.join("sources.list");
        let fresh = fs::read_to_string(&path).ok().as_deref() == Some(list.as_str());
        fs::write(&path, &list)?;
        let apt = Apt { dir };
        if !fresh || fs::read_dir(apt.dir.join("lists"))?.count() < 3 {
            util::step(&format!(
                "test-kernels: apt-get update {} (private state, Packages indexes only)",
                suites.join(" ")
            ));
            sh(apt.cmd("apt-get").args(["-q", "update"]))?;
        }
        Ok(apt)
    }

    fn cmd(&self, tool: &str) -> Command {
        let d = self.dir.display();
        let mut c = Command::new(tool);
        for o in [
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".into(),
            format!("Dir::Cache={d}/cache"),
            "Acquire::Languages=none".into(),
        ] {
            c.arg("-o").arg(o);
        }
        for t in [
            "DEP-11",
            "DEP-11-icons",
            "DEP-11-icons-hidpi",
            "Contents-deb",
            "CNF",
        ] {
            c.arg("-o").arg(format!(
                "Acquire::IndexTargets::deb::{t}::DefaultEnabled=false"
            ));
        }
        c
    }

    /// Downloads `pkg` (from `suite` when given) into a fresh `dir` and returns the .deb.
    fn download(&self, pkg: &str, suite: Option<&str>, dir: &Path) -> Result<PathBuf> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        let spec = suite.map_or(pkg.to_string(), |s| format!("{pkg}/{s}"));
        util::step(&format!("test-kernels: apt-get download {spec}"));
        sh(self
            .cmd("apt-get")
            .arg("download")
            .arg(&spec)
            .current_dir(dir))?;
        fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")
    }

    /// Follows metapackages (first Depends) down to the versioned image package.
    fn resolve(&self, k: &Kernel) -> Result<String> {
        let mut pkg = k.package.clone();
        for _ in 0..4 {
            let tail = pkg
                .trim_start_matches("linux-image-")
                .trim_start_matches("unsigned-");
            if tail.starts_with(|c: char| c.is_ascii_digit()) {
                return Ok(pkg);
            }
            let show = sh(self
                .cmd("apt-cache")
                .args(["show", &format!("{pkg}/{}", k.suite)]))?;
            pkg = show
                .lines()
                .find_map(|l| l.strip_prefix("Depends: "))
                .and_then(|d| d.split([' ', ',']).next())
                .with_context(|| format!("{pkg}: a metapackage without Depends"))?
                .to_string();
        }
        bail!("{}: no versioned linux-image package found", k.package)
    }
}

/// The archives kernels.txt names.
pub struct Archives {
    debian: Apt,
    ubuntu: Option<Apt>,
}

impl Archives {
    pub fn new(work: &Path, list: &[Kernel]) -> Result<Archives> {
        let suites = |archive: &str| {
            let mut s: Vec<&str> = list
                .iter()
                .filter(|k| k.archive == archive)
                .map(|k| k.suite.as_str())
                .collect();
            s.sort();
            s.dedup();
            s
        };
        if let Some(k) = list
            .iter()
            .find(|k| k.archive != "debian" && k.archive != "ubuntu")
        {
            bail!("kernels.txt: unknown archive {:?}", k.archive);
        }
        let mut debian_suites = suites("debian");
        let ubuntu_suites = suites("ubuntu");
        if !ubuntu_suites.is_empty() && !debian_suites.contains(&"trixie") {
            debian_suites.push("trixie"); // where ubuntu-keyring and debootstrap come from
        }
        let debian = Apt::new(
            work.join("apt"),
            &debian_uri()?,
            Path::new(DEBIAN_KEYRING),
            &debian_suites,
        )?;
        let ubuntu = if ubuntu_suites.is_empty() {
            None
        } else {
            let (uri, keyring) = ubuntu_archive(&debian, &work.join("ubuntu-archive"))?;
            Some(Apt::new(
                work.join("apt-ubuntu"),
                &uri,
                &keyring,
                &ubuntu_suites,
            )?)
        };
        Ok(Archives { debian, ubuntu })
    }

    /// The kernel's vmlinuz and veth.ko, downloaded once into `out`.
    pub fn fetch(&self, k: &Kernel, out: &Path) -> Result<Fetched> {
        let apt = match k.archive.as_str() {
            "ubuntu" => self.ubuntu.as_ref().context("no Ubuntu archive")?,
            _ => &self.debian,
        };
        let image = apt.resolve(k)?;
        let release = image
            .trim_start_matches("linux-image-")
            .trim_start_matches("unsigned-")
            .to_string();
        let vmlinuz = out.join(format!("vmlinuz-{release}"));
        let veth = out.join(format!("veth-{release}.ko"));
        if vmlinuz.exists() && veth.exists() {
            return Ok(Fetched {
                release,
                vmlinuz,
                veth,
            });
        }
        let dl = out.join("dl");
        let deb = apt.download(&image, Some(&k.suite), &dl)?;
        sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dl))?;
        // Debian's image package holds the modules; Ubuntu's are in linux-modules-RELEASE.
        if k.archive == "ubuntu" {
            let dlm = out.join("dl-modules");
            let deb = apt.download(&format!("linux-modules-{release}"), Some(&k.suite), &dlm)?;
            extract_veth(&deb, &dl)?;
            fs::remove_dir_all(&dlm)?;
        }
        let module = find_veth(&dl)?;
        let bytes = match module.extension().and_then(|e| e.to_str()) {
            Some("xz") => sh_bytes(Command::new("xz").arg("-dc").arg(&module))?,
            Some("zst") => sh_bytes(Command::new("zstd").arg("-dc").arg(&module))?,
            _ => fs::read(&module)?,
        };
        fs::write(&veth, bytes)?;
        fs::copy(dl.join(format!("boot/vmlinuz-{release}")), &vmlinuz)?;
        fs::remove_dir_all(&dl)?;
        Ok(Fetched {
            release,
            vmlinuz,
            veth,
        })
    }
}

fn sh_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// Only veth.ko out of a (large) modules package.
fn extract_veth(deb: &Path, into: &Path) -> Result<()> {
    sh(Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$0\" | tar -x -C \"$1\" --wildcards '*/drivers/net/veth.ko*'")
        .arg(deb)
        .arg(into))?;
    Ok(())
}

fn find_veth(dir: &Path) -> Result<PathBuf> {
    for lib in ["lib/modules", "usr/lib/modules"] {
        let Ok(entries) = fs::read_dir(dir.join(lib)) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            for name in ["veth.ko", "veth.ko.xz", "veth.ko.zst"] {
                let p = e.path().join("kernel/drivers/net").join(name);
                if p.exists() {
                    return Ok(p);
                }
            }
        }
    }
    bail!("no veth module in {}", dir.display())
}

/// The archive URI the machine's own apt sources name for Debian (deb822 or one-line form).
fn debian_uri() -> Result<String> {
    let mut text = String::new();
    for f in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        text += &fs::read_to_string(f).unwrap_or_default();
    }
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with("/debian"))
        .map(str::to_string)
        .context("no Debian archive URI in /etc/apt/sources.list*")
}

/// Ubuntu's archive URI (debootstrap's default mirror for amd64) and its keyring (Debian's
/// ubuntu-keyring package), both from the Debian archive, unpacked into `dir` once.
fn ubuntu_archive(debian: &Apt, dir: &Path) -> Result<(String, PathBuf)> {
    let root = dir.join("root");
    let keyring = root.join("usr/share/keyrings/ubuntu-archive-keyring.gpg");
    let script = root.join("usr/share/debootstrap/scripts/gutsy");
    if !keyring.exists() || !script.exists() {
        for pkg in ["ubuntu-keyring", "debootstrap"] {
            let deb = debian.download(pkg, None, &dir.join("dl"))?;
            sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        }
        fs::remove_dir_all(dir.join("dl"))?;
    }
    let text =
        fs::read_to_string(&script).with_context(|| format!("reading {}", script.display()))?;
    let uri = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("default_mirror "))
        .map(str::trim)
        .find(|u| u.ends_with("/ubuntu"))
        .context("debootstrap names no Ubuntu mirror")?
        .to_string();
    Ok((uri, keyring))
}
