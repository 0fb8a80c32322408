//! The `agentfense` command line.
//!
//! The binary is a thin shell over [`main_with_args`], so that every command can be tested
//! in-process and through the real executable.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod audit_cmd;
mod client_cmd;
mod host_tree;
mod keys_cmd;
mod local;
mod mcp_cmd;
mod nodes_cmd;
pub mod policy_args;
mod policy_cmd;
mod review_cmd;
mod run_cmd;
pub mod scan_cmd;
mod serve_cmd;
mod shell_cmd;
mod terminal;

pub use policy_args::PolicyArgs;

/// AgentFense: least-privilege sandboxes for AI agents.
#[derive(Debug, Parser)]
#[command(name = "agentfense", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one command in a sandbox over a local directory, without a server.
    ///
    /// The directory is the read-only lower layer; writes go to a delta that is kept (and
    /// reused by later runs) until --apply writes it into the directory or --discard drops it.
    /// Exit code, stdout and stderr are the command's own. Needs root (FUSE, namespaces).
    ///
    /// Example: sudo agentfense run --preset agent-safe ./project -- python3 src/main.py
    Run(run_cmd::RunArgs),
    /// An interactive shell in a sandbox over a local directory, without a server.
    ///
    /// Same sandbox, policy and delta as `run` (writes are kept until --apply or --discard),
    /// on a real terminal: line editing, job control (Ctrl-Z, fg, Ctrl-C) and resizing work.
    /// The shell's exit code is the exit code; a summary of the changes follows. Needs an
    /// interactive terminal (use `run` for scripts) and root (FUSE, namespaces).
    ///
    /// Example: sudo agentfense shell --preset agent-safe ./project
    Shell(shell_cmd::ShellArgs),
    /// An MCP server on stdin/stdout: coding agents (Claude Code, Cursor, Codex) use a
    /// sandbox as their shell and file tools.
    ///
    /// With --dir, a local sandbox over the project for the life of the MCP session (its
    /// changes kept like `run` keeps them; needs root); with --sandbox, an existing sandbox on
    /// a server. The agent cannot create sandboxes, change rules or widen the network.
    ///
    /// Example: sudo agentfense mcp --dir ./project --preset agent-safe
    Mcp(mcp_cmd::McpArgs),
    /// Inspect and test permission rules before deploying them.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// List the built-in presets and their rules.
    ///
    /// Example: agentfense presets
    Presets {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the AgentFense service (gRPC on 127.0.0.1:9000, REST on 127.0.0.1:8080).
    ///
    /// Without --config it runs on built-in defaults: the bwrap runtime, SQLite metadata and
    /// all state under one data directory.
    ///
    /// Example: agentfense serve --data-dir ./agentfense-data
    Serve(serve_cmd::ServeArgs),
    /// List files that look like secrets and say which the policy would expose; exits 1 when
    /// an exposed secret is found (use it to gate uploads in CI).
    ///
    /// Example: agentfense scan ./project --preset agent-safe
    Scan(scan_cmd::ScanArgs),
    /// API keys of an authenticated server (`auth.enabled`), on its data directory; works
    /// while the server runs.
    ///
    /// Example: agentfense keys create --tenant team-a --scope exec --expires 30d
    #[command(subcommand)]
    Keys(keys_cmd::KeysCmd),
    /// Tenants of an authenticated server: list, block (incident response: its keys stop
    /// working and its sandboxes are stopped), unblock.
    ///
    /// Example: agentfense tenants block team-a --reason "leaked key"
    #[command(subcommand)]
    Tenants(keys_cmd::TenantsCmd),
    /// The machines that run sandboxes: list them (capacity, heartbeat, sandboxes), drain
    /// one before maintenance (no new sandboxes there), undrain it.
    ///
    /// Example: agentfense nodes drain worker-1
    #[command(subcommand)]
    Nodes(nodes_cmd::NodesCmd),
    /// The server's audit trail: query it (`--sandbox`, `--tenant`, `--event`, `--since`,
    /// `--follow`), or `verify` its hash chain. Reads the data directory.
    ///
    /// Example: agentfense audit --sandbox sb_0123456789abcdef --event permission_denied --since 1h
    Audit(audit_cmd::AuditArgs),
    /// Manage codebases on a server.
    Codebase {
        /// What to do.
        #[command(subcommand)]
        cmd: client_cmd::CodebaseCmd,
        /// Connection options.
        #[command(flatten)]
        conn: client_cmd::Conn,
    },
    /// Manage sandboxes on a server.
    Sandbox {
        /// What to do.
        #[command(subcommand)]
        cmd: client_cmd::SandboxCmd,
        /// Connection options.
        #[command(flatten)]
        conn: client_cmd::Conn,
    },
    /// Run a command in a running sandbox on a server; exits with its exit code.
    ///
    /// Example: agentfense exec sb_0123456789abcdef -- ls -la
    Exec {
        /// Command options.
        #[command(flatten)]
        args: client_cmd::ExecArgs,
        /// Connection options.
        #[command(flatten)]
        conn: client_cmd::Conn,
    },
    /// What a sandbox changed against its codebase, path by path (a server sandbox, or the
    /// changes `agentfense run` kept for a directory).
    ///
    /// Example: agentfense changes sb_0123456789abcdef --path 'src/**'
    Changes(review_cmd::ChangesArgs),
    /// A git-compatible diff of a sandbox's changes (or between checkpoints): `git apply`
    /// takes it.
    ///
    /// Example: agentfense diff ./project | git -C ./copy apply
    Diff(review_cmd::DiffArgs),
    /// Write a sandbox's changes (all, or those --path selects) into its codebase: all or
    /// nothing, refused when the codebase changed under one of them since.
    ///
    /// Example: agentfense apply sb_0123456789abcdef --path 'src/**'
    Apply(review_cmd::ApplyArgs),
    /// Drop a sandbox's changes (all, or those --path selects): it sees the codebase there
    /// again.
    Discard(review_cmd::Target),
    /// Checkpoints of a sandbox's changes: create, ls, restore, rm.
    Checkpoint {
        /// What to do.
        #[command(subcommand)]
        cmd: review_cmd::CheckpointCmd,
    },
    /// Persistent shells in a sandbox on a server.
    Session {
        /// What to do.
        #[command(subcommand)]
        cmd: client_cmd::SessionCmd,
        /// Connection options.
        #[command(flatten)]
        conn: client_cmd::Conn,
    },
}

