//! The `agentfense` binary: parse arguments, run, turn the outcome into an exit code.

fn main() -> std::process::ExitCode {
    agentfense_cli::main_with_args(std::env::args_os())
}
