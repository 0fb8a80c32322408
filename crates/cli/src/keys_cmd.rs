//! `agentfense keys` and `agentfense tenants`: administration of an authenticated server,
//! done on its data directory (the metadata store and the key-hashing secret), so it works
//! whether or not the server runs; a running server sees changes within a second.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use agentfense_server::auth::Scope;
use agentfense_server::auth::keys::{KeyKind, ServerSecret, generate};
use agentfense_server::config::{Config, Overrides};
use std::sync::Arc;

use agentfense_server::store::{KeyRecord, Store};
use anyhow::Context;
use clap::{Args, Subcommand};

/// Where the server keeps its state.
#[derive(Debug, Args)]
pub struct StateArgs {
    /// The server's data directory (default: as `agentfense serve`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The server's config file, when it moves the database (`storage.db_path`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `agentfense keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Create a key; prints it (the only line on stdout). It is never shown again.
    Create {
        /// The tenant it acts for (created on first use).
        #[arg(long, value_name = "NAME")]
        tenant: String,
        /// A scope (repeatable): codebases:read, codebases:write, sandboxes:read,
        /// sandboxes:write, exec, admin. Default: all but admin.
        #[arg(long = "scope", value_name = "S")]
        scopes: Vec<Scope>,
        /// Lifetime, e.g. 30d or 12h (default: no expiry).
        #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        /// Where the server keeps its state.
        #[command(flatten)]
        state: StateArgs,
    },
    /// List keys and sandbox tokens (never their secrets).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Where the server keeps its state.
        #[command(flatten)]
        state: StateArgs,
    },
    /// Revoke a key or token by id; a running server refuses it within a second.
    Revoke {
        /// The id (`key_...` or `tok_...`), as `keys list` shows it.
        id: String,
        /// Where the server keeps its state.
        #[command(flatten)]
        state: StateArgs,
    },
}

/// `agentfense tenants ...`
#[derive(Debug, Subcommand)]
pub enum TenantsCmd {
    /// List known tenants and whether they are blocked.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Where the server keeps its state.
        #[command(flatten)]
        state: StateArgs,
    },
    /// Block a tenant: its keys, tokens and unix users are refused at once, and a running
    /// server stops its sandboxes (audited as `tenant_blocked`).
    Block {
        /// The tenant.
        name: String,
        /// Why (recorded in the audit trail).
        #[arg(long, default_value = "")]
        reason: String,
        /// Where the server keeps its state.
        #[command(flatten)]
        state: StateArgs,
    },
    /// Lift a block (its sandboxes stay stopped until started again).
    Unblock {
        /// The tenant.
        name: String,
        /// Where the server keeps its state.
        #[command(flatten)]
        state: StateArgs,
    },
}

/// The server's settings as `agentfense serve` would resolve them from `state`.
pub(crate) fn settings(state: &StateArgs) -> anyhow::Result<agentfense_server::config::Settings> {
    let config = match &state.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    Ok(config.resolve(
        Overrides {
            data_dir: state.data_dir.clone(),
            ..Overrides::default()
        },
        &crate::serve_cmd::default_data_dir(),
    )?)
}

pub(crate) fn open(state: &StateArgs) -> anyhow::Result<(Arc<dyn Store>, PathBuf)> {
    let settings = settings(state)?;
    let data_dir = settings.paths.data_dir.clone();
    if !data_dir.is_dir() {
        anyhow::bail!(
            "{} is not a server data directory (start the server once, or pass --data-dir)",
            data_dir.display()
        );
    }
    // The server's own choice of database: its SQLite file or `storage.database_url`.
    let store = agentfense_server::store::open(&settings)?;
    Ok((store, data_dir))
}

pub(crate) fn time(t: Option<SystemTime>) -> String {
    t.map_or_else(
        || "-".to_owned(),
        |t| humantime::format_rfc3339_seconds(t).to_string(),
    )
}

