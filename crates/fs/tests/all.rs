//! Mount tests: real FUSE mounts in temp dirs, driven with real tools.
//!
//! They need root and `/dev/fuse`. Without them each test prints `SKIPPED <test>: <reason>`
//! and passes, unless `CI` is set, in which case it fails loudly.

// Helpers in this test binary are not `#[test]` functions, which `allow-unwrap-in-tests`
// does not cover; a panic in a helper is a test failure, as intended.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;
