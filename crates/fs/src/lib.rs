//! The policy filesystem: FUSE enforcement over a copy-on-write delta.
