mod interop;
mod policy;
mod server;
mod util;
