use std::process::ExitCode;

fn main() -> ExitCode {
    match redirect_agent::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A kernel that lacks a feature gets exactly the probe's one line (issue #16).
            use redirect_agent::bpf::{BpfError, probe::ProbeError};
            // So does one that cannot run inbound while it is on.
            match e.chain().find_map(|c| c.downcast_ref::<BpfError>()) {
                Some(BpfError::Probe(ProbeError::Missing(m))) => eprintln!("Error: {m}"),
                Some(BpfError::Probe(ProbeError::Inbound(m))) => eprintln!("Error: {m}"),
                _ => eprintln!("Error: {e:?}"),
            }
            ExitCode::FAILURE
        }
    }
}
