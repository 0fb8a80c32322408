//! MCP over streamable HTTP at `/mcp` on the REST listener: each request is bound to one
//! sandbox by its credentials (a sandbox token; with any other credential, or with
//! authentication off, by `?sandbox=ID`), and works on it through the same service calls,
//! checks and audit events as the API. Host and Origin are checked by the REST guard first.

use std::sync::Arc;

use agentfense_core::Policy;
use agentfense_mcp::{Denial, ExecCall, ExecReply, PolicyView, Workspace, WsError, WsFuture};
use serde_json::{Value, json};

use crate::auth::{Caller, Scope};
use crate::error::ServiceError;
use crate::grpc::review::{checkpoint, path_change};
use crate::rest::{change_json, checkpoint_json};
use crate::service::{ExecParams, LABEL_NETWORK, LABEL_WORKSPACE_PATH, StateRef};
use crate::service::{Service, egress::LABEL_EGRESS};

/// Where server sandboxes see their project (the SDK relies on it).
const WORKSPACE: &str = "/workspace";

/// One sandbox, as an MCP session through the server sees it.
pub struct SandboxWorkspace {
    service: Arc<Service>,
    caller: Caller,
    sandbox_id: String,
}

impl SandboxWorkspace {
    /// `caller`'s view of sandbox `sandbox_id`.
    pub fn new(service: Arc<Service>, caller: Caller, sandbox_id: String) -> Self {
        SandboxWorkspace {
            service,
            caller,
            sandbox_id,
        }
    }

    /// The gate admitted `/mcp` with `exec`; the tools that read the sandbox's record and
    /// changes need what the API's own calls for them need.
    fn need(&self, scope: Scope) -> Result<(), WsError> {
        if self.caller.has(scope) {
            Ok(())
        } else {
            Err(WsError::Denied(format!(
                "this needs scope {scope}, which the credential does not have"
            )))
        }
    }
}

fn to_ws(e: ServiceError) -> WsError {
    match e {
        ServiceError::InvalidArgument(m) => WsError::InvalidArgument(m),
        ServiceError::NotFound(m) => WsError::NotFound(m),
        ServiceError::PermissionDenied(m) => WsError::Denied(m),
        ServiceError::FailedPrecondition(m) | ServiceError::Unavailable(m) => {
            WsError::Unavailable(m)
        }
        ServiceError::DeadlineExceeded(m) => WsError::Timeout(m),
        other => WsError::Failed(tonic::Status::from(other).message().to_owned()),
    }
}

/// The changes of a review call in the REST API's JSON.
pub fn changes_json(set: &agentfense_fs::ChangeSet) -> Value {
    json!({
        "changes": set.changes.iter().map(|c| change_json(&path_change(c))).collect::<Vec<_>>(),
        "truncated": set.truncated,
        "total": set.total,
    })
}

/// Where a server sandbox shows its project: at the path its `agentfense.workspace_path`
/// label gives (where commands start), and at `/workspace`.
pub fn project_roots(labels: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    labels
        .get(LABEL_WORKSPACE_PATH)
        .cloned()
        .into_iter()
        .chain([WORKSPACE.to_owned()])
        .collect()
}

/// The network a sandbox's labels give it, as the policy resource shows it.
pub fn network_json(labels: &std::collections::BTreeMap<String, String>) -> Value {
    if let Some(allow) = labels.get(LABEL_EGRESS).filter(|v| !v.trim().is_empty()) {
        return json!({
            "mode": "egress",
            "allow": allow.split(',').map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>(),
        });
    }
    match labels.get(LABEL_NETWORK).map(String::as_str) {
        Some("enabled") | Some("host") => json!({"mode": "host"}),
        _ => json!({"mode": "none"}),
    }
}

