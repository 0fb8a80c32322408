//! AgentFense as an MCP server: coding agents (Claude Code, Cursor, Codex, any MCP client)
//! use one sandbox as their shell and file tools.
//!
//! The operator fixes the environment; the agent only works inside it. There is no tool to
//! create a sandbox, change its rules or widen its network: the tools ([`tools`]) run
//! commands and edit files inside one existing sandbox ([`Workspace`]), and the sandbox's
//! policy is a read-only resource. [`adapter`] is the only module that uses the MCP SDK.

pub mod adapter;
pub mod tools;
pub mod workspace;

pub use adapter::{Binder, Fixed, POLICY_URI, Server, http_service, policy_json, serve_stdio};
pub use tools::{ToolName, Toolbox};
pub use workspace::{Denial, ExecCall, ExecReply, PolicyView, Workspace, WsError, WsFuture};
