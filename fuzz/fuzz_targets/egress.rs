//! The egress allow-list (`agentfense.egress`) on arbitrary input: never a panic; an accepted
//! entry re-parses from its own text to the same entry, a policy is within itself as a ceiling,
//! and matching any name or address against an accepted policy never panics.
#![no_main]

use std::collections::BTreeMap;

use agentfense_core::egress::{EgressPolicy, parse_entry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for raw in text.split(',') {
        if let Ok(e) = parse_entry(raw) {
            assert_eq!(parse_entry(&e.source), Ok(e.clone()));
        }
    }
    let Ok(policy) = EgressPolicy::parse(&text, &BTreeMap::new()) else {
        return;
    };
    // Every policy is within itself (the ceiling check is reflexive).
    assert_eq!(policy.check_within(&policy), Ok(()));
    for probe in text.split(['\n', ' ']) {
        let _ = policy.allows_name(probe, 443);
        if let Ok(ip) = probe.parse() {
            let _ = policy.allows_ip(ip, 80);
        }
    }
});
