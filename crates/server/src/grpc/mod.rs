//! gRPC adapters: translate wire messages to service calls and back. Errors map to
//! `tonic::Status` in one place (`From<ServiceError>`).

mod codebase;
mod sandbox;
pub(crate) mod wire;

pub use codebase::CodebaseApi;
pub use sandbox::{EXIT_CODE_TRAILER, SandboxApi};

/// gRPC's default message limit, which the Python SDK also uses on receive.
pub const MAX_MESSAGE: usize = 4 << 20;
/// Chunk size of streamed downloads (the SDK's upload chunk size too).
pub const CHUNK: usize = 64 << 10;
