//! The one enforcement point: credentials + method → [`Caller`] or a refusal.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::keys::{ServerSecret, parse_id};
use super::{Caller, Requirement, Scope, requirement};
use crate::audit::{Actor, Audit, AuditEvent};
use crate::config::AuthConfig;
use crate::ids::SandboxId;
use crate::store::{KeyLookup, Store};

/// How long a looked-up key is trusted before it is read again (revocation, expiry and
/// blocking take effect within this).
const KEY_CACHE_TTL: Duration = Duration::from_millis(500);
/// `last_used_at` is written at most this often per key.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// The window failed authentications are counted in.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long the set of existing key ids is trusted (a new key works within this).
const KNOWN_IDS_TTL: Duration = Duration::from_millis(500);
/// Bound of each in-memory map (key cache, failure counts, last-use marks).
const MAP_CAP: usize = 10_000;
/// `authentication_failed` lines per minute, all sources together; past it one line says the
/// rest were not recorded one by one.
const FAILURE_LINES_PER_MINUTE: u32 = 1000;

/// Why a call was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No usable credential (UNAUTHENTICATED / 401).
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, but not allowed (PERMISSION_DENIED / 403).
    #[error("{0}")]
    PermissionDenied(String),
    /// Too many failed attempts from this source (RESOURCE_EXHAUSTED / 429).
    #[error("{0}")]
    RateLimited(String),
    /// The key store could not be read (fails closed: UNAVAILABLE).
    #[error("authentication is unavailable: {0}")]
    Unavailable(String),
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        let msg = e.to_string();
        match e {
            AuthError::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            AuthError::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            AuthError::RateLimited(_) => tonic::Status::resource_exhausted(msg),
            AuthError::Unavailable(_) => tonic::Status::unavailable(msg),
        }
    }
}

/// Where a connection comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A TCP client.
    Tcp(Option<SocketAddr>),
    /// A unix-socket client, with its uid when the kernel told us.
    Unix(Option<u32>),
}

impl Peer {
    fn source(&self) -> String {
        match self {
            Peer::Tcp(Some(a)) => a.ip().to_string(),
            Peer::Tcp(None) => "tcp".into(),
            Peer::Unix(Some(uid)) => format!("unix:{uid}"),
            Peer::Unix(None) => "unix".into(),
        }
    }

    fn limit_key(&self) -> String {
        match self {
            // Per address; IPv6 clients per /64 (one host holds a whole /64).
            Peer::Tcp(Some(a)) => match a.ip() {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
                    let s = v6.segments();
                    format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                }
                ip => ip.to_canonical().to_string(),
            },
            other => other.source(),
        }
    }
}

/// What a request presents.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The `authorization` header's value, if any.
    pub authorization: Option<String>,
    /// The connection's peer.
    pub peer: Peer,
    /// The tenant named by a verified client certificate (mTLS), if any.
    pub cert_tenant: Option<String>,
}

#[derive(Clone)]
struct CachedKey {
    at: Instant,
    found: Option<KeyLookup>,
}

/// Keeps a map under [`MAP_CAP`]: drops stale entries, and everything if that is not enough
/// (a flood of distinct sources or ids must not make each insert scan a huge map).
fn bound<K, V>(map: &mut HashMap<K, V>, fresh: impl Fn(&V) -> bool) {
    if map.len() >= MAP_CAP {
        map.retain(|_, v| fresh(v));
        if map.len() >= MAP_CAP / 2 {
            map.clear();
        }
    }
}

/// Authenticates and authorizes calls. Cheap to share.
#[derive(Debug)]
pub struct Gate {
    store: Arc<dyn Store>,
    secret: ServerSecret,
    config: AuthConfig,
    /// uid → tenant, resolved from `auth.unix_users` at start.
    unix_users: HashMap<u32, String>,
    audit: Audit,
    keys: Mutex<HashMap<String, CachedKey>>,
    /// Every key id in the store, and when it was read: unknown ids are refused without a
    /// query (a flood of made-up keys costs no database time).
    known: Mutex<(Option<Instant>, std::collections::HashSet<String>)>,
    touched: Mutex<HashMap<String, Instant>>,
    failures: Mutex<HashMap<String, (Instant, u32)>>,
    /// Failure lines written in the current minute, all sources together.
    failure_lines: Mutex<(Instant, u32)>,
}

