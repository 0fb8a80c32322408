//! The `agentfense` binary: parse arguments, run, turn the outcome into an exit code.
//!
//! The same executable doubles as the sandbox init (PID 1 inside every bubblewrap sandbox):
//! the runtime binds it at `/run/agentfense/init`, so a server install is one file.

fn main() -> std::process::ExitCode {
    if std::env::args_os().next().as_deref()
        == Some(std::ffi::OsStr::new(
            agentfense_runtime::bwrap::SANDBOX_INIT,
        ))
    {
        agentfense_runtime::init::run_main();
    }
    // Before the first mount and the first FUSE thread (a process-wide setting).
    agentfense_fs::tune_allocator_for_fuse();
    agentfense_cli::main_with_args(std::env::args_os())
}
