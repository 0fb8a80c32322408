mod common;
mod conformance;
mod exec;
mod isolation;
mod limits;
mod tty;
