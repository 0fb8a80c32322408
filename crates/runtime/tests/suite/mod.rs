mod common;
mod exec;
mod isolation;
mod limits;
mod sessions;
mod tty;
