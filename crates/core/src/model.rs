//! Domain types shared by the server, the runtime and the CLI.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Lifecycle state of a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxStatus {
    /// Created, never started (or start pending).
    Pending,
    /// Environment up, `/workspace` mounted, accepting commands.
    Running,
    /// Stopped; can be started again.
    Stopped,
    /// A start failed or the environment died; see the reason. Can be started again.
    Error,
}

/// Lifecycle state of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    /// The shell is alive.
    Active,
    /// The shell exited or was destroyed.
    Closed,
}

/// Which runtime executes a sandbox's commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// bubblewrap namespaces.
    #[default]
    Bwrap,
    /// Docker containers.
    Docker,
}

impl RuntimeKind {
    /// `bwrap` or `docker`.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Bwrap => "bwrap",
            RuntimeKind::Docker => "docker",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bwrap" => Ok(RuntimeKind::Bwrap),
            "docker" => Ok(RuntimeKind::Docker),
            other => Err(format!(
                "unknown runtime {other:?}: expected bwrap or docker"
            )),
        }
    }
}

/// A size in bytes: digits, optionally followed by `K`, `M`, `G` or `T` (binary units, 1024;
/// an `i`, `B` or `iB` after the letter changes nothing), e.g. `4194304`, `512M`, `10GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 1073741824, 512M, 10GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Resource limits of a sandbox; 0 means "no limit" for each field (the wire convention).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceLimits {
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// CPU quota in µs per 100 ms period (100000 = one CPU).
    pub cpu_quota: u64,
    /// Relative CPU weight (cgroup v1 shares; 1024 = default).
    pub cpu_shares: u64,
    /// Maximum number of processes.
    pub pids_limit: u64,
    /// Disk the sandbox may use: allocated bytes of its delta, and the size of its `/tmp` (which
    /// holds `$HOME`). Not on the wire: the server's defaults or the `agentfense.disk_bytes`
    /// label set it.
    pub disk_bytes: u64,
    /// Files, directories and links the sandbox may have in its delta.
    pub disk_inodes: u64,
}

impl ResourceLimits {
    /// True when no limit is set.
    pub fn is_unlimited(&self) -> bool {
        *self == ResourceLimits::default()
    }

    /// The first field of `self` above `ceiling`, as `(field name, value, ceiling)`. A ceiling
    /// of 0 sets none; a value of 0 is unlimited, so above any ceiling, except for
    /// `cpu_shares`, where 0 is the default weight.
    pub fn exceeds(&self, ceiling: &ResourceLimits) -> Option<(&'static str, u64, u64)> {
        let fields = [
            (
                "memory_bytes",
                self.memory_bytes,
                ceiling.memory_bytes,
                true,
            ),
            ("cpu_quota", self.cpu_quota, ceiling.cpu_quota, true),
            ("cpu_shares", self.cpu_shares, ceiling.cpu_shares, false),
            ("pids_limit", self.pids_limit, ceiling.pids_limit, true),
            ("disk_bytes", self.disk_bytes, ceiling.disk_bytes, true),
            ("disk_inodes", self.disk_inodes, ceiling.disk_inodes, true),
        ];
        fields
            .into_iter()
            .find(|&(_, v, c, zero_is_unlimited)| c > 0 && (v > c || (v == 0 && zero_is_unlimited)))
            .map(|(name, v, c, _)| (name, v, c))
    }

    /// Each field of `self`, or `defaults`' where `self`'s is 0.
    pub fn or(self, defaults: ResourceLimits) -> ResourceLimits {
        let pick = |a: u64, b: u64| if a == 0 { b } else { a };
        ResourceLimits {
            memory_bytes: pick(self.memory_bytes, defaults.memory_bytes),
            cpu_quota: pick(self.cpu_quota, defaults.cpu_quota),
            cpu_shares: pick(self.cpu_shares, defaults.cpu_shares),
            pids_limit: pick(self.pids_limit, defaults.pids_limit),
            disk_bytes: pick(self.disk_bytes, defaults.disk_bytes),
            disk_inodes: pick(self.disk_inodes, defaults.disk_inodes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_fall_back_per_field() {
        let req = ResourceLimits {
            memory_bytes: 64 << 20,
            ..ResourceLimits::default()
        };
        let d = ResourceLimits {
            memory_bytes: 1 << 30,
            pids_limit: 512,
            ..ResourceLimits::default()
        };
        assert_eq!(
            req.or(d),
            ResourceLimits {
                memory_bytes: 64 << 20,
                pids_limit: 512,
                ..ResourceLimits::default()
            }
        );
        assert!(ResourceLimits::default().is_unlimited());
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4194304"), Ok(4 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size(" 1 kb"), Ok(1024));
        for bad in [
            "",
            "M",
            "-1",
            "1.5G",
            "12X",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ceiling_refuses_more_and_unlimited() {
        let ceiling = ResourceLimits {
            memory_bytes: 4 << 30,
            pids_limit: 4096,
            cpu_shares: 2048,
            ..ResourceLimits::default()
        };
        let ok = ResourceLimits {
            memory_bytes: 4 << 30,
            pids_limit: 10,
            cpu_quota: 500_000,
            ..ResourceLimits::default()
        };
        assert_eq!(ok.exceeds(&ceiling), None);
        let more = ResourceLimits {
            memory_bytes: 8 << 30,
            ..ok
        };
        assert_eq!(
            more.exceeds(&ceiling),
            Some(("memory_bytes", 8 << 30, 4 << 30))
        );
        let unlimited = ResourceLimits {
            pids_limit: 0,
            ..ok
        };
        assert_eq!(unlimited.exceeds(&ceiling), Some(("pids_limit", 0, 4096)));
        let shares = ResourceLimits {
            cpu_shares: 4096,
            ..ok
        };
        assert_eq!(shares.exceeds(&ceiling), Some(("cpu_shares", 4096, 2048)));
        assert_eq!(
            ResourceLimits::default().exceeds(&ResourceLimits::default()),
            None
        );
    }

    #[test]
    fn runtime_kind_parses() {
        assert_eq!("docker".parse::<RuntimeKind>(), Ok(RuntimeKind::Docker));
        assert!("podman".parse::<RuntimeKind>().is_err());
    }
}
