//! Sandbox-scoped tokens: a credential for one sandbox's commands and sessions, which an
//! agent harness (or the MCP server) hands to an agent instead of a tenant key.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Service, blocking};
use crate::audit::AuditEvent;
use crate::auth::keys::{KeyKind, generate};
use crate::auth::{Caller, Scope};
use crate::error::ServiceError;
use crate::store::KeyRecord;

/// Longest a token lives when neither its sandbox nor the request bounds it.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Tokens one sandbox may have.
const MAX_TOKENS_PER_SANDBOX: u64 = 100;

/// A freshly minted token.
#[derive(Debug)]
pub struct MintedToken {
    /// The token (shown once).
    pub token: String,
    /// Its id.
    pub id: String,
    /// When it stops working (the sandbox's expiry at the latest).
    pub expires_at: Option<SystemTime>,
}

impl Service {
    /// Mints a token for one sandbox the caller can see: it may read that sandbox, run
    /// commands and manage sessions in it, nothing else; it expires with the sandbox (or
    /// after `ttl`, if sooner) and is deleted when the sandbox is destroyed.
    pub async fn mint_sandbox_token(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
        ttl: Option<Duration>,
    ) -> Result<MintedToken, ServiceError> {
        if caller.sandbox.is_some() {
            return Err(ServiceError::FailedPrecondition(
                "a sandbox token cannot mint tokens".into(),
            ));
        }
        let id = Service::sandbox_id(sandbox_id)?;
        let rec = self.sandbox_for(caller, &id).await?;
        let scopes = Scope::token();
        if let Some(missing) = scopes.iter().find(|s| !caller.has(**s)) {
            return Err(ServiceError::PermissionDenied(format!(
                "a sandbox token can run commands: minting one needs scope {missing}, which \
                 this credential lacks"
            )));
        }
        let now = SystemTime::now();
        let store = self.store.clone();
        let parent = caller.key_id.clone().filter(|k| k.starts_with("key_"));
        let (sid, p) = (rec.id.to_string(), parent.clone());
        let (count, parent_expiry) = blocking(move || {
            let parent_expiry = match &p {
                Some(p) => store.key(p, now)?.and_then(|k| k.key.expires_at),
                None => None,
            };
            Ok((store.count_tokens_of(&sid)?, parent_expiry))
        })
        .await?;
        if count >= MAX_TOKENS_PER_SANDBOX {
            return Err(ServiceError::ResourceExhausted(format!(
                "sandbox {id} already has {count} tokens (at most {MAX_TOKENS_PER_SANDBOX})"
            )));
        }
        let expires_at = [
            rec.expires_at,
            ttl.and_then(|d| now.checked_add(d)),
            parent_expiry,
            now.checked_add(MAX_TOKEN_TTL),
        ]
        .into_iter()
        .flatten()
        .min();
        let new = generate(KeyKind::SandboxToken)
            .map_err(|e| ServiceError::internal("generating a token", e.to_string()))?;
        let key = KeyRecord {
            id: new.id.clone(),
            tenant: rec.tenant.clone(),
            scopes: scopes.iter().map(|s| s.as_str().to_owned()).collect(),
            sandbox_id: Some(rec.id.to_string()),
            parent_id: parent,
            created_at: now,
            expires_at,
            last_used_at: None,
            revoked_at: None,
        };
        let hash = self.secret.hash(&new.secret);
        let store = self.store.clone();
        let k = key.clone();
        blocking(move || Ok(store.insert_key(&k, &hash)?)).await?;
        self.audit.record_as(
            caller.actor(),
            AuditEvent::SandboxTokenCreated {
                sandbox_id: rec.id.to_string(),
                token_id: new.id.clone(),
            },
        );
        Ok(MintedToken {
            token: new.secret,
            id: new.id,
            expires_at,
        })
    }
}
