mod util;

mod absent_dirs;
mod audit;

mod daemon_io;
mod enforcement;
mod invariants;
mod leak;
mod passthrough;
mod publish;
