//! Authentication and authorization: who is calling, for which tenant, with which scopes.
//!
//! Every API call passes [`Gate::authorize`] exactly once, with the gRPC method it invokes:
//! gRPC calls in a tower layer ([`AuthLayer`]) keyed by the request path, REST calls in the
//! gateway keyed by the gRPC method each route transcodes to. [`requirement`] declares what
//! every method needs; a method without a declaration is refused (and a test checks that every
//! method of the wire protocol has one). The resulting [`Caller`] travels in the request's
//! extensions; the service layer scopes every lookup to its tenant (another tenant's ids are
//! NOT_FOUND).

mod gate;
pub mod keys;
mod layer;

use std::fmt;

pub use gate::{AuthError, Credentials, Gate, Peer};
pub use layer::AuthLayer;
pub(crate) use layer::count_request;

use crate::ids::SandboxId;

/// The tenant every caller belongs to while authentication is off (and that rows made before
/// tenants existed belong to).
pub const DEFAULT_TENANT: &str = "default";

/// A permission a key carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Read codebases: metadata, listings, file contents.
    CodebasesRead,
    /// Create and delete codebases, upload files.
    CodebasesWrite,
    /// Read sandboxes and sessions.
    SandboxesRead,
    /// Create, start, stop, destroy and publish sandboxes; mint sandbox tokens.
    SandboxesWrite,
    /// Run commands and manage sessions.
    Exec,
    /// Everything, across every tenant.
    Admin,
}

impl Scope {
    /// Every scope, in order.
    pub const ALL: [Scope; 6] = [
        Scope::CodebasesRead,
        Scope::CodebasesWrite,
        Scope::SandboxesRead,
        Scope::SandboxesWrite,
        Scope::Exec,
        Scope::Admin,
    ];

    /// The name used in configuration, on the command line and in errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::CodebasesRead => "codebases:read",
            Scope::CodebasesWrite => "codebases:write",
            Scope::SandboxesRead => "sandboxes:read",
            Scope::SandboxesWrite => "sandboxes:write",
            Scope::Exec => "exec",
            Scope::Admin => "admin",
        }
    }

    /// What a key gets when no scope is named: everything but `admin`.
    pub fn defaults() -> Vec<Scope> {
        Scope::ALL
            .into_iter()
            .filter(|s| *s != Scope::Admin)
            .collect()
    }

    /// What a sandbox token carries.
    pub fn token() -> Vec<Scope> {
        vec![Scope::SandboxesRead, Scope::Exec]
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown scope {s:?} (known: {})", names.join(", "))
            })
    }
}

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// Nothing: anyone may call it (health checks).
    Open,
    /// This scope; `token` says whether a sandbox token may call it (on its own sandbox).
    Scope {
        /// The scope.
        scope: Scope,
        /// Allowed for sandbox tokens.
        token: bool,
    },
}

const fn need(scope: Scope) -> Requirement {
    Requirement::Scope {
        scope,
        token: false,
    }
}

const fn token_ok(scope: Scope) -> Requirement {
    Requirement::Scope { scope, token: true }
}

/// Pseudo-methods of our REST-only extensions, checked like gRPC methods.
pub mod ext {
    /// `POST /v1/sandboxes/{id}/publish`.
    pub const PUBLISH: &str = "/agentfense.v1.Extensions/PublishSandbox";
    /// `POST /v1/sandboxes/{id}/tokens`.
    pub const MINT_TOKEN: &str = "/agentfense.v1.Extensions/CreateSandboxToken";
    /// `PUT /v1/sandboxes/{id}/egress`.
    pub const SET_EGRESS: &str = "/agentfense.v1.Extensions/SetSandboxEgress";
    /// `GET /v1/sandboxes/{id}/metrics`.
    pub const SANDBOX_METRICS: &str = "/agentfense.v1.Extensions/GetSandboxMetrics";
    /// `/mcp`: MCP over streamable HTTP, bound to one sandbox (its tools run commands and
    /// review calls there, each checked again on its own).
    pub const MCP: &str = "/agentfense.v1.Mcp/Session";
}

