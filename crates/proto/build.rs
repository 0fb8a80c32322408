//! Compiles `proto/*.proto` (workspace root) without `protoc`.
//!
//! `protox` parses and links the files in pure Rust, so a fresh machine needs nothing but cargo.
//! Its descriptors feed `tonic-prost-build` (messages, client and server) and are also written
//! to `OUT_DIR/sandbox_v1_descriptor.bin`, which `lib.rs` exposes for gRPC reflection and for
//! the SDK compatibility test. `pbjson-build` adds protojson serde impls for the REST gateway.

use std::env;
use std::error::Error;
use std::fs;
use std::path::PathBuf;

/// The wire protocol's files. Their names are part of the wire contract: the SDK's descriptors
/// import `common.proto` by this exact name. `agentfense.proto` is our own API (package
/// `agentfense.v1`), next to it.
const PROTOS: [&str; 4] = [
    "common.proto",
    "codebase.proto",
    "sandbox.proto",
    "agentfense.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let proto_dir = manifest_dir.join("../../proto");
    // A directory makes cargo rescan every file below it.
    println!("cargo:rerun-if-changed={}", proto_dir.display());

    let mut compiler = protox::Compiler::new([&proto_dir])?;
    compiler
        .include_imports(true)
        .include_source_info(true)
        .open_files(PROTOS)?;

    // Source info carries the comments that become rustdoc on the generated items. prost-build
    // needs the imported files too (to resolve field types), and writes one `<package>.rs` per
    // package that is not mapped to an extern crate; only `sandbox.v1.rs` is used.
    let codegen_set = compiler.file_descriptor_set();

    // `encode_file_descriptor_set` keeps extension options (the `google.api.http` annotations),
    // which `prost_types` would drop. Imports stay in so that the set is self-contained for
    // reflection; source info is left out to keep the binary small.
    compiler.include_source_info(false);
    let encoded = compiler.encode_file_descriptor_set();
    fs::write(out_dir.join("sandbox_v1_descriptor.bin"), &encoded)?;

    // Well-known types come from `pbjson_types`, which gives Timestamp and Duration the
    // protojson forms (RFC 3339, "1.5s") that the REST gateway needs.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Not compiled here: `compile_well_known_types` only turns off prost-build's default
        // mapping to `prost_types`, so that the extern path below takes its place.
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(codegen_set)?;

    // serde impls following grpc-gateway's protojson conventions: lowerCamelCase names on
    // output, either name accepted on input, unknown fields discarded, every field emitted
    // (including zero values), enums by name, 64-bit integers as strings.
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .extern_path(".google.protobuf", "::pbjson_types")
        .emit_fields()
        .ignore_unknown_fields()
        .build(&[".sandbox.v1"])?;
    Ok(())
}
