//! gRPC adapters: translate wire messages to service calls and back. Errors map to
//! `tonic::Status` in one place (`From<ServiceError>`).

mod codebase;
mod extensions;
pub mod review;
mod sandbox;
pub(crate) mod wire;

pub use codebase::CodebaseApi;
pub use extensions::ExtensionsApi;
pub use review::ReviewApi;
pub use sandbox::{EXIT_CODE_TRAILER, SandboxApi};

/// gRPC's default message limit, which the Python SDK also uses on receive.
pub const MAX_MESSAGE: usize = 4 << 20;
/// Chunk size of streamed downloads (the SDK's upload chunk size too).
pub const CHUNK: usize = 64 << 10;

/// The sandbox.v1 services (codebases and sandboxes) and our `agentfense.v1.Extensions` on one
/// service handle, behind the gate
/// ([`crate::auth::AuthLayer`]), as routes that `serve` listens with and that tests drive in
/// process. Services added to the result afterwards (health) are not gated.
pub fn routes(
    service: std::sync::Arc<crate::service::Service>,
    gate: std::sync::Arc<crate::auth::Gate>,
) -> tonic::service::Routes {
    use agentfense_proto::v1::codebase_service_server::CodebaseServiceServer;
    use agentfense_proto::v1::sandbox_service_server::SandboxServiceServer;
    let routes = tonic::service::Routes::new(
        CodebaseServiceServer::new(CodebaseApi(service.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    )
    .add_service(
        SandboxServiceServer::new(SandboxApi(service.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    )
    .add_service(
        agentfense_proto::agentfense_v1::extensions_server::ExtensionsServer::new(ExtensionsApi(
            service.clone(),
        )),
    )
    .add_service(
        agentfense_proto::agentfense_v1::review_server::ReviewServer::new(ReviewApi(service))
            .max_encoding_message_size(MAX_MESSAGE * 16),
    );
    tonic::service::Routes::from(
        routes
            .prepare()
            .into_axum_router()
            .layer(crate::auth::AuthLayer(gate)),
    )
}
