//! The only module that speaks `rmcp`: the MCP handler over a [`Toolbox`] and a
//! [`Workspace`], served over stdio or as a tower service for streamable HTTP. Upgrading the
//! SDK touches this file alone.

use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    InitializeResult, ListResourcesResult, ListToolsResult, PaginatedRequestParams,
    ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, Resource,
    ResourceContents, ServerCapabilities, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt};
use serde_json::{Value, json};

use crate::tools::{CallError, Toolbox};
use crate::workspace::{PolicyView, Workspace};

/// The policy resource's URI.
pub const POLICY_URI: &str = "agentfense://policy";

/// Finds the workspace a request works on: the one sandbox of a stdio session, or the one a
/// streamable-HTTP request's credentials are bound to (from the HTTP request's parts, which
/// carry what the server's authentication layer put in their extensions).
pub trait Binder: Send + Sync + 'static {
    /// The workspace for this request.
    fn bind(&self, request: Option<&http::request::Parts>) -> Result<Arc<dyn Workspace>, String>;
}

/// A binder that always answers the same workspace (stdio).
pub struct Fixed(pub Arc<dyn Workspace>);

impl Binder for Fixed {
    fn bind(&self, _: Option<&http::request::Parts>) -> Result<Arc<dyn Workspace>, String> {
        Ok(self.0.clone())
    }
}

/// The MCP server: tools and the policy resource, over whatever workspace the binder gives.
#[derive(Clone)]
pub struct Server {
    binder: Arc<dyn Binder>,
    tools: Toolbox,
}

const INSTRUCTIONS: &str = "These tools work inside an AgentFense sandbox: a copy-on-write view \
of one project whose policy decides, per path, what exists (hidden paths do not), what may be \
read and what may be written. Read the agentfense://policy resource to know what you may \
touch. A refusal names the rule that decided it; the rules cannot be changed from here.";

impl Server {
    /// A server with these tools, working on what `binder` gives.
    pub fn new(binder: Arc<dyn Binder>, tools: Toolbox) -> Server {
        Server { binder, tools }
    }

    fn workspace(&self, ctx: &RequestContext<RoleServer>) -> Result<Arc<dyn Workspace>, McpError> {
        self.binder
            .bind(ctx.extensions.get::<http::request::Parts>())
            .map_err(|e| McpError::invalid_request(e, None))
    }
}

fn tool(spec: crate::tools::ToolSpec) -> Tool {
    let schema = match spec.input_schema {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    Tool::new(spec.name, spec.description, Arc::new(schema))
        .with_title(spec.title)
        .with_annotations(
            ToolAnnotations::with_title(spec.title)
                .read_only(spec.read_only)
                .destructive(spec.destructive)
                .idempotent(spec.idempotent)
                // Closed world: everything happens inside the sandbox (its network is its
                // policy's, not the tool's).
                .open_world(false),
        )
}

/// The policy resource's JSON.
pub fn policy_json(view: &PolicyView) -> Value {
    let rules: Vec<Value> = view
        .policy
        .ordered()
        .map(|(r, rule)| {
            let mut v = json!({
                "pattern": rule.pattern,
                "type": rule.pattern_type.to_string(),
                "permission": rule.permission.to_string(),
                "priority": rule.priority,
                "mandatory": view.policy.is_floor(r),
            });
            if let Some(c) = rule.content {
                v["only"] = Value::String(c.describe().to_owned());
            }
            v
        })
        .collect();
    json!({
        "sandbox": view.sandbox_id,
        "project": view.roots,
        "default": "none",
        "levels": {
            "none": "the path does not exist for you (not found)",
            "view": "listed and stat works; reading is refused",
            "read": "readable, not writable",
            "write": "readable and writable: create, modify, delete",
        },
        "rules": rules,
        "rule_order": "first match wins: mandatory rules, then higher priority, then the more specific pattern",
        "outside_project": "the system is read-only; /tmp and $HOME are writable and private to the sandbox",
        "network": view.network,
    })
}

impl ServerHandler for Server {
    fn get_info(&self) -> InitializeResult {
        InitializeResult::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
        .with_server_info(Implementation::new("agentfense", env!("CARGO_PKG_VERSION")))
        .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(
            self.tools.specs().into_iter().map(tool).collect(),
        ))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tools.spec(name).map(tool)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let ws = self.workspace(&context)?;
        let outcome = self
            .tools
            .call(ws.as_ref(), &request.name, request.arguments)
            .await
            .map_err(|e| match e {
                CallError::UnknownTool(_) => McpError::invalid_params(e.to_string(), None),
            })?;
        let content = vec![ContentBlock::text(outcome.text)];
        let mut result = if outcome.is_error {
            CallToolResult::error(content)
        } else {
            CallToolResult::success(content)
        };
        result.structured_content = outcome.structured;
        Ok(result.into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        Ok(ListResourcesResult::with_all_items(vec![
            Resource::new(POLICY_URI, "policy")
                .with_title("The sandbox's policy")
                .with_description(
                    "What this sandbox may touch: its rules in decision order, and its network",
                )
                .with_mime_type("application/json"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        if request.uri != POLICY_URI {
            return Err(McpError::resource_not_found(
                format!("no resource {:?} (there is {POLICY_URI})", request.uri),
                None,
            ));
        }
        let ws = self.workspace(&context)?;
        let view = ws
            .policy()
            .await
            .map_err(|e| McpError::internal_error(e.to_string(), None))?;
        let text = serde_json::to_string_pretty(&policy_json(&view)).unwrap_or_default();
        Ok(
            ReadResourceResult::new(vec![ResourceContents::TextResourceContents {
                uri: POLICY_URI.to_owned(),
                mime_type: Some("application/json".to_owned()),
                text,
                meta: None,
            }])
            .into(),
        )
    }
}

/// Serves MCP over this process's stdin and stdout until the client closes them.
pub async fn serve_stdio(server: Server) -> std::io::Result<()> {
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| std::io::Error::other(format!("MCP handshake failed: {e}")))?;
    running
        .waiting()
        .await
        .map_err(|e| std::io::Error::other(format!("MCP session failed: {e}")))?;
    Ok(())
}

/// The streamable-HTTP endpoint as a tower service. Host and Origin are checked by the
/// caller's own layers (the server's REST guard), so the SDK's checks are widened to let
/// every request those layers passed through; sessions are not kept (each request carries
/// its credentials and is bound on its own).
pub fn http_service(
    server: Server,
) -> rmcp::transport::streamable_http_server::StreamableHttpService<
    Server,
    rmcp::transport::streamable_http_server::session::local::LocalSessionManager,
> {
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    };
    let mut config = StreamableHttpServerConfig::default().disable_allowed_hosts();
    config.legacy_session_mode = false;
    config.json_response = true;
    StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    )
}
