//! `agentfense audit`: query the server's audit trail (every file of it, rotated ones
//! included) and `agentfense audit verify` its hash chain. Works on the data directory, whether
//! or not the server runs.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::keys_cmd::StateArgs;

/// `agentfense audit ...`
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    cmd: Option<AuditCmd>,
    #[command(flatten)]
    query: Query,
}

/// `agentfense audit verify`
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check the trail's hash chain across every file: any record edited, removed or
    /// reordered is found (exit 1).
    Verify {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Where the server keeps its state.
        #[command(flatten)]
        state: StateArgs,
    },
}

/// Filters of `agentfense audit`.
#[derive(Debug, Args)]
pub struct Query {
    /// Only this sandbox's events.
    #[arg(long, value_name = "ID")]
    sandbox: Option<String>,
    /// Only this tenant's events.
    #[arg(long, value_name = "NAME")]
    tenant: Option<String>,
    /// Only these events (repeatable), e.g. permission_denied, command_executed.
    #[arg(long = "event", value_name = "EVENT")]
    events: Vec<String>,
    /// Only events since this long ago (`1h`, `30m`) or this time (RFC 3339).
    #[arg(long, value_name = "DUR|TIME")]
    since: Option<String>,
    /// Keep printing new events as they are written (across rotations).
    #[arg(long, short = 'f')]
    follow: bool,
    /// `json`: the records as written; `ocsf`: each as an OCSF 1.1 event (for SIEMs), the
    /// record itself under `unmapped`.
    #[arg(long, value_name = "FORMAT", default_value = "json", value_parser = ["json", "ocsf"])]
    format: String,
    /// Where the server keeps its state.
    #[command(flatten)]
    state: StateArgs,
}

fn since(s: &str) -> anyhow::Result<SystemTime> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(SystemTime::now() - d);
    }
    humantime::parse_rfc3339_weak(s).with_context(|| {
        format!("--since {s:?}: expected a duration (1h, 30m) or a time (2026-12-07T10:00:00Z)")
    })
}

struct Filter {
    ocsf: bool,
    sandbox: Option<String>,
    tenant: Option<String>,
    events: Vec<String>,
    since: Option<SystemTime>,
}

impl Filter {
    fn keeps(&self, line: &[u8]) -> bool {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            return false;
        };
        let field = |k: &str| v.get(k).and_then(|x| x.as_str());
        if self
            .sandbox
            .as_deref()
            .is_some_and(|s| field("sandbox_id") != Some(s))
        {
            return false;
        }
        if self
            .tenant
            .as_deref()
            .is_some_and(|t| field("tenant") != Some(t))
        {
            return false;
        }
        if !self.events.is_empty()
            && !field("event").is_some_and(|e| self.events.iter().any(|x| x == e))
        {
            return false;
        }
        if let Some(cut) = self.since {
            let at = field("timestamp").and_then(|t| humantime::parse_rfc3339(t).ok());
            if at.is_none_or(|t| t < cut) {
                return false;
            }
        }
        true
    }
}

/// Prints the kept complete lines read from `r`; returns an unfinished last line, if any.
fn pump(
    r: &mut BufReader<File>,
    partial: &mut Vec<u8>,
    f: &Filter,
    out: &mut dyn Write,
) -> anyhow::Result<bool> {
    let mut any = false;
    loop {
        let n = r.read_until(b'\n', partial)?;
        if n == 0 || partial.last() != Some(&b'\n') {
            return Ok(any);
        }
        any = true;
        if f.keeps(&partial[..partial.len() - 1]) {
            if f.ocsf {
                let v: serde_json::Value = serde_json::from_slice(&partial[..partial.len() - 1])?;
                writeln!(out, "{}", serde_json::to_string(&ocsf(&v))?)?;
            } else {
                out.write_all(partial)?;
            }
        }
        partial.clear();
    }
}

fn audit_path(state: &StateArgs) -> anyhow::Result<PathBuf> {
    let paths = crate::keys_cmd::settings(state)?.paths;
    anyhow::ensure!(
        paths.audit.exists() || !agentfense_server::audit::rotated_files(&paths.audit).is_empty(),
        "no audit trail at {} (start the server once, or pass --data-dir / --config)",
        paths.audit.display()
    );
    Ok(paths.audit)
}

/// `agentfense audit`
pub(crate) fn run(a: AuditArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match a.cmd {
        Some(AuditCmd::Verify { json, state }) => verify(&audit_path(&state)?, json, out),
        None => query(a.query, out),
    }
}