impl std::fmt::Debug for CachedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedKey").finish_non_exhaustive()
    }
}

/// Resolves `auth.unix_users` keys (uids or user names) to uids.
fn resolve_unix_users(
    users: &std::collections::BTreeMap<String, String>,
) -> Result<HashMap<u32, String>, String> {
    let mut out = HashMap::new();
    for (who, tenant) in users {
        let uid = match who.parse::<u32>() {
            Ok(uid) => uid,
            Err(_) => uid_of(who)
                .ok_or_else(|| format!("auth.unix_users: no user named {who:?} on this host"))?,
        };
        out.insert(uid, tenant.clone());
    }
    Ok(out)
}

/// A user's uid from the passwd database.
fn uid_of(name: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
    })
}

impl Gate {
    /// A gate over the key store.
    pub fn new(
        store: Arc<dyn Store>,
        secret: ServerSecret,
        config: AuthConfig,
        audit: Audit,
    ) -> Result<Gate, String> {
        let unix_users = resolve_unix_users(&config.unix_users)?;
        Ok(Gate {
            store,
            secret,
            config,
            unix_users,
            audit,
            keys: Mutex::default(),
            known: Mutex::default(),
            touched: Mutex::default(),
            failures: Mutex::default(),
            failure_lines: Mutex::new((Instant::now(), 0)),
        })
    }

    /// Whether callers must authenticate.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// The server secret (to hash new tokens).
    pub fn secret(&self) -> &ServerSecret {
        &self.secret
    }

