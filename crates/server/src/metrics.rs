//! Prometheus metrics, served on their own listener (`server.metrics_addr`, off by default).
//!
//! Labels are bounded: runtimes, results, operations, levels, limit kinds, gRPC methods, codes,
//! alert rules; never a sandbox, tenant or path. One registry per process
//! ([`metrics`]): every part of the server records into it without plumbing.

use std::sync::OnceLock;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `state`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// pending, running, stopped, error.
    pub state: String,
}

/// `runtime`, `result`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExecLabels {
    /// bwrap or docker.
    pub runtime: String,
    /// ok (exit 0), nonzero, timeout, error.
    pub result: String,
}

/// `runtime`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuntimeLabel {
    /// bwrap or docker.
    pub runtime: String,
}

/// `operation`, `level`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// The filesystem operation refused (lookup, open, write, ...).
    pub operation: String,
    /// The level the path had (none, view, read).
    pub level: String,
}

/// `kind`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// memory, pids, disk, timeout, output, ...
    pub kind: String,
}

/// `protocol`, `method`, `code`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// grpc or rest.
    pub protocol: String,
    /// The gRPC method (`sandbox.v1.SandboxService/Exec`; REST calls count as the method
    /// they call).
    pub method: String,
    /// The gRPC status code name (OK, NOT_FOUND, ...).
    pub code: String,
}

/// `rule`, `severity`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    /// The alert rule.
    pub rule: String,
    /// low, medium, high.
    pub severity: String,
}

/// `operation`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    /// The filesystem operation (lookup, read, write, ...).
    pub operation: String,
}

/// `decision`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    /// allowed or refused.
    pub decision: String,
}

