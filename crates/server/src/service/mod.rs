//! The service layer: every API operation, independent of the transport. `grpc` and `rest`
//! only translate requests and responses.

mod codebases;
pub mod egress;
mod fence;
pub mod mounter;
mod quota;
mod sandboxes;
#[cfg(test)]
mod tests;
mod tokens;

use std::sync::Arc;

pub use codebases::UploadSink;
pub use fence::Fence;
pub use sandboxes::{
    CreateSandbox, DEFAULT_CHANGES_LIMIT, DEFAULT_DIFF_BYTES, Engine, ExecOutcome, ExecParams,
    LABEL_CHECKPOINT, LABEL_IO, LABEL_NETWORK, LABEL_PUBLISH, LABEL_WORKSPACE_PATH, SandboxMetrics,
    StateRef, StreamItem,
};
pub use tokens::MintedToken;

use crate::audit::Audit;
use crate::config::Settings;
use crate::error::ServiceError;
use crate::files::CodebaseFiles;
use crate::store::Store;

/// Default and maximum page sizes of list RPCs.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest accepted `page_size`.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Shared state behind every request.
#[derive(Debug)]
pub struct Service {
    pub(crate) settings: Settings,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) files: CodebaseFiles,
    pub(crate) audit: Audit,
    pub(crate) engine: Engine,
    pub(crate) quota: quota::Counters,
    pub(crate) secret: crate::auth::keys::ServerSecret,
    /// Sessions the long-session alert has fired for.
    pub(crate) session_ages: crate::alerts::SessionAges,
    /// The node this service runs sandboxes on (see [`Service::with_node`]).
    pub(crate) node: String,
    /// Whether it may still publish as its database's server (see [`Fence`]); none in tests
    /// that run no claim.
    pub(crate) fence: Option<Arc<Fence>>,
}

impl Service {
    /// Assembles the service from its parts.
    pub fn new(
        settings: Settings,
        store: Arc<dyn Store>,
        files: CodebaseFiles,
        audit: Audit,
        engine: Engine,
    ) -> Self {
        Service {
            settings,
            store,
            files,
            audit,
            engine,
            quota: quota::Counters::default(),
            session_ages: crate::alerts::SessionAges::default(),
            secret: {
                // Replaced by the data directory's secret (`with_secret`) in a real server.
                let mut b = [0u8; 32];
                let _ = getrandom::fill(&mut b);
                crate::auth::keys::ServerSecret::fixed(b)
            },
            node: "local".to_owned(),
            fence: None,
        }
    }

    /// Checks `fence` before every publish.
    pub fn with_fence(mut self, fence: Arc<Fence>) -> Self {
        self.fence = Some(fence);
        self
    }

    /// UNAVAILABLE when this server may no longer be its database's server: nothing is
    /// written to a codebase then. Asks the database (see [`Fence::check_held`]): call it on a
    /// blocking thread.
    pub(crate) fn may_publish(&self) -> Result<(), ServiceError> {
        self.fence
            .as_ref()
            .map_or(Ok(()), |f| f.check_held(self.store.as_ref(), &self.node))
    }

    /// Runs sandboxes as node `id` (the data directory's instance id in a real server): new
    /// sandboxes are placed on it, and at startup it runs only its own.
    pub fn with_node(mut self, id: String) -> Self {
        self.node = id;
        self
    }

    /// Uses `secret` to hash the sandbox tokens this service mints.
    pub fn with_secret(mut self, secret: crate::auth::keys::ServerSecret) -> Self {
        self.secret = secret;
        self
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }
}

/// Runs blocking work (SQLite, file I/O) off the async executor.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, ServiceError>
where
    F: FnOnce() -> Result<T, ServiceError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::internal("background task", e))?
}

/// Validates `page_size` / `page_token` of a list request.
pub(crate) fn page_args(page_size: i32, page_token: &str) -> Result<(usize, i64), ServiceError> {
    let size = match page_size {
        n if n <= 0 => DEFAULT_PAGE_SIZE,
        n => (n as usize).min(MAX_PAGE_SIZE),
    };
    let after = if page_token.is_empty() {
        0
    } else {
        page_token
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                ServiceError::InvalidArgument(format!(
                    "page_token {page_token:?} is not a token returned by a previous list call"
                ))
            })?
    };
    Ok((size, after))
}
