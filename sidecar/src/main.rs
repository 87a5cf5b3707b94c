use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match apipolicy_sidecar::cli::main(apipolicy_sidecar::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // One clean message for a mistake (never a backtrace, whatever RUST_BACKTRACE says).
        Err(e) => {
            eprintln!("error: {}", apipolicy_sidecar::cli::one_message(&e));
            ExitCode::FAILURE
        }
    }
}
