//! Checks on what clients send (ids, limits, working directories) and the command environment.

use super::*;

pub(super) fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::invalid(format!(
            "sandbox id {id:?} must be 1-128 characters of [A-Za-z0-9_-]"
        )))
    }
}

/// Rejects limits the environment itself could not live with (the init, bwrap and a shell
/// need some room) or that the kernel refuses.
pub(super) fn validate_limits(l: &crate::types::ResourceLimits) -> Result<()> {
    let too_small = |what: &str, min: u64, v: Option<u64>| match v {
        Some(v) if v > 0 && v < min => Err(RuntimeError::invalid(format!(
            "{what} must be at least {min} (or 0 for no limit), got {v}"
        ))),
        _ => Ok(()),
    };
    too_small("memory_bytes", 16 << 20, l.memory_bytes)?;
    too_small("pids_limit", 8, l.pids_limit)?;
    too_small("cpu_quota_us", 1_000, l.cpu_quota_us)?;
    too_small("cpu_shares", 2, l.cpu_shares)?;
    Ok(())
}

pub(super) fn cgroup_name(sandbox_id: &str) -> String {
    format!("sb-{sandbox_id}")
}

/// Top-level directories a workspace path may not be in: the system the sandbox is built
/// from, kernel filesystems, and the runtime's own places.
const RESERVED_TOP: &[&str] = &[
    "bin",
    "boot",
    "dev",
    "etc",
    "lib",
    "lib32",
    "lib64",
    "libx32",
    "proc",
    "run",
    "sbin",
    "sys",
    "usr",
    "workspace",
];

/// Checks a [`SandboxSpec::workspace_path`]: absolute, normalized, at least one level deep, not
/// in a directory the sandbox's system occupies (`/usr`, `/etc`, `/proc`, `/dev`, `/sys`,
/// `/run`, `/bin`, `/sbin`, `/lib*`, `/boot`) or in `/workspace`.
pub fn check_workspace_path(path: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(RuntimeError::invalid(format!(
            "workspace path {path:?} {why}"
        )))
    };
    let Some(rel) = path.strip_prefix('/') else {
        return bad("is not absolute");
    };
    let p = match SandboxPath::parse(rel) {
        Ok(p) if p.as_str() == path => p,
        Ok(_) | Err(_) => return bad("is not a normalized path"),
    };
    if p.is_root() {
        return bad("is the root");
    }
    let top = rel.split('/').next().unwrap_or_default();
    if RESERVED_TOP.contains(&top) {
        return bad(&format!(
            "is inside /{top}, which the sandbox's system occupies"
        ));
    }
    if path.bytes().any(|b| b.is_ascii_control()) {
        return bad("contains control characters");
    }
    Ok(())
}

/// Resolves a request's workdir to an absolute path inside `/workspace`.
pub fn resolve_workdir(workdir: &str) -> Result<String> {
    resolve_workdir_in(WORKSPACE, workdir)
}

/// Resolves a request's workdir to an absolute path inside the workspace, which appears at
/// `/workspace` and at `root` (the same or the sandbox's [`SandboxSpec::workspace_path`]):
/// relative paths and an empty one are taken from `root`.
pub fn resolve_workdir_in(root: &str, workdir: &str) -> Result<String> {
    if root != WORKSPACE {
        let rel = if workdir.starts_with('/') {
            workdir
                .strip_prefix(root)
                .filter(|r| r.is_empty() || r.starts_with('/'))
                .map(|r| r.trim_start_matches('/'))
        } else {
            Some(workdir)
        };
        if let Some(rel) = rel {
            let p = SandboxPath::parse(rel)
                .map_err(|e| RuntimeError::invalid(format!("workdir: {e}")))?;
            return Ok(if p.is_root() {
                root.to_owned()
            } else {
                format!("{root}{}", p.as_str())
            });
        }
    }
    let rel = if workdir.starts_with('/') {
        if workdir == WORKSPACE {
            ""
        } else if let Some(rest) = workdir.strip_prefix("/workspace/") {
            rest
        } else {
            return Err(RuntimeError::invalid(format!(
                "workdir {workdir:?} is outside the workspace"
            )));
        }
    } else {
        workdir
    };
    let p = SandboxPath::parse(rel).map_err(|e| RuntimeError::invalid(format!("workdir: {e}")))?;
    Ok(if p.is_root() {
        WORKSPACE.to_owned()
    } else {
        format!("{WORKSPACE}{}", p.as_str())
    })
}

