//! The AgentFense service: the gRPC and REST API that the published Python SDK talks to,
//! codebase storage, the sandbox lifecycle, durable metadata in SQLite and the audit trail.
//!
//! The service layer ([`service`]) owns the logic; `grpc` and `rest` are thin adapters with one
//! error mapping each. Binaries call [`config::Config::load`] and then the serve entry point.

pub mod alerts;
pub mod audit;
pub mod auth;
pub mod config;
pub mod error;
pub mod files;
pub mod grpc;
pub mod host;
pub mod ids;
pub mod mcp;
pub mod metrics;
pub mod rest;
pub mod serve;
pub mod service;
pub mod store;
pub mod tls;
pub mod uds;