    /// Decides one call of `method`.
    pub async fn authorize(&self, creds: &Credentials, method: &str) -> Result<Caller, AuthError> {
        let Some(req) = requirement(method) else {
            return Err(AuthError::PermissionDenied(format!(
                "{method} has no declared access requirement"
            )));
        };
        let Requirement::Scope { scope, token } = req else {
            // Open methods (health) get a caller that may do nothing.
            return Ok(Caller {
                tenant: String::new(),
                key_id: None,
                scopes: Vec::new(),
                sandbox: None,
            });
        };
        if !self.config.enabled {
            return Ok(Caller::local());
        }
        let caller = match self.identify(creds).await {
            Ok(c) => c,
            Err(e @ AuthError::Unauthenticated(_)) => {
                return Err(self.failed(&creds.peer.limit_key(), creds, method, e));
            }
            Err(e) => return Err(e),
        };
        if caller.sandbox.is_some() && !token {
            return Err(AuthError::PermissionDenied(format!(
                "a sandbox token cannot call {}",
                short(method)
            )));
        }
        if !caller.has(scope) {
            return Err(AuthError::PermissionDenied(format!(
                "{} needs scope {scope}; this credential has {}",
                short(method),
                if caller.scopes.is_empty() {
                    "none".to_owned()
                } else {
                    caller
                        .scopes
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )));
        }
        Ok(caller)
    }

    async fn identify(&self, creds: &Credentials) -> Result<Caller, AuthError> {
        if let Some(h) = creds.authorization.as_deref() {
            let presented = h
                .strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
                .map(str::trim)
                .ok_or_else(|| {
                    AuthError::Unauthenticated("authorization must be \"Bearer <key>\"".to_owned())
                })?;
            return self.by_key(presented, self.flooding(&creds.peer)).await;
        }
        if let Peer::Unix(Some(uid)) = creds.peer {
            let (tenant, scopes) = match (uid, self.unix_users.get(&uid)) {
                (0, t) => (
                    t.cloned()
                        .unwrap_or_else(|| super::DEFAULT_TENANT.to_owned()),
                    vec![Scope::Admin],
                ),
                (_, Some(t)) => (t.clone(), Scope::defaults()),
                (_, None) => {
                    return Err(AuthError::Unauthenticated(format!(
                        "uid {uid} is not in auth.unix_users; send authorization: Bearer <key>"
                    )));
                }
            };
            let caller = Caller {
                tenant,
                key_id: Some(format!("unix:{uid}")),
                scopes,
                sandbox: None,
            };
            return self.unless_blocked(caller).await;
        }
        if let Some(t) = &creds.cert_tenant {
            if t == super::DEFAULT_TENANT {
                return Err(AuthError::Unauthenticated(format!(
                    "a client certificate cannot name the {:?} tenant",
                    super::DEFAULT_TENANT
                )));
            }
            let caller = Caller {
                tenant: t.clone(),
                key_id: Some(format!("cert:{t}")),
                scopes: Scope::defaults(),
                sandbox: None,
            };
            return self.unless_blocked(caller).await;
        }
        Err(AuthError::Unauthenticated(
            "missing credentials: send authorization: Bearer <key> (create one with \
             `agentfense keys create`)"
                .to_owned(),
        ))
    }

    async fn unless_blocked(&self, caller: Caller) -> Result<Caller, AuthError> {
        let store = self.store.clone();
        let t = caller.tenant.clone();
        let blocked = tokio::task::spawn_blocking(move || store.tenant_blocked(&t))
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        if blocked {
            return Err(AuthError::PermissionDenied(format!(
                "tenant {:?} is blocked",
                caller.tenant
            )));
        }
        Ok(caller)
    }

    /// Whether `id` exists (from a set of all ids, re-read at most twice a second).
    async fn exists(&self, id: &str) -> Result<bool, AuthError> {
        {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            if known.0.is_some_and(|at| at.elapsed() < KNOWN_IDS_TTL) {
                return Ok(known.1.contains(id));
            }
        }
        let store = self.store.clone();
        let ids = tokio::task::spawn_blocking(move || store.key_ids())
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        *known = (Some(Instant::now()), ids.into_iter().collect());
        Ok(known.1.contains(id))
    }

    /// Whether `peer`'s source, or all sources together, failed too often this minute: then
    /// ids missing from the set of known ids are refused without a query.
    fn flooding(&self, peer: &Peer) -> bool {
        let max = self.config.max_failures_per_minute;
        let source = max > 0
            && self
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&peer.limit_key())
                .is_some_and(|(start, n)| start.elapsed() < FAILURE_WINDOW && *n >= max);
        let all = {
            let l = self.failure_lines.lock().unwrap_or_else(|p| p.into_inner());
            l.0.elapsed() < FAILURE_WINDOW && l.1 >= FAILURE_LINES_PER_MINUTE
        };
        source || all
    }

    /// The stored key `id`. An id missing from the (recent) set of known ids is looked up in
    /// the store only while nobody floods the gate: a key made a moment ago works at once,
    /// and a flood of made-up ids costs no database time.
    async fn lookup(&self, id: &str, flooding: bool) -> Result<Option<KeyLookup>, AuthError> {
        if let Some(c) = self.keys.lock().unwrap_or_else(|p| p.into_inner()).get(id)
            && c.at.elapsed() < KEY_CACHE_TTL
        {
            return Ok(c.found.clone());
        }
        if flooding && !self.exists(id).await? {
            return Ok(None);
        }
        let store = self.store.clone();
        let id2 = id.to_owned();
        let found = tokio::task::spawn_blocking(move || store.key(&id2, SystemTime::now()))
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let mut cache = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        bound(&mut cache, |c| c.at.elapsed() < KEY_CACHE_TTL);
        cache.insert(
            id.to_owned(),
            CachedKey {
                at: Instant::now(),
                found: found.clone(),
            },
        );
        Ok(found)
    }

