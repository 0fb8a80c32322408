//! The per-mount modes, a leaf module shared by the adapter and the mount.

/// When the sandbox's writes reach the codebase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PublishMode {
    /// After every command ([`crate::MountHandle::command_finished`]), as the original's users expect.
    #[default]
    AfterEachCommand,
    /// Only on an explicit [`crate::MountHandle::publish`] (review / diff workflows).
    Explicit,
}

/// How opened files are served: a per-mount trade-off between opening many small files and
/// streaming large ones (the crate docs compare them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoMode {
    /// No FUSE open at all: opening costs no round trip, the rules are checked on every
    /// read and write, data comes from this mount's page cache. Best for source trees
    /// (`grep -r`, `git status`, builds).
    #[default]
    NoOpen,
    /// One FUSE open per open(2), checked against the rules there; files this sandbox may
    /// only read are then handed to the kernel as passthrough files: their reads go straight
    /// to the host file, at native speed. Writable files are served by the daemon as in
    /// no-open mode. Best for large data files; every open costs a round trip to the daemon.
    /// Falls back to daemon-served I/O where the kernel offers no passthrough (Linux < 6.9,
    /// or without privileges).
    Passthrough,
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<IoMode, String> {
        match s {
            "no-open" => Ok(IoMode::NoOpen),
            "passthrough" => Ok(IoMode::Passthrough),
            other => Err(format!(
                "unknown I/O mode {other:?}: expected \"no-open\" (the default) or \"passthrough\""
            )),
        }
    }
}
