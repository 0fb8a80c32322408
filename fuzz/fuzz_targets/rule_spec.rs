//! The `--rule` syntax (`[TYPE:]PATTERN=LEVEL[@PRIORITY]`) on arbitrary input: never a panic;
//! an accepted rule prints back as a spec that parses to the same rule, and compiling it either
//! works or fails with an error (never a panic).
#![no_main]

use agentfense_core::{PermissionRule, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(rule) = PermissionRule::parse_spec(&text) else {
        return;
    };
    assert_eq!(PermissionRule::parse_spec(&rule.to_spec()), Ok(rule.clone()));
    let _ = Policy::compile(vec![rule]);
});
