mod util;

mod absent_dirs;
mod audit;
mod casefold;

mod daemon_io;
mod enforcement;
mod invariants;
mod key_material;
mod leak;
mod passthrough;
mod publish;
mod spellings;
