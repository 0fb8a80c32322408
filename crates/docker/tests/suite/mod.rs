mod common;
mod conformance;
mod isolation;
mod lifecycle;