type Hist = Family<RuntimeLabel, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric of the server.
pub struct Metrics {
    registry: Registry,
    /// The metric families' names (with the prefix).
    names: Vec<String>,
    /// Sandboxes by state (set at each scrape).
    pub sandboxes: Family<StateLabel, Gauge<i64, AtomicI64>>,
    /// Time to start a sandbox (mount + runtime), by runtime.
    pub sandbox_start_seconds: Hist,
    /// Commands run, by runtime and result.
    pub exec_total: Family<ExecLabels, Counter>,
    /// Command wall time, by runtime.
    pub exec_seconds: Hist,
    /// Commands running now.
    pub commands_in_flight: Gauge<i64, AtomicI64>,
    /// Filesystem operations served, by operation (brought up to date at each scrape).
    pub fs_operations_total: Family<OperationLabel, Counter>,
    /// Filesystem denials, by operation and level.
    pub fs_denials_total: Family<DenialLabels, Counter>,
    /// Resource limits hit, by kind.
    pub limit_hits_total: Family<KindLabel, Counter>,
    /// Bytes the running sandboxes' deltas take (set at each scrape).
    pub delta_bytes: Gauge<i64, AtomicI64>,
    /// API requests, by protocol, method and status code.
    pub requests_total: Family<RequestLabels, Counter>,
    /// Audit events lost (a full queue).
    pub audit_events_dropped_total: Counter,
    /// Audit records written.
    pub audit_events_total: Counter,
    /// Alerts fired, by rule and severity.
    pub alerts_total: Family<AlertLabels, Counter>,
    /// Alert deliveries to the webhook that were given up.
    pub alert_webhook_failures_total: Counter,
    /// Egress connections and lookups, by decision.
    pub egress_total: Family<DecisionLabel, Counter>,
    /// Nodes this server declared lost.
    pub nodes_lost_total: Counter,
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("agentfense"),
            names: Vec::new(),
            sandboxes: Family::default(),
            sandbox_start_seconds: Family::new_with_constructor(latency),
            exec_total: Family::default(),
            exec_seconds: Family::new_with_constructor(latency),
            commands_in_flight: Gauge::default(),
            fs_operations_total: Family::default(),
            fs_denials_total: Family::default(),
            limit_hits_total: Family::default(),
            delta_bytes: Gauge::default(),
            requests_total: Family::default(),
            audit_events_dropped_total: Counter::default(),
            audit_events_total: Counter::default(),
            alerts_total: Family::default(),
            alert_webhook_failures_total: Counter::default(),
            egress_total: Family::default(),
            nodes_lost_total: Counter::default(),
        };
        let r = &mut m.registry;
        let names = &mut m.names;
        macro_rules! reg {
            ($r:expr, $name:expr, $help:expr, $metric:expr) => {{
                names.push(format!("agentfense_{}", $name));
                $r.register($name, $help, $metric);
            }};
        }
        reg!(r, "sandboxes", "Sandboxes by state", m.sandboxes.clone());
        reg!(
            r,
            "sandbox_start_seconds",
            "Time to start a sandbox",
            m.sandbox_start_seconds.clone()
        );
        reg!(r, "exec", "Commands run", m.exec_total.clone());
        reg!(
            r,
            "exec_seconds",
            "Command wall time",
            m.exec_seconds.clone()
        );
        reg!(
            r,
            "commands_in_flight",
            "Commands running now",
            m.commands_in_flight.clone()
        );
        reg!(
            r,
            "fs_operations",
            "Filesystem operations served",
            m.fs_operations_total.clone()
        );
        reg!(
            r,
            "fs_denials",
            "Filesystem operations refused by the rules",
            m.fs_denials_total.clone()
        );
        reg!(
            r,
            "limit_hits",
            "Resource limits hit",
            m.limit_hits_total.clone()
        );
        reg!(
            r,
            "delta_bytes",
            "Bytes the running sandboxes' changes take",
            m.delta_bytes.clone()
        );
        reg!(r, "requests", "API requests", m.requests_total.clone());
        reg!(
            r,
            "nodes_lost",
            "Nodes declared lost (no heartbeat for nodes.lost_after)",
            m.nodes_lost_total.clone()
        );
        reg!(
            r,
            "audit_events_dropped",
            "Audit events lost to a full queue",
            m.audit_events_dropped_total.clone()
        );
        reg!(
            r,
            "audit_events",
            "Audit records written",
            m.audit_events_total.clone()
        );
        reg!(r, "alerts", "Alerts fired", m.alerts_total.clone());
        reg!(
            r,
            "alert_webhook_failures",
            "Alerts the webhook never accepted",
            m.alert_webhook_failures_total.clone()
        );
        reg!(
            r,
            "egress",
            "Egress connections and lookups",
            m.egress_total.clone()
        );
        m
    }

    /// The names of every metric family (`agentfense_exec`, ...), whether or not it has a
    /// sample yet.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Brings `fs_operations_total` up to the filesystem's own counts.
    pub fn observe_fs_operations(&self) {
        for (op, n) in agentfense_fs::counters::operation_counts() {
            let c = self.fs_operations_total.get_or_create(&OperationLabel {
                operation: op.to_owned(),
            });
            let seen = c.get();
            if n > seen {
                c.inc_by(n - seen);
            }
        }
    }

    /// The Prometheus text format (0.0.4), for scrapers that do not ask for OpenMetrics.
    pub fn encode_prometheus(&self) -> String {
        to_prometheus_text(&self.encode())
    }

    /// The OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Counts a finished command.
    pub fn command(&self, runtime: &str, result: &str, seconds: f64) {
        self.exec_total
            .get_or_create(&ExecLabels {
                runtime: runtime.to_owned(),
                result: result.to_owned(),
            })
            .inc();
        self.exec_seconds
            .get_or_create(&RuntimeLabel {
                runtime: runtime.to_owned(),
            })
            .observe(seconds);
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// Counts a command running until dropped.
pub struct InFlight(());

impl InFlight {
    /// One more command in flight.
    pub fn start() -> InFlight {
        metrics().commands_in_flight.inc();
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics().commands_in_flight.dec();
    }
}

/// The gRPC code's name as Prometheus users expect it (`OK`, `NOT_FOUND`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4 reads it: a counter's `HELP`/`TYPE`
/// name carries its `_total` suffix (as its samples do), and there is no `# EOF`.
pub fn to_prometheus_text(open: &str) -> String {
    let lines: Vec<&str> = open.lines().collect();
    let counters: std::collections::HashSet<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len());
    for l in lines {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| l.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total {tail}"));
                } else {
                    out.push_str(l);
                }
            }
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_are_named_with_total_in_the_prometheus_format() {
        let open = "# HELP a_exec Commands run.\n# TYPE a_exec counter\na_exec_total{r=\"ok\"} 3\n\
                    # HELP a_g A gauge.\n# TYPE a_g gauge\na_g 1\n# EOF\n";
        assert_eq!(
            super::to_prometheus_text(open),
            "# HELP a_exec_total Commands run.\n# TYPE a_exec_total counter\na_exec_total{r=\"ok\"} 3\n\
             # HELP a_g A gauge.\n# TYPE a_g gauge\na_g 1\n"
        );
    }
}
