//! Copying a full run to the committed docs/bench/, keeping what people wrote there by hand: the
//! generated report ends with [`GENERATED_END`], and everything after it in the old REPORT.md
//! (a hand-written section, such as a per-program cost table) is carried over to the new one.
use std::{fs, path::Path};

use anyhow::{Context as _, Result};

/// The last line the generator writes; text below it in docs/bench/REPORT.md survives a rerun.
pub const GENERATED_END: &str = "<!-- End of what `cargo xtask bench` generates. Sections below this line are written by hand and kept when it regenerates this file. -->";

/// Headings the generator writes (or wrote in earlier versions), to tell a hand-written section
/// of a report that predates [`GENERATED_END`].
const GENERATED_HEADINGS: [&str; 14] = [
    "Method",
    "Targets",
    "Where the time goes",
    "New connections per second",
    "Interception only",
    "CPU time per connection",
    "Connect latency",
    "Inbound",
    "Throughput of one long transfer",
    "Loading the exclusion list",
    "The agent at scale",
    "Where the eBPF time goes",
    "Reproduce",
    "redirect: eBPF vs iptables",
];

/// The hand-written part of an old report.
pub fn hand_written(old: &str) -> String {
    if let Some((_, tail)) = old.split_once(GENERATED_END) {
        return tail.trim_start_matches('\n').to_string();
    }
    let mut kept = String::new();
    let mut keep = false;
    for line in old.split_inclusive('\n') {
        if let Some(h) = line.strip_prefix("## ") {
            keep = !GENERATED_HEADINGS.iter().any(|g| h.starts_with(g));
        }
        if keep {
            kept.push_str(line);
        }
    }
    kept
}

/// Copies a full run's report, CSVs and PNGs to `to`, keeping the old report's hand-written part.
pub fn publish(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    let old = fs::read_to_string(to.join("REPORT.md")).unwrap_or_default();
    for entry in fs::read_dir(from)? {
        let path = entry?.path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("md" | "csv" | "png")
        ) {
            fs::copy(&path, to.join(path.file_name().expect("a file")))
                .with_context(|| format!("copy {} to {}", path.display(), to.display()))?;
        }
    }
    let kept = hand_written(&old);
    if !kept.trim().is_empty() {
        let report = to.join("REPORT.md");
        let mut md = fs::read_to_string(&report)?;
        md.push('\n');
        md.push_str(&kept);
        fs::write(&report, md)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_hand_written_sections() {
        let marked =
            format!("# r\n\n## Targets\n\nx\n\n{GENERATED_END}\n\n## Per-program cost\n\ny\n");
        assert_eq!(hand_written(&marked), "## Per-program cost\n\ny\n");
        let unmarked = "# redirect: eBPF vs iptables\n\n## Targets\n\nx\n\n## Per-program BPF cost (by hand)\n\ny\n\n## Reproduce\n\nz\n";
        assert_eq!(
            hand_written(unmarked),
            "## Per-program BPF cost (by hand)\n\ny\n\n"
        );
        assert_eq!(hand_written("## Targets\n\nx\n"), "");
    }
}
