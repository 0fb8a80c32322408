mod interop;
mod policy;
mod restart;
mod server;
mod util;
