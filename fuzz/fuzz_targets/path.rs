//! Sandbox paths from arbitrary bytes (every path an API request or the agent names): never a
//! panic; an accepted path is normalised (absolute, no `.`, `..` or empty components) and
//! parsing it again gives it back.
#![no_main]

use agentfense_core::SandboxPath;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(p) = SandboxPath::parse(&text) else {
        return;
    };
    let s = p.as_str();
    assert!(s.starts_with('/'), "{s:?}");
    assert!(!s.contains('\0'), "{s:?}");
    if !p.is_root() {
        assert!(!s.ends_with('/'), "{s:?}");
        for c in s[1..].split('/') {
            assert!(!c.is_empty() && c != "." && c != "..", "{s:?}");
        }
    }
    assert_eq!(SandboxPath::parse(s).as_ref(), Ok(&p));
    if let Some(parent) = p.parent() {
        assert_eq!(parent.depth() + 1, p.depth());
    }
});
