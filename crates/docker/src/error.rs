//! [`DockerError`]: the Docker runtime's own errors, named after the step that failed, and their
//! single mapping into [`RuntimeError`] (whose kind the server maps to wire codes).

use agentfense_runtime::{ErrorKind, RuntimeError};

/// Errors of the Docker runtime.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The client could not be built for this daemon address.
    #[error("connecting to the docker daemon at {host} failed")]
    Connect {
        /// The daemon address.
        host: String,
        /// Why.
        #[source]
        source: bollard::errors::Error,
    },
    /// The daemon did not answer a ping or the version negotiation.
    #[error("the docker daemon at {host} does not answer")]
    Unreachable {
        /// The daemon address.
        host: String,
        /// Why.
        #[source]
        source: bollard::errors::Error,
    },
    /// The sandbox's image is not present locally (and could not be pulled).
    #[error("image {image} is not available locally{}", pull.as_ref().map(|p| format!(" (pull failed: {p})")).unwrap_or_default())]
    ImageMissing {
        /// The image reference.
        image: String,
        /// Why the pull failed, when one was attempted.
        pull: Option<String>,
    },
    /// The sandbox's container is gone or stopped (killed outside the runtime, or its init
    /// died).
    #[error("the container of sandbox {sandbox_id} is not running")]
    ContainerNotRunning {
        /// The sandbox.
        sandbox_id: String,
    },
    /// A Docker API call failed.
    #[error("docker {step} for sandbox {sandbox_id} failed")]
    Api {
        /// `create container`, `start container`, `create exec`, `inspect exec`...
        step: &'static str,
        /// The sandbox.
        sandbox_id: String,
        /// Why.
        #[source]
        source: bollard::errors::Error,
    },
    /// The daemon answered something the runtime cannot use.
    #[error("docker {step} for sandbox {sandbox_id}: {message}")]
    Protocol {
        /// The step.
        step: &'static str,
        /// The sandbox.
        sandbox_id: String,
        /// What was wrong.
        message: String,
    },
}

impl DockerError {
    /// The wire category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DockerError::ImageMissing { .. } | DockerError::ContainerNotRunning { .. } => {
                ErrorKind::FailedPrecondition
            }
            DockerError::Connect { .. } | DockerError::Unreachable { .. } => ErrorKind::Unavailable,
            DockerError::Api { .. } | DockerError::Protocol { .. } => ErrorKind::Internal,
        }
    }

    pub(crate) fn api(
        step: &'static str,
        sandbox_id: &str,
    ) -> impl FnOnce(bollard::errors::Error) -> DockerError {
        let sandbox_id = sandbox_id.to_owned();
        move |source| DockerError::Api {
            step,
            sandbox_id,
            source,
        }
    }
}

/// Whether a bollard error is the daemon's 404.
pub(crate) fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Whether a bollard error is the daemon's 409 (name conflict).
pub(crate) fn is_conflict(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 409,
            ..
        }
    )
}

/// The one mapping into the runtime interface's error.
///
/// `RuntimeError` has no variant for backend failures yet, so:
/// - a missing image becomes [`RuntimeError::NotRunning`] (FAILED_PRECONDITION) whose id text
///   names the image, e.g. `sandbox sb1 (image foo:1 is not available locally) is not running`;
/// - a daemon that does not answer becomes [`RuntimeError::MissingBinary`] on the daemon
///   address (UNAVAILABLE);
/// - everything else becomes [`RuntimeError::Io`] (INTERNAL) with this error as its source, so
///   the detail reaches the server's log.
pub(crate) fn into_runtime(sandbox_id: &str, e: DockerError) -> RuntimeError {
    match e {
        DockerError::ImageMissing { .. } => RuntimeError::NotRunning {
            sandbox_id: format!("{sandbox_id} ({e})"),
        },
        DockerError::ContainerNotRunning { sandbox_id } => RuntimeError::NotRunning { sandbox_id },
        DockerError::Connect { ref host, .. } | DockerError::Unreachable { ref host, .. } => {
            RuntimeError::MissingBinary {
                path: host.clone().into(),
                source: std::io::Error::other(e),
            }
        }
        DockerError::Api { step, .. } | DockerError::Protocol { step, .. } => RuntimeError::Io {
            op: step,
            source: std::io::Error::other(e),
        },
    }
}

/// An invalid-argument error naming what was wrong.
pub(crate) fn invalid(message: impl Into<String>) -> RuntimeError {
    RuntimeError::InvalidArgument {
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn missing_image_is_a_failed_precondition_naming_the_image() {
        let e = DockerError::ImageMissing {
            image: "python:3.11-slim".into(),
            pull: None,
        };
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        let r = into_runtime("sb1", e);
        assert_eq!(r.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(
            r.to_string(),
            "sandbox sb1 (image python:3.11-slim is not available locally) is not running"
        );
    }

    #[test]
    fn api_errors_are_internal_with_the_step() {
        let e = DockerError::Api {
            step: "create exec",
            sandbox_id: "sb1".into(),
            source: bollard::errors::Error::DockerResponseServerError {
                status_code: 500,
                message: "boom".into(),
            },
        };
        let r = into_runtime("sb1", e);
        assert_eq!(r.kind(), ErrorKind::Internal);
        assert_eq!(r.to_string(), "create exec failed");
    }
}
