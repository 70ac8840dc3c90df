use std::process::ExitCode;

fn main() -> ExitCode {
    match redirect_agent::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A kernel that lacks a feature gets exactly the probe's one line (issue #16).
            use redirect_agent::bpf::{BpfError, probe::ProbeError};
            if let Some(BpfError::Probe(ProbeError::Missing(m))) =
                e.chain().find_map(|c| c.downcast_ref::<BpfError>())
            {
                eprintln!("Error: {m}");
            } else {
                eprintln!("Error: {e:?}");
            }
            ExitCode::FAILURE
        }
    }
}