    async fn by_key(&self, presented: &str, flooding: bool) -> Result<Caller, AuthError> {
        let invalid = || AuthError::Unauthenticated("invalid API key".to_owned());
        let id = parse_id(presented).ok_or_else(invalid)?;
        let KeyLookup {
            key: rec,
            hash,
            tenant_blocked: blocked,
            parent_dead,
        } = self.lookup(&id, flooding).await?.ok_or_else(invalid)?;
        if !self.secret.verify(presented, &hash) {
            return Err(invalid());
        }
        if rec.revoked_at.is_some() {
            return Err(AuthError::Unauthenticated(format!("key {id} was revoked")));
        }
        if parent_dead {
            return Err(AuthError::Unauthenticated(format!(
                "token {id} was minted by a key that is revoked or expired"
            )));
        }
        if rec.expires_at.is_some_and(|t| t <= SystemTime::now()) {
            return Err(AuthError::Unauthenticated(format!("key {id} has expired")));
        }
        if blocked {
            return Err(AuthError::PermissionDenied(format!(
                "tenant {:?} is blocked",
                rec.tenant
            )));
        }
        let sandbox = match &rec.sandbox_id {
            None => None,
            Some(s) => Some(SandboxId::parse(s).map_err(|_| invalid())?),
        };
        let scopes = rec
            .scopes
            .iter()
            .filter_map(|s| s.parse::<Scope>().ok())
            .collect();
        self.touch(&id);
        Ok(Caller {
            tenant: rec.tenant,
            key_id: Some(id),
            scopes,
            sandbox,
        })
    }

    fn touch(&self, id: &str) {
        {
            let mut t = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            if t.get(id).is_some_and(|at| at.elapsed() < TOUCH_EVERY) {
                return;
            }
            bound(&mut t, |at| at.elapsed() < TOUCH_EVERY);
            t.insert(id.to_owned(), Instant::now());
        }
        let store = self.store.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.touch_key(&id, SystemTime::now()) {
                tracing::warn!(error = %e, key = %id, "cannot record key use");
            }
        });
    }

    /// Counts a failed authentication of `source` and audits it, up to
    /// `auth.max_failures_per_minute` per source and minute; past that, failures answer
    /// RESOURCE_EXHAUSTED and are no longer audited one by one (the line that reached the
    /// limit says so). Valid credentials from the same source keep working: clients that
    /// share an address (everything on loopback) cannot lock each other out.
    fn failed(
        &self,
        limit_key: &str,
        creds: &Credentials,
        method: &str,
        e: AuthError,
    ) -> AuthError {
        let count = {
            let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            bound(&mut f, |(start, _)| start.elapsed() < FAILURE_WINDOW);
            let entry = f.entry(limit_key.to_owned()).or_insert((Instant::now(), 0));
            if entry.0.elapsed() >= FAILURE_WINDOW {
                *entry = (Instant::now(), 0);
            }
            entry.1 += 1;
            entry.1
        };
        let max = self.config.max_failures_per_minute;
        if max > 0 && count > max {
            return AuthError::RateLimited(format!(
                "too many failed authentications from {}; retry in a minute",
                creds.peer.source()
            ));
        }
        let line = {
            let mut l = self.failure_lines.lock().unwrap_or_else(|p| p.into_inner());
            if l.0.elapsed() >= FAILURE_WINDOW {
                *l = (Instant::now(), 0);
            }
            l.1 += 1;
            l.1
        };
        if line > FAILURE_LINES_PER_MINUTE {
            return e;
        }
        if line == FAILURE_LINES_PER_MINUTE {
            self.audit.record_as(
                Actor::default(),
                AuditEvent::AuthenticationFailed {
                    source: "*".into(),
                    method: short(method).to_owned(),
                    reason: format!(
                        "{FAILURE_LINES_PER_MINUTE} failed authentications this minute from all \
                         sources; the rest of the minute's are not recorded one by one"
                    ),
                    claimed_key_id: None,
                    rate_limited: true,
                },
            );
            return e;
        }
        {
            self.audit.record_as(
                Actor::default(),
                AuditEvent::AuthenticationFailed {
                    source: creds.peer.source(),
                    method: short(method).to_owned(),
                    reason: e.to_string(),
                    claimed_key_id: creds
                        .authorization
                        .as_deref()
                        .and_then(|h| h.strip_prefix("Bearer "))
                        .and_then(|k| parse_id(k.trim())),
                    rate_limited: max > 0 && count == max,
                },
            );
        }
        e
    }
}

/// `Service/Method` of a full gRPC path, for messages.
fn short(method: &str) -> &str {
    method
        .rsplit_once('.')
        .map_or(method, |(_, m)| m)
        .trim_start_matches('/')
}
