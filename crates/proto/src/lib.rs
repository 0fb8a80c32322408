//! gRPC wire protocol (sandbox.v1) generated code and conversions to core types.