/// Parses `args` (including the program name), runs the command, and returns the exit code.
/// Errors are printed to stderr as one clear line each.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // `mcp` speaks its protocol on stdout from its own threads: holding the lock here would
    // block every answer.
    let (mut sink, mut locked);
    let out: &mut dyn Write = if matches!(cli.command, Command::Mcp(_)) {
        sink = std::io::sink();
        &mut sink
    } else {
        locked = std::io::stdout().lock();
        &mut locked
    };
    match run(cli, out) {
        Ok(code) => code,
        // The reader went away (`agentfense ... | head`): not an error worth a message.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::from(141)
        }
        Err(e) => {
            let _ = out.flush();
            eprintln!("agentfense: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs a parsed command, writing its normal output to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Policy(cmd) => policy_cmd::run(cmd, out),
        Command::Presets { json } => {
            policy_cmd::list_presets(json, out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => serve_cmd::run(args),
        Command::Run(args) => run_cmd::run(args, out),
        Command::Shell(args) => shell_cmd::run(args),
        Command::Mcp(args) => mcp_cmd::run(args),
        Command::Scan(args) => scan_cmd::run(args, out),
        Command::Keys(cmd) => keys_cmd::keys(cmd, out),
        Command::Audit(a) => audit_cmd::run(a, out),
        Command::Tenants(cmd) => keys_cmd::tenants(cmd, out),
        Command::Nodes(cmd) => nodes_cmd::run(cmd, out),
        Command::Codebase { cmd, conn } => client_cmd::codebase(cmd, conn, out),
        Command::Sandbox { cmd, conn } => client_cmd::sandbox(cmd, conn, out),
        Command::Exec { args, conn } => client_cmd::exec(args, conn, out),
        Command::Session { cmd, conn } => client_cmd::session(cmd, conn, out),
        Command::Changes(a) => review_cmd::changes(a, out),
        Command::Diff(a) => review_cmd::diff(a, out),
        Command::Apply(a) => review_cmd::apply(a, out),
        Command::Discard(t) => review_cmd::discard(t, out),
        Command::Checkpoint { cmd } => review_cmd::checkpoint(cmd, out),
    }
}

/// The `/bin/sh -c` command line of the words after `--`: one word is a shell command line as
/// written (`-- 'make && make test'`); several are a program and its arguments, run exactly
/// (each quoted: no re-splitting, no globbing, no expansion).
pub(crate) fn command_line(words: &[String]) -> anyhow::Result<String> {
    match words {
        [one] => Ok(one.clone()),
        _ => shlex::try_join(words.iter().map(String::as_str))
            .map_err(|e| anyhow::anyhow!("cannot pass the command's arguments to the shell: {e}")),
    }
}

#[cfg(test)]
mod command_line_tests {
    use super::command_line;

    #[test]
    fn one_word_is_a_shell_line_several_are_an_argv() {
        let w = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            command_line(&w(&["echo a && echo b"])).unwrap(),
            "echo a && echo b"
        );
        let line = command_line(&w(&[
            "printf", "%s|%s\\n", "a b", "c", "*", "$HOME", "it's",
        ]))
        .unwrap();
        let back = shlex::split(&line).unwrap();
        assert_eq!(
            back,
            w(&["printf", "%s|%s\\n", "a b", "c", "*", "$HOME", "it's"])
        );
        assert!(command_line(&w(&["a", "b\0c"])).is_err());
    }
}
