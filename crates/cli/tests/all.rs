//! Integration tests for the `agentfense` binary: one binary, one module per command group.
// Test helpers outside #[test] fns are not covered by clippy.toml's allow-*-in-tests; a panic
// in a test helper is a test failure, which is what we want.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;