/// The clean default environment plus `extra` (request values win over defaults).
pub fn build_env(
    user: &SandboxUser,
    extra: &BTreeMap<String, String>,
    fixed: &[(&str, &str)],
) -> Result<Vec<String>> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("HOME".into(), user.home.clone());
    env.insert("LANG".into(), "C.UTF-8".into());
    env.insert("TERM".into(), "dumb".into());
    env.insert("USER".into(), user.name.clone());
    for (k, v) in fixed {
        env.insert((*k).into(), (*v).into());
    }
    for (k, v) in extra {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(RuntimeError::invalid(format!(
                "invalid environment variable {k:?}"
            )));
        }
        env.insert(k.clone(), v.clone());
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    pub(super) fn workdir_stays_inside_workspace() {
        assert_eq!(resolve_workdir("").unwrap(), "/workspace");
        assert_eq!(resolve_workdir_in("/home/me/p", "").unwrap(), "/home/me/p");
        assert_eq!(
            resolve_workdir_in("/home/me/p", "a/b").unwrap(),
            "/home/me/p/a/b"
        );
        assert_eq!(
            resolve_workdir_in("/home/me/p", "/home/me/p/a").unwrap(),
            "/home/me/p/a"
        );
        assert_eq!(
            resolve_workdir_in("/home/me/p", "/workspace/a").unwrap(),
            "/workspace/a"
        );
        assert!(resolve_workdir_in("/home/me/p", "/home/me/pq").is_err());
        assert!(resolve_workdir_in("/home/me/p", "/home/me/p/../x").is_err());
        assert!(check_workspace_path("/home/me/p").is_ok());
        for bad in [
            "home/me",
            "/",
            "/usr/src/p",
            "/home/me/../x",
            "/home//me",
            "/workspace/x",
            "/a\nb",
        ] {
            assert!(check_workspace_path(bad).is_err(), "{bad}");
        }
        assert_eq!(resolve_workdir("/workspace").unwrap(), "/workspace");
        assert_eq!(resolve_workdir("a/./b/").unwrap(), "/workspace/a/b");
        assert_eq!(
            resolve_workdir("/workspace/a/../c").unwrap(),
            "/workspace/c"
        );
        for bad in [
            "..",
            "a/../../x",
            "/etc",
            "/workspacex",
            "/workspace/../etc",
            "a\0b",
        ] {
            assert!(
                matches!(
                    resolve_workdir(bad),
                    Err(RuntimeError::InvalidArgument { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    pub(super) fn env_is_clean_default_plus_request() {
        let user = SandboxUser {
            name: "sandbox".into(),
            uid: 1000,
            gid: 1000,
            home: "/tmp/home".into(),
        };
        let mut extra = BTreeMap::new();
        extra.insert("FOO".to_owned(), "bar".to_owned());
        extra.insert("TERM".to_owned(), "xterm".to_owned());
        let env = build_env(&user, &extra, &[]).unwrap();
        assert_eq!(
            env,
            vec![
                "FOO=bar".to_owned(),
                "HOME=/tmp/home".to_owned(),
                "LANG=C.UTF-8".to_owned(),
                format!("PATH={DEFAULT_PATH}"),
                "TERM=xterm".to_owned(),
                "USER=sandbox".to_owned(),
            ]
        );
        extra.insert("A=B".to_owned(), "x".to_owned());
        assert!(build_env(&user, &extra, &[]).is_err());
    }

    #[test]
    pub(super) fn limits_are_validated() {
        use crate::types::ResourceLimits;
        assert!(validate_limits(&ResourceLimits::default()).is_ok());
        let ok = ResourceLimits {
            memory_bytes: Some(64 << 20),
            cpu_quota_us: Some(50_000),
            cpu_shares: Some(512),
            pids_limit: Some(50),
        };
        assert!(validate_limits(&ok).is_ok());
        for bad in [
            ResourceLimits {
                memory_bytes: Some(1),
                ..ok
            },
            ResourceLimits {
                pids_limit: Some(2),
                ..ok
            },
            ResourceLimits {
                cpu_quota_us: Some(10),
                ..ok
            },
        ] {
            assert!(matches!(
                validate_limits(&bad),
                Err(RuntimeError::InvalidArgument { .. })
            ));
        }
    }

    #[test]
    pub(super) fn ids_are_validated() {
        assert!(validate_id("sb_1-a").is_ok());
        for bad in ["", "../x", "a/b", "-x", "a b"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        let s = session::new_session_id();
        assert_eq!(s.len(), 5 + 16);
        assert!(s.starts_with("sess_"));
    }
}
