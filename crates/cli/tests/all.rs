//! Integration tests for the `agentfense` binary: one binary, one module per command group.

mod suite;
