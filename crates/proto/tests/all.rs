//! Integration tests of agentfense-proto (one binary; modules live in `suite/`).

mod suite;
