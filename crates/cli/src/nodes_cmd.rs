//! `agentfense nodes`: the machines that run sandboxes, as the metadata store knows them, and
//! draining one (no new sandboxes) before maintenance. Works on the server's data directory
//! and configuration, like `agentfense keys`, whether or not the server runs.

use std::io::Write;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Subcommand;

use crate::keys_cmd::{StateArgs, open, time};

/// `agentfense nodes ...`
#[derive(Debug, Subcommand)]
pub enum NodesCmd {
    /// List nodes: capacity, last heartbeat, state (ready, draining, or lost: no heartbeat
    /// for `nodes.lost_after`), sandboxes on each (not counting those lost with it).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Where the server keeps its state.
        #[command(flatten)]
        state: StateArgs,
    },
    /// Stop placing new sandboxes on a node (creating one there is refused with UNAVAILABLE);
    /// its sandboxes keep running. For maintenance: drain, wait, then stop it.
    Drain {
        /// The node id, as `nodes list` shows it.
        node: String,
        /// Where the server keeps its state.
        #[command(flatten)]
        state: StateArgs,
    },
    /// Forget a lost node (see `nodes list`): its row goes; its lost sandboxes stay until
    /// destroyed. Refused for a node that is not lost. If it ever comes back it registers
    /// anew.
    Rm {
        /// The node id.
        node: String,
        /// Where the server keeps its state.
        #[command(flatten)]
        state: StateArgs,
    },
    /// Let a drained node take new sandboxes again.
    Undrain {
        /// The node.
        node: String,
        /// Where the server keeps its state.
        #[command(flatten)]
        state: StateArgs,
    },
}

/// Runs `agentfense nodes`.
pub fn run(cmd: NodesCmd, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        NodesCmd::List { json, state } => {
            let (store, _) = open(&state)?;
            let nodes = store.list_nodes()?;
            let mut on: std::collections::BTreeMap<String, usize> = Default::default();
            for s in store.all_sandboxes()? {
                if s.lost_at.is_none() {
                    *on.entry(s.node).or_default() += 1;
                }
            }
            let state = |n: &agentfense_server::store::NodeRecord| match (n.lost_at, n.draining) {
                (Some(_), _) => "lost",
                (None, true) => "draining",
                (None, false) => "ready",
            };
            let now = SystemTime::now();
            let age = |t: SystemTime| now.duration_since(t).map_or(0, |d| d.as_secs());
            if json {
                let v: Vec<_> = nodes
                    .iter()
                    .map(|n| {
                        serde_json::json!({
                            "id": n.id,
                            "host": n.host,
                            "boot_id": n.boot_id,
                            "cpus": n.cpus,
                            "memory_bytes": n.memory_bytes,
                            "draining": n.draining,
                            "registered": time(Some(n.registered_at)),
                            "heartbeat": time(Some(n.heartbeat_at)),
                            "heartbeat_age_seconds": age(n.heartbeat_at),
                            "state": state(n),
                            "lost": n.lost_at.map(|t| time(Some(t))),
                            "sandboxes": on.get(&n.id).copied().unwrap_or(0),
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                writeln!(
                    out,
                    "{:<32}  {:<20}  {:>4}  {:>9}  {:<20}  {:>9}  {:>9}  STATE",
                    "NODE", "HOST", "CPUS", "MEMORY", "HEARTBEAT", "AGE", "SANDBOXES"
                )?;
                for n in &nodes {
                    writeln!(
                        out,
                        "{:<32}  {:<20}  {:>4}  {:>8}M  {:<20}  {:>8}s  {:>9}  {}",
                        n.id,
                        n.host,
                        n.cpus,
                        n.memory_bytes >> 20,
                        time(Some(n.heartbeat_at)),
                        age(n.heartbeat_at),
                        on.get(&n.id).copied().unwrap_or(0),
                        state(n)
                    )?;
                }
            }
        }
        NodesCmd::Drain { node, state } => {
            let (store, _) = open(&state)?;
            if !store.set_node_draining(&node, true)? {
                anyhow::bail!("no node {node:?} (see `agentfense nodes list`)");
            }
            eprintln!(
                "agentfense: node {node:?} is draining: new sandboxes are refused there; its \
                 sandboxes keep running"
            );
        }
        NodesCmd::Rm { node, state } => {
            let (store, _) = open(&state)?;
            if !store.remove_lost_node(&node)? {
                match store.get_node(&node)? {
                    None => anyhow::bail!("no node {node:?} (see `agentfense nodes list`)"),
                    Some(_) => anyhow::bail!(
                        "node {node:?} is not lost: only a node declared lost (no heartbeat for \
                         nodes.lost_after) can be removed; stop it and wait, or drain it"
                    ),
                }
            }
            eprintln!("agentfense: node {node:?} forgotten");
        }
        NodesCmd::Undrain { node, state } => {
            let (store, _) = open(&state)?;
            if !store.set_node_draining(&node, false)? {
                anyhow::bail!("no node {node:?} (see `agentfense nodes list`)");
            }
            eprintln!("agentfense: node {node:?} takes new sandboxes again");
        }
    }
    Ok(ExitCode::SUCCESS)
}
