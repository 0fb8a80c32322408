mod policy;
mod util;
