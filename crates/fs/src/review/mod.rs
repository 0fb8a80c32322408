//! Reviewing a sandbox's changes before they reach the codebase: [`patch`] renders them as a
//! git-compatible unified diff.

pub mod patch;