/// Runs `agentfense keys`.
pub fn keys(cmd: KeysCmd, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCmd::Create {
            tenant,
            scopes,
            expires,
            state,
        } => {
            let tenant = tenant.trim().to_owned();
            if tenant.is_empty() || tenant.len() > 128 || tenant.chars().any(char::is_control) {
                anyhow::bail!("--tenant must be 1-128 printable characters");
            }
            let (store, data_dir) = open(&state)?;
            let secret = ServerSecret::load_or_create(&ServerSecret::path_in(&data_dir))?;
            let mut scopes = if scopes.is_empty() {
                Scope::defaults()
            } else {
                scopes
            };
            scopes.sort();
            scopes.dedup();
            let new = generate(KeyKind::Key).map_err(|e| anyhow::anyhow!("{e}"))?;
            let now = SystemTime::now();
            let rec = KeyRecord {
                id: new.id.clone(),
                tenant: tenant.clone(),
                scopes: scopes.iter().map(|s| s.as_str().to_owned()).collect(),
                sandbox_id: None,
                parent_id: None,
                created_at: now,
                expires_at: expires.and_then(|d| now.checked_add(d)),
                last_used_at: None,
                revoked_at: None,
            };
            store
                .insert_key(&rec, &secret.hash(&new.secret))
                .context("storing the key")?;
            writeln!(out, "{}", new.secret)?;
            eprintln!(
                "agentfense: created {} for tenant {tenant:?} (scopes: {}; expires: {}); \
                 store it now, it cannot be shown again",
                new.id,
                rec.scopes.join(", "),
                time(rec.expires_at)
            );
        }
        KeysCmd::List { json, state } => {
            let (store, _) = open(&state)?;
            let keys = store.list_keys()?;
            if json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "id": k.id, "tenant": k.tenant, "scopes": k.scopes,
                            "sandbox_id": k.sandbox_id,
                            "created": time(Some(k.created_at)),
                            "expires": k.expires_at.map(|t| time(Some(t))),
                            "last_used": k.last_used_at.map(|t| time(Some(t))),
                            "revoked": k.revoked_at.map(|t| time(Some(t))),
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                writeln!(
                    out,
                    "{:<16}  {:<16}  {:<20}  {:<20}  {:<20}  {:<20}  SCOPES",
                    "ID", "TENANT", "CREATED", "EXPIRES", "LAST USED", "REVOKED"
                )?;
                for k in &keys {
                    let scopes = match &k.sandbox_id {
                        Some(s) => format!("{} (sandbox {s})", k.scopes.join(",")),
                        None => k.scopes.join(","),
                    };
                    writeln!(
                        out,
                        "{:<16}  {:<16}  {:<20}  {:<20}  {:<20}  {:<20}  {scopes}",
                        k.id,
                        k.tenant,
                        time(Some(k.created_at)),
                        time(k.expires_at),
                        time(k.last_used_at),
                        time(k.revoked_at),
                    )?;
                }
            }
        }
        KeysCmd::Revoke { id, state } => {
            let (store, _) = open(&state)?;
            if !store.revoke_key(&id, SystemTime::now())? {
                anyhow::bail!("no key with id {id:?} (see `agentfense keys list`)");
            }
            eprintln!("agentfense: revoked {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `agentfense tenants`.
pub fn tenants(cmd: TenantsCmd, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        TenantsCmd::List { json, state } => {
            let (store, _) = open(&state)?;
            let list = store.list_tenants()?;
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "name": t.name,
                            "created": time(Some(t.created_at)),
                            "blocked": t.blocked_at.map(|b| time(Some(b))),
                            "block_reason": t.block_reason,
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                writeln!(out, "{:<24}  {:<20}  BLOCKED", "TENANT", "CREATED")?;
                for t in &list {
                    let blocked = match (&t.blocked_at, &t.block_reason) {
                        (None, _) => "-".to_owned(),
                        (Some(at), r) => {
                            format!("{} {}", time(Some(*at)), r.as_deref().unwrap_or_default())
                        }
                    };
                    writeln!(
                        out,
                        "{:<24}  {:<20}  {}",
                        t.name,
                        time(Some(t.created_at)),
                        blocked.trim_end()
                    )?;
                }
            }
        }
        TenantsCmd::Block {
            name,
            reason,
            state,
        } => {
            let (store, _) = open(&state)?;
            if store.block_tenant(&name, &reason, SystemTime::now())? {
                eprintln!(
                    "agentfense: blocked tenant {name:?}: its credentials are refused now; a \
                     running server stops its sandboxes within a second"
                );
            } else {
                eprintln!("agentfense: tenant {name:?} was already blocked");
            }
        }
        TenantsCmd::Unblock { name, state } => {
            let (store, _) = open(&state)?;
            if !store.unblock_tenant(&name)? {
                anyhow::bail!("tenant {name:?} is not blocked");
            }
            eprintln!("agentfense: unblocked tenant {name:?}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
