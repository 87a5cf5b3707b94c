use clap::Parser;

fn main() -> std::process::ExitCode {
    apipolicy_operator::cli::main(apipolicy_operator::cli::Cli::parse())
}