/// Every method the server answers and what it needs. Keep in step with the protocol: a test
/// fails when a method of `sandbox.v1` is missing here.
pub const REQUIREMENTS: &[(&str, Requirement)] = {
    use Scope::*;
    &[
        ("/grpc.health.v1.Health/Check", Requirement::Open),
        ("/grpc.health.v1.Health/Watch", Requirement::Open),
        (
            "/sandbox.v1.CodebaseService/CreateCodebase",
            need(CodebasesWrite),
        ),
        (
            "/sandbox.v1.CodebaseService/GetCodebase",
            need(CodebasesRead),
        ),
        (
            "/sandbox.v1.CodebaseService/ListCodebases",
            need(CodebasesRead),
        ),
        (
            "/sandbox.v1.CodebaseService/DeleteCodebase",
            need(CodebasesWrite),
        ),
        (
            "/sandbox.v1.CodebaseService/UploadFiles",
            need(CodebasesWrite),
        ),
        (
            "/sandbox.v1.CodebaseService/DownloadFile",
            need(CodebasesRead),
        ),
        ("/sandbox.v1.CodebaseService/ListFiles", need(CodebasesRead)),
        (
            "/sandbox.v1.SandboxService/CreateSandbox",
            need(SandboxesWrite),
        ),
        (
            "/sandbox.v1.SandboxService/GetSandbox",
            token_ok(SandboxesRead),
        ),
        (
            "/sandbox.v1.SandboxService/ListSandboxes",
            token_ok(SandboxesRead),
        ),
        (
            "/sandbox.v1.SandboxService/StartSandbox",
            need(SandboxesWrite),
        ),
        (
            "/sandbox.v1.SandboxService/StopSandbox",
            need(SandboxesWrite),
        ),
        (
            "/sandbox.v1.SandboxService/DestroySandbox",
            need(SandboxesWrite),
        ),
        ("/sandbox.v1.SandboxService/Exec", token_ok(Exec)),
        ("/sandbox.v1.SandboxService/ExecStream", token_ok(Exec)),
        ("/sandbox.v1.SandboxService/CreateSession", token_ok(Exec)),
        ("/sandbox.v1.SandboxService/GetSession", token_ok(Exec)),
        ("/sandbox.v1.SandboxService/ListSessions", token_ok(Exec)),
        ("/sandbox.v1.SandboxService/DestroySession", token_ok(Exec)),
        ("/sandbox.v1.SandboxService/SessionExec", token_ok(Exec)),
        (
            "/sandbox.v1.SandboxService/SessionExecStream",
            token_ok(Exec),
        ),
        (ext::PUBLISH, need(SandboxesWrite)),
        // Review: a sandbox token (the agent) may see its changes and checkpoint or roll
        // back its own work, never apply it to the codebase nor delete a reviewer's
        // checkpoints.
        ("/agentfense.v1.Review/ListChanges", token_ok(SandboxesRead)),
        ("/agentfense.v1.Review/GetDiff", token_ok(SandboxesRead)),
        ("/agentfense.v1.Review/ApplyChanges", need(SandboxesWrite)),
        ("/agentfense.v1.Review/DiscardChanges", token_ok(Exec)),
        ("/agentfense.v1.Review/CreateCheckpoint", token_ok(Exec)),
        (
            "/agentfense.v1.Review/ListCheckpoints",
            token_ok(SandboxesRead),
        ),
        ("/agentfense.v1.Review/RestoreCheckpoint", token_ok(Exec)),
        (
            "/agentfense.v1.Review/DeleteCheckpoint",
            need(SandboxesWrite),
        ),
        (
            "/agentfense.v1.Review/DiffCheckpoints",
            token_ok(SandboxesRead),
        ),
        (ext::MINT_TOKEN, need(SandboxesWrite)),
        (ext::SET_EGRESS, need(SandboxesWrite)),
        (ext::SANDBOX_METRICS, token_ok(SandboxesRead)),
        (ext::MCP, token_ok(Exec)),
    ]
};

