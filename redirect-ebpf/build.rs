use which::which;

/// The eBPF crate silently depends on the `bpf-linker` binary; rebuild when it changes (see
/// aya-template for why this cannot be expressed as a real dependency).
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
