//! REST transcoding (google.api.http style): a request message built from a JSON body,
//! query parameters and path parameters. Used by the server's REST gateway; kept here, with
//! the messages, so that it can be fuzzed without a server.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Builds a request message from a JSON body (may be empty), query parameters and path
/// parameters, in increasing precedence.
pub fn transcode<T: DeserializeOwned>(
    body: &[u8],
    query: HashMap<String, String>,
    path: &[(&str, String)],
) -> Result<T, String> {
    let mut obj = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err("request body must be a JSON object".into()),
            Err(e) => return Err(format!("request body is not valid JSON: {e}")),
        }
    };
    for (k, v) in query {
        let value = match v.as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::String(v),
        };
        obj.insert(k, value);
    }
    for (k, v) in path {
        // A path parameter wins over the same field in either spelling.
        obj.remove(&camel(k));
        obj.insert((*k).to_owned(), Value::String(v.clone()));
    }
    serde_json::from_value(Value::Object(obj)).map_err(|e| format!("invalid request: {e}"))
}

fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut up = false;
    for c in snake.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}
