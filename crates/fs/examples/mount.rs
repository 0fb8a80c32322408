//! Mounts one sandbox view until stdin closes; used by `bench/fs.sh` and for manual testing.
//!
//! `mount LOWER DELTA MOUNTPOINT [PRESET] [TTL_SECS]` (preset default `full-access`, TTL 1).

use std::error::Error;
use std::io::Read;
use std::time::Duration;

use agentfense_core::{Policy, presets};
use agentfense_fs::{FsConfig, mount};

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [lower, delta, mnt, rest @ ..] = args.as_slice() else {
        return Err("usage: mount LOWER DELTA MOUNTPOINT [PRESET] [TTL_SECS]".into());
    };
    let preset = rest.first().map_or("full-access", String::as_str);
    let ttl: f64 = rest.get(1).map_or(Ok(1.0), |s| s.parse())?;
    let rules = presets::get(preset).ok_or("unknown preset")?.rules();
    let mut cfg = FsConfig::new("bench", lower, delta, mnt, Policy::compile(rules)?);
    cfg.entry_ttl = Duration::from_secs_f64(ttl);
    cfg.attr_ttl = cfg.entry_ttl;
    let handle = mount(cfg)?;
    println!("ready");
    // Block until the parent closes our stdin.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    let stats = handle.stats();
    eprintln!("{stats:?}");
    handle.unmount()?;
    Ok(())
}
