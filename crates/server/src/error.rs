//! The service layer's error, and its one mapping to gRPC status codes (the REST gateway maps
//! those codes to HTTP statuses in `rest.rs`).

use crate::{files::FilesError, ids::IdError, store::StoreError};

/// What went wrong, classified by what the client should do about it.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Bad input: fix the request (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// The id names nothing (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// Wrong lifecycle state (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this (PERMISSION_DENIED).
    #[error("{0}")]
    PermissionDenied(String),
    /// Quota reached (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The command's timeout expired (DEADLINE_EXCEEDED).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The server is shutting down (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// A server-side failure; the client sees a generic message, the log gets the detail.
    #[error("{context}")]
    Internal {
        /// What the server was doing.
        context: String,
        /// The cause, logged, never sent.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ServiceError {
    /// An internal error with context.
    pub fn internal(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        ServiceError::Internal {
            context: context.into(),
            source: source.into(),
        }
    }

    /// `field is required` (the original's wording).
    pub fn required(field: &str) -> Self {
        ServiceError::InvalidArgument(format!("{field} is required"))
    }
}

/// The full chain of causes, for logs.
pub use agentfense_core::error_chain as chain;

/// An id that does not parse names nothing: NOT_FOUND, as for any unknown id (what the
/// original and every peer answer, and what SDKs map to "not found"), with the expected form.
impl From<IdError> for ServiceError {
    fn from(e: IdError) -> Self {
        ServiceError::NotFound(format!("no such {}: {e}", e.field.trim_end_matches("_id")))
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            // A stale writer: the sandbox moved on without this server (lost with its node).
            StoreError::Fenced { .. } => ServiceError::FailedPrecondition(e.to_string()),
            e => ServiceError::internal("metadata store", e),
        }
    }
}

impl From<FilesError> for ServiceError {
    fn from(e: FilesError) -> Self {
        match e {
            FilesError::NotFound(_) => ServiceError::NotFound(e.to_string()),
            FilesError::WrongKind { .. }
            | FilesError::SizeMismatch { .. }
            | FilesError::TooLarge { .. } => ServiceError::InvalidArgument(e.to_string()),
            FilesError::NoCodebaseDir(_) => ServiceError::FailedPrecondition(e.to_string()),
            FilesError::Io { .. } => ServiceError::internal("codebase files", e),
        }
    }
}

impl From<agentfense_core::PathError> for ServiceError {
    fn from(e: agentfense_core::PathError) -> Self {
        ServiceError::InvalidArgument(e.to_string())
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        use tonic::Status;
        match e {
            ServiceError::InvalidArgument(m) => Status::invalid_argument(m),
            ServiceError::NotFound(m) => Status::not_found(m),
            ServiceError::FailedPrecondition(m) => Status::failed_precondition(m),
            ServiceError::PermissionDenied(m) => Status::permission_denied(m),
            ServiceError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ServiceError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
            ServiceError::Unavailable(m) => Status::unavailable(m),
            ServiceError::Internal { ref context, .. } => {
                // Logged once, here at the boundary; the client gets no internals.
                tracing::error!(error = %chain(&e), "internal error");
                Status::internal(format!(
                    "internal error while handling {context}; see the server log"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stale server's refused write reaches its client as FAILED_PRECONDITION with the
    /// reason, not as an internal error that hides it.
    #[test]
    fn a_fenced_write_is_a_failed_precondition_with_the_reason() {
        let e = StoreError::Fenced {
            id: "sb_0123456789abcdef".into(),
            why: "it was declared lost with node n1 at 2026-12-08T00:00:00Z".into(),
        };
        let status = tonic::Status::from(ServiceError::from(e));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status.message().contains("declared lost with node n1"),
            "{status:?}"
        );
        let status = tonic::Status::from(ServiceError::from(StoreError::BadUrl("x".into())));
        assert_eq!(status.code(), tonic::Code::Internal);
    }
}
