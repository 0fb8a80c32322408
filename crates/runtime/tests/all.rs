//! Integration tests of the bwrap runtime (real bubblewrap, root, cgroups). Each test probes
//! first: without the prerequisites it prints `SKIPPED <test>: <reason>` and passes, except under
//! `CI`, where it fails loudly.

// Helpers outside #[test] functions may panic too: a failed fixture is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;
