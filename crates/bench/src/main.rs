//! `agentfense-bench`: measures AgentFense against its baselines in one invocation.
//!
//! Every case runs ours and its baseline interleaved (baseline, ours, baseline, ours, ...) on
//! a warm cache, so that a noisy machine affects both alike, and reports medians, p95, min-max,
//! N and the ratio. A case that errors fails the whole run: no figure from a failed run is
//! ever printed. Needs root (FUSE, namespaces, cgroups) and a release build of `agentfense`.
//!
//! ```sh
//! cargo build --release -p agentfense-cli -p agentfense-bench
//! sudo target/release/agentfense-bench --quick          # < 2 minutes
//! sudo target/release/agentfense-bench --out docs/performance.md
//! sudo target/release/agentfense-bench --only start,density   # some cases only
//! ```

mod harness;

use std::process::ExitCode;

use clap::Parser;

/// Command-line options.
#[derive(Debug, Parser)]
#[command(
    name = "agentfense-bench",
    about = "Measure AgentFense against its baselines"
)]
pub struct Opts {
    /// Small data and few iterations (under two minutes).
    #[arg(long)]
    pub quick: bool,
    /// Also write the markdown report here.
    #[arg(long, value_name = "FILE")]
    pub out: Option<std::path::PathBuf>,
    /// The agentfense executable (default: next to this one).
    #[arg(long, value_name = "PATH")]
    pub agentfense: Option<std::path::PathBuf>,
    /// Where to generate data (default: target/bench-data, on disk, not tmpfs).
    #[arg(long, value_name = "DIR")]
    pub work: Option<std::path::PathBuf>,
    /// Pin the server, the sandboxes and the native baselines to this CPU (default 0);
    /// `none` leaves placement to the scheduler.
    #[arg(long, default_value = "0")]
    pub cpu: String,
    /// Run only these cases (comma-separated): fs, pause, cold, run, sdk, exec, session, start,
    /// density, concurrency, auth, egress, review. Default: all of them.
    #[arg(long, value_name = "CASES", value_delimiter = ',')]
    pub only: Vec<String>,
    /// Keep the main server's metadata in this PostgreSQL (`storage.database_url`) instead of
    /// SQLite, e.g. to compare `--only start,exec` runs of each.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    match harness::run(&opts) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentfense-bench: FAILED: {e:#}");
            ExitCode::from(1)
        }
    }
}
