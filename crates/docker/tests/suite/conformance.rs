//! The runtime-generic conformance suite (`agentfense_runtime::conformance`) on Docker.

agentfense_runtime::conformance_tests!(crate::suite::common::guard, crate::suite::common::target());
