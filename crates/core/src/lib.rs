//! AgentFense core: domain types shared by every other crate, and the permission engine.
//!
//! Everything here is pure: no I/O, no async runtime, no system calls. The engine is compiled once
//! from a rule list ([`Policy::compile`]) and then answers [`Policy::evaluate`] with a
//! [`Decision`] that names the rule that decided it, so that denials can be explained and
//! audited.
//!
//! The exact semantics (glob grammar, rule order, traversal of hidden directories) are documented
//! in `docs/permissions.md` and on the items below.

mod content;
pub mod egress;
mod level;
mod model;
mod path;
mod pattern;
mod policy;
pub mod presets;
mod rule_spec;
mod tree;

pub use content::{Content, MAX_SCANNED};
pub use level::{Level, ParseLevelError, ParsePatternTypeError, PatternType};
pub use model::{ResourceLimits, RuntimeKind, SandboxStatus, SessionStatus, parse_size};
pub use path::{MAX_NAME_LEN, MAX_PATH_LEN, PathError, SandboxPath};
pub use pattern::{CASE_INSENSITIVE, MAX_PATTERN_SEGMENTS, PatternError};
pub use policy::{
    Basis, Cursor, Decision, MAX_RULES, NodeKind, PermissionRule, Policy, PolicyError, RuleRef,
    specificity,
};
pub use rule_spec::RuleSpecError;
pub use tree::Tree;

/// An error and its chain of causes on one line (`outer: cause: root cause`), for logs and
/// for messages that must say what really failed.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
