mod common;
mod exec;
mod isolation;
mod lifecycle;
mod limits;
mod sessions;
