//! REST transcoding (JSON body + query + path parameters into a request message) and the
//! conversion of its rules to the engine's, on arbitrary input: never a panic.
//!
//! Input: a first line of query parameters (`k=v&k=v`), a second line with a path parameter
//! value, then the body.
#![no_main]

use std::collections::HashMap;

use agentfense_proto::convert::rules_from_wire;
use agentfense_proto::rest::transcode;
use agentfense_proto::v1;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let query_line = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let path_value = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let body = parts.next().unwrap_or_default();
    let query: HashMap<String, String> = query_line
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let sandbox = [("sandbox_id", path_value.clone())];
    if let Ok(r) = transcode::<v1::CreateSandboxRequest>(body, query.clone(), &[]) {
        let _ = rules_from_wire(&r.permissions);
    }
    let _ = transcode::<v1::ExecRequest>(body, query.clone(), &sandbox);
    let _ = transcode::<v1::CreateSessionRequest>(body, query.clone(), &sandbox);
    let _ = transcode::<v1::SessionExecRequest>(
        body,
        query.clone(),
        &[("session_id", path_value.clone())],
    );
    let _ = transcode::<v1::ListCodebasesRequest>(body, query.clone(), &[]);
    let _ = transcode::<v1::ListFilesRequest>(body, query, &[("codebase_id", path_value)]);
});
