//! Integration tests of the Docker runtime against a real dockerd with a locally built image
//! (`scripts/docker-setup.sh`). The daemon is found at `/var/run/docker.sock`, the image in
//! `AGENTFENSE_DOCKER_IMAGE` (default `agentfense-test-base`). Without them each test prints
//! `SKIPPED <test>: <reason>` and passes, except under `CI`, where it fails loudly.

// Helpers outside #[test] functions may panic too: a failed fixture is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;
