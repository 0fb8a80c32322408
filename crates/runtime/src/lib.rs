//! Isolated execution: sandbox environments, exec, sessions, resource limits.
