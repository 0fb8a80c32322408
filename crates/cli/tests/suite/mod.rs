mod client;
mod interop;
mod policy;
mod restart;
mod scan;
mod server;
mod util;