/// What `method` needs; `None` for a method nobody declared (refused).
pub fn requirement(method: &str) -> Option<Requirement> {
    REQUIREMENTS
        .iter()
        .find(|(m, _)| *m == method)
        .map(|(_, r)| *r)
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Its tenant: everything it creates belongs there, and it sees only that tenant's
    /// resources unless it is an admin.
    pub tenant: String,
    /// The key or token it used (`key_...`, `tok_...`), or how it was identified otherwise
    /// (`unix:<uid>`, `cert:<subject>`); `None` while authentication is off.
    pub key_id: Option<String>,
    /// Its scopes.
    pub scopes: Vec<Scope>,
    /// For sandbox tokens: the one sandbox it may touch.
    pub sandbox: Option<SandboxId>,
}

impl Caller {
    /// The caller every request is while authentication is off: an admin of the default
    /// tenant (everything is visible, as before tenants existed).
    pub fn local() -> Caller {
        Caller {
            tenant: DEFAULT_TENANT.to_owned(),
            key_id: None,
            scopes: vec![Scope::Admin],
            sandbox: None,
        }
    }

    /// Whether it holds `admin`.
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    /// Whether it holds `scope` (admins hold every scope).
    pub fn has(&self, scope: Scope) -> bool {
        self.is_admin() || self.scopes.contains(&scope)
    }

    /// Whether resources of `tenant` are visible to it.
    pub fn sees_tenant(&self, tenant: &str) -> bool {
        self.is_admin() || self.tenant == tenant
    }

    /// Whether a sandbox of `tenant` with this id is visible to it.
    pub fn sees_sandbox(&self, tenant: &str, id: &SandboxId) -> bool {
        self.sees_tenant(tenant) && self.sandbox.as_ref().is_none_or(|s| s == id)
    }

    /// The tenant listings are limited to (`None`: all, for admins).
    pub fn list_tenant(&self) -> Option<&str> {
        (!self.is_admin()).then_some(self.tenant.as_str())
    }

    /// The actor fields of its audit events.
    pub fn actor(&self) -> crate::audit::Actor {
        crate::audit::Actor {
            tenant: Some(self.tenant.clone()),
            key_id: self.key_id.clone(),
        }
    }
}

/// The caller a request carries; fails closed when none was attached (a code path that
/// skipped the gate).
pub fn caller_of<T>(req: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| tonic::Status::unauthenticated("request was not authenticated"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method of the wire protocol has a declared requirement: adding an RPC without
    /// deciding who may call it fails here (and the gate would refuse it anyway).
    #[test]
    fn every_rpc_has_a_declared_requirement() {
        use prost::Message;
        let set =
            prost_types::FileDescriptorSet::decode(agentfense_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut seen = 0;
        for file in &set.file {
            for svc in &file.service {
                for m in &svc.method {
                    let path = format!("/{}.{}/{}", file.package(), svc.name(), m.name());
                    assert!(
                        requirement(&path).is_some(),
                        "{path} has no entry in auth::REQUIREMENTS"
                    );
                    seen += 1;
                }
            }
        }
        assert!(seen >= 20, "only {seen} methods in the descriptors");
        assert_eq!(requirement("/sandbox.v1.SandboxService/Nope"), None);
    }

    #[test]
    fn scopes_parse_and_tokens_stay_narrow() {
        for s in Scope::ALL {
            assert_eq!(s.as_str().parse::<Scope>().unwrap(), s);
        }
        assert!(
            "root"
                .parse::<Scope>()
                .unwrap_err()
                .contains("codebases:read")
        );
        assert!(!Scope::defaults().contains(&Scope::Admin));
        let token_methods: Vec<&str> = REQUIREMENTS
            .iter()
            .filter(|(_, r)| matches!(r, Requirement::Scope { token: true, .. }))
            .map(|(m, _)| *m)
            .collect();
        // Sandbox calls, and review of the sandbox's own work (never applying it).
        assert!(token_methods.iter().all(|m| m.contains("SandboxService")
            || m.starts_with("/agentfense.v1.Review/")
            || *m == ext::SANDBOX_METRICS
            || *m == ext::MCP));
        for m in ["ApplyChanges", "DeleteCheckpoint"] {
            assert!(!token_methods.contains(&format!("/agentfense.v1.Review/{m}").as_str()));
        }
        for m in [
            "DestroySandbox",
            "CreateSandbox",
            "StartSandbox",
            "StopSandbox",
        ] {
            assert!(!token_methods.contains(&format!("/sandbox.v1.SandboxService/{m}").as_str()));
        }
    }
}
