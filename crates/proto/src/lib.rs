//! gRPC wire protocol (sandbox.v1) generated code and conversions to core types.
//!
//! * [`v1`]: messages, enums, clients and servers generated from `proto/*.proto` (package
//!   `sandbox.v1`), wire-identical to the published Python SDK `agentfense==0.2.1`.
//! * [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of those files and their imports.
//! * [`convert`]: checked conversions between wire types and `agentfense-core` types.

pub mod convert;
pub mod rest;

/// Generated code for protobuf package `sandbox.v1`.
///
/// Clients live in [`v1::sandbox_service_client`] and [`v1::codebase_service_client`], server
/// traits in [`v1::sandbox_service_server`] and [`v1::codebase_service_server`].
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rustdoc::broken_intra_doc_links,
    rustdoc::invalid_html_tags,
    rustdoc::bare_urls
)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/sandbox.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/sandbox.v1.serde.rs"));
}

/// Generated code for protobuf package `agentfense.v1`: our own API next to `sandbox.v1`
/// (client in [`agentfense_v1::extensions_client`], server trait in
/// [`agentfense_v1::extensions_server`]).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rustdoc::broken_intra_doc_links,
    rustdoc::invalid_html_tags,
    rustdoc::bare_urls
)]
pub mod agentfense_v1 {
    include!(concat!(env!("OUT_DIR"), "/agentfense.v1.rs"));
}

/// The well-known types used by [`v1`] (`Timestamp`, `Duration`), with protojson serde impls.
pub use pbjson_types;

/// Encoded `google.protobuf.FileDescriptorSet` of `common.proto`, `codebase.proto`,
/// `sandbox.proto` and everything they import, with options (including `google.api.http`)
/// intact and without source info. Feed it to a gRPC reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sandbox_v1_descriptor.bin"));
