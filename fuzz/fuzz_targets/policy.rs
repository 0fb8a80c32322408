//! Compiles arbitrary rules and evaluates arbitrary paths: must never panic, and every
//! decision must be consistent with the engine's documented invariants.
#![no_main]

use agentfense_core::{Level, NodeKind, PatternType, PermissionRule, Policy, SandboxPath};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Lines: rules first ("TYPE LEVEL PRIORITY PATTERN"), then a "--" line, then paths.
    let mut rules = Vec::new();
    let mut lines = text.lines();
    for line in lines.by_ref() {
        if line == "--" {
            break;
        }
        let mut parts = line.splitn(4, ' ');
        let (Some(t), Some(l), Some(p), Some(pattern)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let kind = match t {
            "f" => PatternType::File,
            "d" => PatternType::Directory,
            _ => PatternType::Glob,
        };
        let level = l.parse().unwrap_or(Level::Read);
        let priority = p.parse().unwrap_or(0);
        rules.push(PermissionRule::new(pattern, kind, level, priority));
    }
    let Ok(policy) = Policy::compile(rules) else {
        return;
    };
    for raw in lines {
        let Ok(path) = SandboxPath::parse(raw) else {
            continue;
        };
        for kind in [NodeKind::File, NodeKind::Dir] {
            let d = policy.evaluate(&path, kind);
            if d.level.is_visible() {
                // A visible path's parent is always a visible directory.
                if let Some(parent) = path.parent() {
                    assert!(policy.level(&parent, NodeKind::Dir).is_visible());
                }
            }
        }
    }
});
