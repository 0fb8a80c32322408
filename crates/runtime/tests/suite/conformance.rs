//! The runtime-generic conformance suite (`agentfense_runtime::conformance`) on bwrap.

agentfense_runtime::conformance_tests!(
    crate::suite::common::prepare,
    crate::suite::common::target()
);
