//! The container of a sandbox, as data: a pure function of (config, sandbox spec, image facts),
//! so the exact settings are unit-tested without a daemon.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use agentfense_runtime::{DEFAULT_PATH, NetworkMode, ResourceLimits, SandboxSpec};
use bollard::models::{
    ContainerCreateBody, HostConfig, Mount, MountBindOptions, MountBindOptionsPropagationEnum,
    MountType,
};

use crate::config::DockerConfig;

/// Where the workspace appears inside the container.
pub const WORKSPACE: &str = "/workspace";
/// `HOME` inside the container (a tmpfs owned by the sandbox user).
pub const HOME: &str = "/tmp/home";
/// A root-owned tmpfs (mode 0755) for the execute-only copies of session shells: the sandbox
/// user can run them, not read, replace or add anything there.
pub const RUN_DIR: &str = "/run/agentfense";
/// The user when neither the config nor the image names a non-root one.
pub const DEFAULT_USER: &str = "1000:1000";
/// `USER` for numeric users (the name the base image and the bwrap runtime give uid 1000).
pub const DEFAULT_USER_NAME: &str = "sandbox";

/// The user a sandbox's commands run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxUser {
    /// Docker's `User` value (`uid:gid`, `uid` or a name).
    pub spec: String,
    /// `USER` in the environment.
    pub name: String,
    /// Numeric uid/gid when known (the `HOME` tmpfs is owned by them).
    pub ids: Option<(u32, u32)>,
}

/// Picks the user: the configured one, else the image's when it is not root, else
/// [`DEFAULT_USER`]. Never root: a configured or image user that is root falls back too.
pub fn resolve_user(configured: Option<&str>, image_user: Option<&str>) -> SandboxUser {
    let is_root = |u: &str| {
        let name = u.split(':').next().unwrap_or(u);
        name.is_empty() || name == "root" || name == "0"
    };
    let spec = [configured, image_user]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|u| !is_root(u))
        .unwrap_or(DEFAULT_USER)
        .to_owned();
    let mut parts = spec.splitn(2, ':');
    let user = parts.next().unwrap_or_default();
    let group = parts.next();
    let uid = user.parse::<u32>().ok();
    let gid = match group {
        Some(g) => g.parse::<u32>().ok(),
        None => uid,
    };
    SandboxUser {
        name: if uid.is_some() {
            DEFAULT_USER_NAME.to_owned()
        } else {
            user.to_owned()
        },
        ids: uid.zip(gid),
        spec,
    }
}

/// The container's base environment: the image's own variables (they are part of the image's
/// contract, e.g. a Python image's `PATH`), then `HOME`, `USER`, `LANG`, `TERM` from us, and
/// `PATH` only when the image sets none. Never the server's environment.
pub fn base_env(image_env: &[String], user: &SandboxUser) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = image_env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env.insert("HOME".into(), HOME.into());
    env.insert("USER".into(), user.name.clone());
    env.insert("LANG".into(), "C.UTF-8".into());
    env.insert("TERM".into(), "dumb".into());
    env
}

/// `base` plus `extra` (request values win), as docker's `KEY=value` list; rejects names with
/// `=` or NUL and values with NUL.
pub fn merge_env(
    base: &BTreeMap<String, String>,
    extra: &BTreeMap<String, String>,
    fixed: &[(&str, &str)],
) -> Result<Vec<String>, String> {
    let mut env = base.clone();
    for (k, v) in fixed {
        env.insert((*k).into(), (*v).into());
    }
    for (k, v) in extra {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(format!("invalid environment variable {k:?}"));
        }
        env.insert(k.clone(), v.clone());
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// Labels of every container we create.
pub fn labels(instance: &str, sandbox_id: &str) -> HashMap<String, String> {
    HashMap::from([
        (crate::LABEL_MANAGED.to_owned(), "true".to_owned()),
        (crate::LABEL_INSTANCE.to_owned(), instance.to_owned()),
        (crate::LABEL_SANDBOX_ID.to_owned(), sandbox_id.to_owned()),
    ])
}

/// Docker's network mode for a sandbox (callers have already refused networking when the
/// server does not enable it).
pub fn network_mode(cfg: &DockerConfig, network: NetworkMode) -> String {
    match network {
        NetworkMode::Host if cfg.enable_networking && !cfg.network_mode.is_empty() => {
            cfg.network_mode.clone()
        }
        _ => "none".to_owned(),
    }
}

/// The cgroup settings of [`ResourceLimits`] (zero or `None` = unlimited): memory with an equal
/// memory+swap limit (no swap escape), the CPU quota over a 100 ms period, shares, pids.
pub fn apply_limits(h: &mut HostConfig, l: &ResourceLimits) {
    let set = |v: Option<u64>| v.filter(|v| *v > 0).map(|v| v.min(i64::MAX as u64) as i64);
    if let Some(m) = set(l.memory_bytes) {
        h.memory = Some(m);
        h.memory_swap = Some(m);
    }
    if let Some(q) = set(l.cpu_quota_us) {
        h.cpu_period = Some(100_000);
        h.cpu_quota = Some(q);
    }
    h.cpu_shares = set(l.cpu_shares);
    h.pids_limit = set(l.pids_limit);
}

/// Everything `create container` needs for one sandbox.
#[derive(Debug, Clone)]
pub struct ContainerPlan<'a> {
    /// Runtime configuration.
    pub cfg: &'a DockerConfig,
    /// The sandbox.
    pub sandbox_id: &'a str,
    /// Its spec.
    pub spec: &'a SandboxSpec,
    /// Resolved image reference.
    pub image: &'a str,
    /// Resolved user.
    pub user: &'a SandboxUser,
    /// Base environment ([`base_env`]).
    pub env: &'a BTreeMap<String, String>,
    /// Whether the workspace's host mount propagates (shared or slave), so `rslave` applies.
    pub propagates: bool,
}

