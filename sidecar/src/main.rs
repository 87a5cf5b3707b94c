use clap::Parser;

fn main() -> anyhow::Result<()> {
    apipolicy_sidecar::cli::main(apipolicy_sidecar::cli::Cli::parse())
}