fn verify(path: &Path, json: bool, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let v = agentfense_server::audit::verify(path)
        .with_context(|| format!("cannot read the audit trail at {}", path.display()))?;
    if json {
        crate::client_cmd::print_json(
            out,
            &serde_json::json!({
                "ok": v.problems.is_empty(),
                "files": v.files,
                "records": v.records,
                "unchained": v.unchained,
                "first_seq": v.first_seq,
                "last_seq": v.last_seq,
                "last_hash": v.last_hash,
                "starts_after_retention": v.starts_after_retention,
                "problems": v.problems,
            }),
        )?;
    } else {
        for p in &v.problems {
            writeln!(out, "BROKEN  {p}")?;
        }
        let range = match (v.first_seq, v.last_seq) {
            (Some(a), Some(b)) => format!(", seq {a}..{b}"),
            _ => String::new(),
        };
        writeln!(
            out,
            "{}: {} record(s) in {} file(s){range}{}{}",
            if v.problems.is_empty() {
                "audit trail intact"
            } else {
                "audit trail BROKEN"
            },
            v.records,
            v.files.len(),
            if v.starts_after_retention {
                " (older records deleted by the retention)"
            } else {
                ""
            },
            v.last_hash
                .as_deref()
                .map(|h| format!("; last record's hash {h}"))
                .unwrap_or_default()
        )?;
    }
    Ok(if v.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn query(q: Query, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let path = audit_path(&q.state)?;
    let filter = Filter {
        ocsf: q.format == "ocsf",
        sandbox: q.sandbox,
        tenant: q.tenant,
        events: q.events,
        since: q.since.as_deref().map(since).transpose()?,
    };
    let mut partial = Vec::new();
    for f in agentfense_server::audit::rotated_files(&path) {
        let mut r = BufReader::new(File::open(&f)?);
        pump(&mut r, &mut partial, &filter, out)?;
        partial.clear();
    }
    // The current file: read through one handle, which --follow then keeps reading.
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !q.follow => {
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let mut ino = file.metadata()?.ino();
    let mut r = BufReader::new(file.try_clone()?);
    pump(&mut r, &mut partial, &filter, out)?;
    out.flush()?;
    if !q.follow {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        if pump(&mut r, &mut partial, &filter, out)? {
            out.flush()?;
            continue;
        }
        // Rotated: what was left in the old file has been read; go on with the new one.
        match std::fs::metadata(&path) {
            Ok(m) if m.ino() != ino => {
                file = File::open(&path)?;
                ino = file.metadata()?.ino();
                r = BufReader::new(file.try_clone()?);
                partial.clear();
                continue;
            }
            _ => {}
        }
        // Polling, as `tail -f` does where it has no notification: a quarter second.
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One audit record as an OCSF 1.1 event: the class that fits it (file system activity for
/// denials and publishes, authentication, detection finding for alerts, network activity,
/// process activity for commands, API activity for the rest), its time, severity, actor and
/// message; the whole record under `unmapped`.
fn ocsf(rec: &serde_json::Value) -> serde_json::Value {
    let event = rec["event"].as_str().unwrap_or("");
    // (category_uid, class_uid, class_name, activity_id)
    let (category, class, class_name, activity) = match event {
        "permission_denied" => (1, 1001, "File System Activity", 0),
        "publish_conflict" | "publish_refused" | "publish_failed" | "changes_applied"
        | "changes_discarded" => (1, 1001, "File System Activity", 3),
        "command_executed" => (1, 1007, "Process Activity", 1),
        "authentication_failed" => (3, 3002, "Authentication", 1),
        "network_connection" => (4, 4001, "Network Activity", 1),
        "alert" => (2, 2004, "Detection Finding", 1),
        e if e.ends_with("_created") => (6, 6003, "API Activity", 1),
        e if e.ends_with("_deleted") || e.ends_with("_destroyed") => (6, 6003, "API Activity", 4),
        _ => (6, 6003, "API Activity", 99),
    };
    let severity_id = match (event, rec["severity"].as_str()) {
        ("alert", Some("high")) => 4,
        ("alert", Some("medium")) => 3,
        ("alert", _) => 2,
        ("permission_denied" | "authentication_failed" | "resource_limit_exceeded", _) => 3,
        ("node_lost" | "sandbox_lost", _) => 4,
        _ => 1,
    };
    let status_id = match event {
        "permission_denied" | "authentication_failed" | "publish_failed" => 2,
        "network_connection" if rec["decision"] == "refused" => 2,
        _ => 1,
    };
    let time = rec["timestamp"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    serde_json::json!({
        "category_uid": category,
        "class_uid": class,
        "class_name": class_name,
        "activity_id": activity,
        "type_uid": class * 100 + activity,
        "severity_id": severity_id,
        "status_id": status_id,
        "time": time,
        "message": event,
        "metadata": {
            "version": "1.1.0",
            "product": {"name": "AgentFense", "vendor_name": "AgentFense"},
            "uid": rec["seq"].to_string(),
        },
        "actor": {
            "user": {"uid": rec["key_id"], "org": {"name": rec["tenant"]}},
        },
        "resources": rec.get("sandbox_id").map(|s| vec![serde_json::json!({"uid": s, "type": "sandbox"})]),
        "unmapped": rec,
    })
}