/// The container's seccomp profile: the bubblewrap runtime's filter
/// (`agentfense_runtime::hardening`) in Docker's format, so both runtimes answer the same calls
/// the same way: the allow-list (after Docker's own default profile) is allowed, `clone` only
/// without namespace flags, `personality` and `socket` with the same argument checks; the
/// deny-list (namespaces, mounts, `ptrace`, io_uring, the keyring, bpf, modules, ...; `clone`
/// with a namespace flag) answers `EPERM`; `clone3` and anything unlisted answer `ENOSYS` (libc
/// falls back). Only the native architecture is listed, so libseccomp kills calls through the
/// 32-bit (x86, x32) entry points.
pub fn seccomp_profile() -> String {
    use agentfense_runtime::hardening::{
        ALLOWED_ARCH_SYSCALLS, ALLOWED_PERSONALITIES, ALLOWED_SYSCALLS, CLONE_NS_FLAGS,
        DENIED_SOCKET_FAMILIES, DENIED_SYSCALLS,
    };
    let architectures: &[&str] = match std::env::consts::ARCH {
        "x86_64" => &["SCMP_ARCH_X86_64"],
        "aarch64" => &["SCMP_ARCH_AARCH64"],
        _ => &[],
    };
    let allowed: Vec<&str> = ALLOWED_SYSCALLS
        .iter()
        .chain(ALLOWED_ARCH_SYSCALLS)
        .map(|(name, _)| *name)
        .collect();
    let denied: Vec<&str> = DENIED_SYSCALLS.iter().map(|(name, _)| *name).collect();
    let ns_mask = CLONE_NS_FLAGS.iter().fold(0u64, |m, f| m | *f as u64);
    let mut syscalls = vec![
        serde_json::json!({"names": allowed, "action": "SCMP_ACT_ALLOW"}),
        serde_json::json!({"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM}),
        serde_json::json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS}),
        // `(flags & mask) == 0`: `value` is the mask, `valueTwo` the expected result.
        serde_json::json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": ns_mask, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
        }),
    ];
    // `socket` outside the denied families (ascending): below the first, each value between
    // two, above the last. libseccomp takes one comparison per argument and rule, so "neither
    // this nor that" cannot be one rule.
    let rule = |op: &str, value: u64| {
        serde_json::json!({
            "names": ["socket"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": value, "op": op}],
        })
    };
    if let (Some(first), Some(last)) = (
        DENIED_SOCKET_FAMILIES.first(),
        DENIED_SOCKET_FAMILIES.last(),
    ) {
        syscalls.push(rule("SCMP_CMP_LT", *first));
        for pair in DENIED_SOCKET_FAMILIES.windows(2) {
            syscalls.extend((pair[0] + 1..pair[1]).map(|v| rule("SCMP_CMP_EQ", v)));
        }
        syscalls.push(rule("SCMP_CMP_GT", *last));
    }
    for p in ALLOWED_PERSONALITIES {
        syscalls.push(serde_json::json!({
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": p, "op": "SCMP_CMP_EQ"}],
        }));
    }
    for bit in CLONE_NS_FLAGS {
        syscalls.push(serde_json::json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
            "args": [{"index": 0, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
    }
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::ENOSYS,
        "architectures": architectures,
        "syscalls": syscalls,
    })
    .to_string()
}

/// The container's configuration.
pub fn container_body(p: &ContainerPlan<'_>) -> ContainerCreateBody {
    let network = network_mode(p.cfg, p.spec.network);
    let home_opts = match p.user.ids {
        Some((uid, gid)) => format!("rw,nosuid,nodev,size=64m,uid={uid},gid={gid},mode=0700"),
        None => "rw,nosuid,nodev,size=64m,mode=1777".to_owned(),
    };
    let mut host = HostConfig {
        mounts: Some(vec![Mount {
            target: Some(WORKSPACE.into()),
            source: Some(p.spec.workspace.to_string_lossy().into_owned()),
            typ: Some(MountType::BIND),
            read_only: Some(false),
            bind_options: p.propagates.then(|| MountBindOptions {
                propagation: Some(MountBindOptionsPropagationEnum::RSLAVE),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        tmpfs: Some(HashMap::from([
            (
                "/tmp".to_owned(),
                format!(
                    "rw,nosuid,nodev,size={},mode=1777",
                    p.spec.tmp_size.unwrap_or(p.cfg.tmp_size)
                ),
            ),
            (HOME.to_owned(), home_opts),
            (
                RUN_DIR.to_owned(),
                "rw,nosuid,nodev,exec,size=64m,mode=0755".to_owned(),
            ),
        ])),
        // Without a network the only resolver is the sandbox's own (the server's DNS server
        // in the container's namespace when it has an egress policy; else nothing listens
        // and lookups fail at once), never the host's.
        dns: (network == "none").then(|| vec!["127.0.0.1".into()]),
        network_mode: Some(network),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec![
            "no-new-privileges".into(),
            format!("seccomp={}", seccomp_profile()),
        ]),
        readonly_rootfs: Some(p.cfg.read_only_rootfs),
        // docker-init (tini) as PID 1 reaps the zombies our commands leave behind.
        init: Some(true),
        privileged: Some(false),
        ..Default::default()
    };
    apply_limits(&mut host, &p.spec.limits);
    ContainerCreateBody {
        image: Some(p.image.to_owned()),
        hostname: Some(p.cfg.hostname.clone()),
        user: Some(p.user.spec.clone()),
        env: Some(p.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        // Explicit entrypoint: an image's own entrypoint script never runs.
        entrypoint: Some(vec!["sleep".into()]),
        cmd: Some(vec!["infinity".into()]),
        working_dir: Some(WORKSPACE.into()),
        labels: Some(labels(&p.cfg.instance, p.sandbox_id)),
        attach_stdin: Some(false),
        attach_stdout: Some(false),
        attach_stderr: Some(false),
        tty: Some(false),
        open_stdin: Some(false),
        host_config: Some(host),
        ..Default::default()
    }
}

/// Whether the mount holding `path` propagates mount events (`shared:` or `master:` in
/// `/proc/self/mountinfo`). Docker refuses `rslave` on a private mount, and on one it would
/// change nothing.
pub fn mount_propagates(mountinfo: &str, path: &Path) -> bool {
    let mut best: Option<(usize, bool)> = None;
    for line in mountinfo.lines() {
        let mut f = line.split(' ');
        let (Some(_), Some(_), Some(_), Some(_), Some(mnt)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let mnt = unescape_octal(mnt);
        if !path.starts_with(&mnt) {
            continue;
        }
        let optional: Vec<&str> = f.skip(1).take_while(|x| *x != "-").collect();
        let propagates = optional
            .iter()
            .any(|o| o.starts_with("shared:") || o.starts_with("master:"));
        let len = mnt.len();
        // Later lines win on equal length (mounts stacked on the same point).
        if best.is_none_or(|(l, _)| len >= l) {
            best = Some((len, propagates));
        }
    }
    best.is_some_and(|(_, p)| p)
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn user_is_never_root() {
        let u = resolve_user(None, None);
        assert_eq!(
            u,
            SandboxUser {
                spec: "1000:1000".into(),
                name: "sandbox".into(),
                ids: Some((1000, 1000))
            }
        );
        assert_eq!(resolve_user(None, Some("root")).spec, "1000:1000");
        assert_eq!(resolve_user(None, Some("0:0")).spec, "1000:1000");
        assert_eq!(resolve_user(Some("root"), Some("")).spec, "1000:1000");
        let u = resolve_user(None, Some("node"));
        assert_eq!(
            (u.spec.as_str(), u.name.as_str(), u.ids),
            ("node", "node", None)
        );
        let u = resolve_user(Some("2000"), Some("node"));
        assert_eq!((u.spec.as_str(), u.ids), ("2000", Some((2000, 2000))));
    }

    #[test]
    fn env_keeps_image_path_and_sets_ours() {
        let user = resolve_user(None, None);
        let env = base_env(
            &[
                "PATH=/opt/py/bin:/usr/bin".into(),
                "HOME=/root".into(),
                "X=1".into(),
            ],
            &user,
        );
        let mut extra = BTreeMap::new();
        extra.insert("FOO".to_owned(), "bar".to_owned());
        assert_eq!(
            merge_env(&env, &extra, &[]).unwrap(),
            vec![
                "FOO=bar",
                "HOME=/tmp/home",
                "LANG=C.UTF-8",
                "PATH=/opt/py/bin:/usr/bin",
                "TERM=dumb",
                "USER=sandbox",
                "X=1"
            ]
        );
        assert_eq!(
            base_env(&[], &user).get("PATH").map(String::as_str),
            Some(DEFAULT_PATH)
        );
        extra.insert("A=B".into(), "x".into());
        assert!(merge_env(&env, &extra, &[]).is_err());
    }

    #[test]
    fn container_is_locked_down() {
        let cfg = DockerConfig::default();
        let spec = SandboxSpec {
            image: None,
            workspace: "/run/af/mnt/sb1".into(),
            limits: ResourceLimits {
                memory_bytes: Some(64 << 20),
                cpu_quota_us: Some(50_000),
                cpu_shares: Some(512),
                pids_limit: Some(50),
            },
            network: NetworkMode::None,
            tmp_size: None,
            workspace_path: None,
            home: None,
        };
        let user = resolve_user(None, None);
        let env = base_env(&[], &user);
        let body = container_body(&ContainerPlan {
            cfg: &cfg,
            sandbox_id: "sb1",
            spec: &spec,
            image: "img",
            user: &user,
            env: &env,
            propagates: true,
        });
        let h = body.host_config.clone().unwrap();
        assert_eq!(body.user.as_deref(), Some("1000:1000"));
        assert_eq!(body.working_dir.as_deref(), Some("/workspace"));
        assert_eq!(
            body.labels
                .unwrap()
                .get("agentfense.sandbox-id")
                .map(String::as_str),
            Some("sb1")
        );
        assert_eq!(h.network_mode.as_deref(), Some("none"));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]));
        let opts = h.security_opt.clone().unwrap();
        assert_eq!(opts[0], "no-new-privileges");
        let profile: serde_json::Value =
            serde_json::from_str(opts[1].strip_prefix("seccomp=").unwrap()).unwrap();
        assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(profile["defaultErrnoRet"], libc::ENOSYS);
        let allowed = &profile["syscalls"][0];
        assert_eq!(allowed["action"], "SCMP_ACT_ALLOW");
        for name in ["read", "openat", "execve", "futex"] {
            assert!(
                allowed["names"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n == name),
                "{name} must be allowed"
            );
        }
        let denied = &profile["syscalls"][1];
        assert_eq!(denied["errnoRet"], libc::EPERM);
        for name in [
            "ptrace",
            "io_uring_setup",
            "mount",
            "unshare",
            "bpf",
            "keyctl",
        ] {
            assert!(
                denied["names"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n == name),
                "{name} must be denied"
            );
        }
        assert_eq!(profile["syscalls"][2]["names"][0], "clone3");
        assert_eq!(profile["syscalls"][2]["errnoRet"], libc::ENOSYS);
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(
            (
                h.memory,
                h.memory_swap,
                h.cpu_period,
                h.cpu_quota,
                h.cpu_shares,
                h.pids_limit
            ),
            (
                Some(64 << 20),
                Some(64 << 20),
                Some(100_000),
                Some(50_000),
                Some(512),
                Some(50)
            )
        );
        let m = &h.mounts.unwrap()[0];
        assert_eq!(m.source.as_deref(), Some("/run/af/mnt/sb1"));
        assert_eq!(
            m.bind_options.as_ref().and_then(|b| b.propagation),
            Some(MountBindOptionsPropagationEnum::RSLAVE)
        );
        let tmpfs = h.tmpfs.unwrap();
        assert_eq!(
            tmpfs.get("/tmp/home").map(String::as_str),
            Some("rw,nosuid,nodev,size=64m,uid=1000,gid=1000,mode=0700")
        );
    }

    #[test]
    fn networking_needs_the_server_switch() {
        let mut cfg = DockerConfig {
            network_mode: "bridge".into(),
            ..Default::default()
        };
        assert_eq!(network_mode(&cfg, NetworkMode::Host), "none");
        cfg.enable_networking = true;
        assert_eq!(network_mode(&cfg, NetworkMode::Host), "bridge");
        assert_eq!(network_mode(&cfg, NetworkMode::None), "none");
    }

    #[test]
    fn propagation_from_mountinfo() {
        let mi = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 22 0:40 / /run rw shared:5 - tmpfs tmpfs rw
31 30 0:41 / /run/af\\040x rw master:7 - fuse fuse rw
";
        assert!(!mount_propagates(mi, Path::new("/tmp/ws")));
        assert!(mount_propagates(mi, Path::new("/run/mnt/sb1")));
        assert!(mount_propagates(mi, Path::new("/run/af x/sb1")));
    }
}
