//! `agentfense run`: one command in a sandbox over a local directory, without a server.
//!
//! The directory is the read-only lower layer (nothing is copied); the command's writes go to
//! a delta kept under the data directory, so that several runs over the same directory build
//! on each other. Afterwards a summary lists what changed; `--apply` writes the changes into
//! the directory, `--discard` drops them (see [`crate::local`]).

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use agentfense_runtime::{ExecEvent, ExecRequest, Runtime};
use clap::Args;

use crate::local::{LocalArgs, LocalSandbox, exit_code};

/// Options of `agentfense run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Sandbox and policy options.
    #[command(flatten)]
    pub local: LocalArgs,
    /// The project directory (read-only lower layer).
    #[arg(value_name = "DIR")]
    pub dir: std::path::PathBuf,
    /// Timeout in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// The command: one argument is a shell command line (run with /bin/sh -c); several are a
    /// program and its arguments, run exactly as given.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

pub(crate) fn run(args: RunArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.timeout.is_finite() && args.timeout > 0.0,
        "--timeout must be a positive number of seconds"
    );
    let timeout = Duration::from_secs_f64(args.timeout);
    let local = LocalSandbox::mount(&args.local, &args.dir, timeout)?;
    let stdin = if std::io::stdin().is_terminal() {
        Vec::new()
    } else {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        buf
    };
    let req = ExecRequest {
        command: crate::command_line(&args.command)?,
        stdin,
        env: local.env.clone(),
        workdir: String::new(),
        timeout: Some(timeout),
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let code = rt.block_on(local.with_sandbox_interruptible(async |runtime, id| {
        let mut stream = runtime.exec_stream(id, req).await?;
        let mut code = 0;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ExecEvent::Stdout(s)) => {
                    out.write_all(s.as_bytes())?;
                    out.flush()?;
                }
                Ok(ExecEvent::Stderr(s)) => {
                    let mut e = std::io::stderr();
                    e.write_all(s.as_bytes())?;
                    e.flush()?;
                }
                Ok(ExecEvent::Exit { exit_code, .. }) => code = exit_code,
                Err(e) => return Err(anyhow::Error::from(e)),
            }
        }
        Ok(code)
    }));
    let code = match code {
        Ok(code) => code,
        Err(e) => match e.downcast_ref::<crate::local::Interrupted>() {
            Some(crate::local::Interrupted(signal)) => return local.finish_interrupted(*signal),
            None => return Err(e),
        },
    };
    local.finish()?;
    Ok(exit_code(code))
}
