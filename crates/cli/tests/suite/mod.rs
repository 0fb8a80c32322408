mod client;
mod interop;
mod policy;
mod restart;
mod run;
mod scan;
mod server;
mod util;