impl Workspace for SandboxWorkspace {
    fn exec(&self, call: ExecCall) -> WsFuture<'_, ExecReply> {
        Box::pin(async move {
            let out = self
                .service
                .exec(
                    &self.caller,
                    &self.sandbox_id,
                    ExecParams {
                        command: call.command,
                        stdin: call.stdin.into_bytes(),
                        env: call.env,
                        workdir: call.workdir,
                        timeout: call.timeout,
                    },
                )
                .await
                .map_err(to_ws)?;
            Ok(ExecReply::marked(out.exit_code, out.stdout, out.stderr))
        })
    }

    fn policy(&self) -> WsFuture<'_, PolicyView> {
        Box::pin(async move {
            self.need(Scope::SandboxesRead)?;
            let rec = self
                .service
                .get_sandbox(&self.caller, &self.sandbox_id)
                .await
                .map_err(to_ws)?;
            let floor = self.service.settings.config.policy.mandatory.clone();
            let policy = Policy::compile_with_floor(rec.rules.clone(), floor)
                .map_err(|e| WsError::Failed(format!("compiling the sandbox's rules: {e}")))?;
            Ok(PolicyView {
                sandbox_id: rec.id.to_string(),
                roots: project_roots(&rec.labels),
                policy: Arc::new(policy),
                network: network_json(&rec.labels),
            })
        })
    }

    fn changes(&self) -> WsFuture<'_, Value> {
        Box::pin(async move {
            self.need(Scope::SandboxesRead)?;
            let set = self
                .service
                .list_changes(&self.caller, &self.sandbox_id, Vec::new(), 0)
                .await
                .map_err(to_ws)?;
            Ok(changes_json(&set))
        })
    }

    fn diff(&self, paths: Vec<String>) -> WsFuture<'_, (String, bool)> {
        Box::pin(async move {
            self.need(Scope::SandboxesRead)?;
            let (patch, _) = self
                .service
                .diff_states(
                    &self.caller,
                    &self.sandbox_id,
                    StateRef::Base,
                    StateRef::Current,
                    paths,
                    0,
                )
                .await
                .map_err(to_ws)?;
            Ok((
                String::from_utf8_lossy(&patch.text).into_owned(),
                patch.truncated,
            ))
        })
    }

    fn checkpoint(&self, label: String) -> WsFuture<'_, Value> {
        Box::pin(async move {
            let info = self
                .service
                .create_checkpoint(&self.caller, &self.sandbox_id, label)
                .await
                .map_err(to_ws)?;
            Ok(checkpoint_json(&checkpoint(&info)))
        })
    }

    fn denied(&self, d: &Denial) {
        self.service.audit.record_as(
            self.caller.actor(),
            crate::audit::AuditEvent::PermissionDenied {
                sandbox_id: self.sandbox_id.clone(),
                operation: d.operation.to_owned(),
                path: d.path.clone(),
                level: d.level.to_string(),
                rule: d.rule.clone(),
                count: 1,
            },
        );
    }

    fn restore(&self, cp: String, dry_run: bool) -> WsFuture<'_, Value> {
        Box::pin(async move {
            let set = self
                .service
                .restore_checkpoint(&self.caller, &self.sandbox_id, cp, dry_run)
                .await
                .map_err(to_ws)?;
            let mut v = changes_json(&set);
            v["restored"] = Value::Bool(!dry_run);
            Ok(v)
        })
    }
}

/// Binds each `/mcp` request to the sandbox its credentials name.
pub struct ServerBinder(pub Arc<Service>);

/// The sandbox a `/mcp` request works on: its sandbox token's, else `?sandbox=`.
pub fn bound_sandbox(caller: &Caller, query: Option<&str>) -> Result<String, String> {
    let asked = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "sandbox")
            .map(|(_, v)| v.into_owned())
    });
    match (&caller.sandbox, asked) {
        (Some(own), Some(other)) if own.as_str() != other => {
            Err(format!("this sandbox token is bound to {own}, not {other}"))
        }
        (Some(own), _) => Ok(own.to_string()),
        (None, Some(id)) => Ok(id),
        (None, None) => Err(
            "/mcp works on one sandbox: authenticate with a sandbox token, or name it with \
             ?sandbox=ID"
                .to_owned(),
        ),
    }
}

impl agentfense_mcp::Binder for ServerBinder {
    fn bind(&self, request: Option<&http::request::Parts>) -> Result<Arc<dyn Workspace>, String> {
        let parts = request.ok_or("no HTTP request")?;
        let caller = parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or("the request was not authenticated")?;
        let id = bound_sandbox(&caller, parts.uri.query())?;
        // Whatever the credential, the tools act as the agent of this one sandbox: the review
        // calls then show only what the sandbox may read, and its checkpoints count as the
        // agent's (an API key's `?sandbox=` must not give the agent a reviewer's view).
        let mut caller = caller;
        caller.sandbox = Some(crate::ids::SandboxId::parse(&id).map_err(|e| e.to_string())?);
        Ok(Arc::new(SandboxWorkspace::new(self.0.clone(), caller, id)))
    }
}
