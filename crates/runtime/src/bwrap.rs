//! The bwrap invocation as data: a pure function of the options and the probed host layout,
//! plus the generated minimal `/etc`.
//!
//! Mount order (later mounts sit on top of earlier ones):
//! 1. read-only system: `/usr`, then `/bin`, `/sbin`, `/lib*` (symlinks replicated as symlinks,
//!    directories bound read-only, missing ones skipped);
//! 2. the generated read-only `/etc`, then read-only re-binds of the few host files it needs
//!    (`ld.so.cache`, certificates, alternatives...) onto placeholders (`--ro-bind-try`: absent
//!    host files leave the empty placeholder);
//! 3. kernel filesystems: fresh `/proc`, minimal `/dev` (no host `/sys` at all: it lists host
//!    interfaces);
//! 4. private writable tmpfs: `/tmp` (1777, size-limited), `/dev/shm`, `/run` (root only, holds
//!    the init binary and session FIFOs);
//! 5. the writable workspace bind at `/workspace`, which is also the working directory.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use crate::types::NetworkMode;

/// Where the init binary appears inside the sandbox.
pub const SANDBOX_INIT: &str = "/run/agentfense/init";
/// Directory (root-owned tmpfs) of the init binary inside the sandbox.
pub const SANDBOX_RUN_DIR: &str = "/run/agentfense";
/// Root-owned directory (mode 0711) of the session call files (see `crate::init`).
pub const CHANNEL_DIR: &str = "/run/agentfense/ch";
/// The device nodes commands may write to (Landlock): the host's own nodes, bound by
/// `bwrap --dev`, so never the whole of `/dev`.
pub const WRITABLE_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
    "/dev/shm",
];
/// The workspace mount point.
pub const WORKSPACE: &str = "/workspace";

/// Top-level host paths that hold programs and libraries.
pub const SYSTEM_DIRS: &[&str] = &["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

/// Host `/etc` entries bound read-only over placeholders of the generated `/etc`:
/// `(path relative to /etc, is_dir)`.
pub const HOST_ETC_ENTRIES: &[(&str, bool)] = &[
    ("ld.so.cache", false),
    ("alternatives", true),
    ("ssl/certs", true),
    ("ssl/openssl.cnf", false),
    ("ca-certificates", true),
    ("localtime", false),
    ("protocols", false),
    ("services", false),
    ("mime.types", false),
];

/// What a top-level system path is on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEntry {
    /// A real directory: bind it read-only.
    Dir,
    /// A symlink (merged-/usr hosts): recreate it with the same target.
    Symlink(PathBuf),
    /// Absent: skip.
    Missing,
}

/// The probed host layout the argv depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLayout {
    /// `(path, kind)` for each of [`SYSTEM_DIRS`].
    pub system: Vec<(String, HostEntry)>,
}

impl HostLayout {
    /// Looks at the real host.
    pub fn probe() -> Self {
        let system = SYSTEM_DIRS
            .iter()
            .map(|p| {
                let kind = match std::fs::symlink_metadata(p) {
                    Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(p) {
                        Ok(t) => HostEntry::Symlink(t),
                        Err(_) => HostEntry::Missing,
                    },
                    Ok(m) if m.is_dir() => HostEntry::Dir,
                    _ => HostEntry::Missing,
                };
                ((*p).to_owned(), kind)
            })
            .collect();
        HostLayout { system }
    }
}

/// Inputs of [`bwrap_args`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BwrapOptions {
    /// Host path of the `agentfense-init` binary.
    pub init_path: PathBuf,
    /// Host directory bound at `/workspace`.
    pub workspace: PathBuf,
    /// Where the workspace also appears (checked by [`crate::check_workspace_path`]); the
    /// sandbox starts there.
    pub workspace_path: Option<String>,
    /// Host directory bound at `home_path` (a persistent `$HOME`).
    pub home: Option<PathBuf>,
    /// The sandbox user's `$HOME`.
    pub home_path: String,
    /// Host directory holding the generated `/etc` (see [`shared_etc`]).
    pub etc_dir: PathBuf,
    /// Network mode.
    pub network: NetworkMode,
    /// Size of the `/tmp` tmpfs in bytes.
    pub tmp_size: u64,
    /// Size of the `/dev/shm` tmpfs in bytes.
    pub shm_size: u64,
    /// Hostname inside the sandbox.
    pub hostname: String,
    /// Number of the inherited control-socket fd, passed to the init as its argument.
    pub control_fd: i32,
    /// Run in a user namespace of its own (see [`crate::userns`]). bwrap then runs as an
    /// unprivileged host uid, which cannot reach the server's private directories: the paths
    /// above must be ones it can resolve ([`crate::userns::Staging`]).
    pub userns: Option<UsernsFds>,
}

/// Inherited descriptors of the user-namespace handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsernsFds {
    /// bwrap waits on it until the server has written the namespace's id maps.
    pub block_fd: i32,
    /// bwrap writes the namespace's process id there (JSON).
    pub info_fd: i32,
}

/// Capabilities bwrap leaves the init, inside its own user namespace only, when it runs in
/// one: what [`crate::init`] needs to prepare `$HOME` (CHOWN) and to shrink its bounding set
/// (SETPCAP) before keeping [`crate::init::INIT_CAPABILITIES`].
pub const USERNS_INIT_CAPS: &[&str] = &[
    "CAP_KILL",
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_CHOWN",
    "CAP_SETPCAP",
];

/// Builds bwrap's arguments (without the bwrap binary itself). Pure.
pub fn bwrap_args(opts: &BwrapOptions, host: &HostLayout) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
        for i in items {
            a.push(i.as_ref().to_owned());
        }
    };
    // Lifetime and namespaces. With a user namespace, root inside is an unprivileged host uid
    // (bwrap already runs as it) and the server writes the id maps while bwrap waits. Without
    // one, bwrap runs as real root and the init drops to an unprivileged uid itself.
    push(&[&"--die-with-parent", &"--new-session", &"--as-pid-1"]);
    let fd = |n: i32| n.to_string();
    if let Some(u) = &opts.userns {
        push(&[&"--unshare-user", &"--uid", &"0", &"--gid", &"0"]);
        push(&[
            &"--userns-block-fd",
            &fd(u.block_fd),
            &"--info-fd",
            &fd(u.info_fd),
        ]);
        for cap in USERNS_INIT_CAPS {
            push(&[&"--cap-add", cap]);
        }
    }
    push(&[
        &"--unshare-pid",
        &"--unshare-ipc",
        &"--unshare-uts",
        &"--unshare-cgroup",
    ]);
    if opts.network == NetworkMode::None {
        push(&[&"--unshare-net"]);
    }
    push(&[&"--hostname", &opts.hostname]);
    // 1. Read-only system.
    push(&[&"--ro-bind", &"/usr", &"/usr"]);
    for (path, kind) in &host.system {
        match kind {
            HostEntry::Dir => push(&[&"--ro-bind", path, path]),
            HostEntry::Symlink(target) => push(&[&"--symlink", target, path]),
            HostEntry::Missing => {}
        }
    }
    // 2. Generated /etc, then host files over its placeholders.
    push(&[&"--ro-bind", &opts.etc_dir, &"/etc"]);
    for (rel, _) in HOST_ETC_ENTRIES {
        let p = format!("/etc/{rel}");
        push(&[&"--ro-bind-try", &p, &p]);
    }
    if opts.network == NetworkMode::Host {
        push(&[&"--ro-bind-try", &"/etc/resolv.conf", &"/etc/resolv.conf"]);
    }
    // 3. Kernel filesystems.
    push(&[&"--proc", &"/proc", &"--dev", &"/dev"]);
    // 4. Private writable tmpfs.
    let size = opts.tmp_size.to_string();
    push(&[&"--perms", &"1777", &"--size", &size, &"--tmpfs", &"/tmp"]);
    if let Some(home) = &opts.home {
        push(&[&"--bind", home, &opts.home_path]);
    }
    let shm = opts.shm_size.to_string();
    push(&[
        &"--perms",
        &"1777",
        &"--size",
        &shm,
        &"--tmpfs",
        &"/dev/shm",
    ]);
    push(&[
        &"--perms",
        &"0755",
        &"--size",
        &"16777216",
        &"--tmpfs",
        &"/run",
    ]);
    push(&[&"--ro-bind", &opts.init_path, &SANDBOX_INIT]);
    // 5. The workspace.
    push(&[&"--bind", &opts.workspace, &WORKSPACE]);
    let start = match &opts.workspace_path {
        Some(p) => {
            // bwrap would make the missing parents 0700 (root's inside): the sandbox user must
            // traverse them. `/tmp` is a mount of its own and keeps its mode.
            let parents: Vec<&str> = std::path::Path::new(p)
                .ancestors()
                .skip(1)
                .filter_map(|a| a.to_str())
                .filter(|a| *a != "/" && *a != "/tmp")
                .collect();
            for a in parents.iter().rev() {
                push(&[&"--perms", &"0755", &"--dir", a]);
            }
            push(&[&"--bind", &opts.workspace, p]);
            p.as_str()
        }
        None => WORKSPACE,
    };
    push(&[&"--chdir", &start]);
    push(&[&"--", &SANDBOX_INIT, &fd(opts.control_fd)]);
    a
}

/// The sandbox user as seen inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxUser {
    /// Login name.
    pub name: String,
    /// Uid.
    pub uid: u32,
    /// Gid.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// Contents of the generated `/etc` files: `(relative path, contents)`.
pub fn etc_files(user: &SandboxUser, hostname: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "passwd",
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\n\
                 {n}:x:{u}:{g}:{n}:{h}:/bin/sh\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
                n = user.name,
                u = user.uid,
                g = user.gid,
                h = user.home
            ),
        ),
        (
            "group",
            format!(
                "root:x:0:\n{n}:x:{g}:\nnogroup:x:65534:\n",
                n = user.name,
                g = user.gid
            ),
        ),
        (
            "hosts",
            format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n"),
        ),
        ("hostname", format!("{hostname}\n")),
        // The sandbox's own resolver: with an egress policy the server's DNS server listens
        // there (inside the sandbox's network namespace) and answers only allowed names;
        // without one nothing listens and lookups fail at once. The host network mode binds
        // the host's file over this one.
        (
            "resolv.conf",
            "nameserver 127.0.0.1\noptions timeout:2 attempts:2\n".to_owned(),
        ),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n\
             networks: files\nprotocols: files\nservices: files\n"
                .to_owned(),
        ),
    ]
}

/// Writes the generated `/etc` into `dir` (created), with empty placeholders for
/// [`HOST_ETC_ENTRIES`].
pub fn write_etc(
    dir: &Path,
    user: &SandboxUser,
    hostname: &str,
) -> Result<(), (PathBuf, io::Error)> {
    use std::os::unix::fs::PermissionsExt;
    let ctx = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    std::fs::create_dir_all(dir).map_err(ctx(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(ctx(dir))?;
    for (rel, contents) in etc_files(user, hostname) {
        let p = dir.join(rel);
        std::fs::write(&p, contents).map_err(ctx(&p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).map_err(ctx(&p))?;
    }
    for (rel, is_dir) in etc_placeholders() {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(ctx(parent))?;
        }
        if is_dir {
            std::fs::create_dir_all(&p).map_err(ctx(&p))?;
        } else {
            std::fs::write(&p, b"").map_err(ctx(&p))?;
        }
    }
    Ok(())
}

/// Name prefix of the shared generated `/etc` directories in a state directory (see
/// [`shared_etc`]). Sandbox ids cannot start with `.`, so these never clash with them.
pub const SHARED_ETC_PREFIX: &str = ".etc-";

/// FNV-1a (64 bits) of `parts`, each preceded by its length (so that the split between parts
/// is part of the digest): a digest that stays the same across builds and Rust versions.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    // FNV-1a is a byte stream: hashing the concatenation is hashing the parts in turn.
    let mut bytes = Vec::new();
    for part in parts {
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
        bytes.extend_from_slice(part);
    }
    crate::stable_hash(&bytes)
}

/// Bump when [`write_etc`] changes how it writes (modes, layout) without changing the
/// contents or names that [`shared_etc`] digests.
const ETC_LAYOUT_VERSION: &[u8] = b"etc-layout-1";

/// The empty files and directories [`write_etc`] creates for host entries bound over them.
fn etc_placeholders() -> impl Iterator<Item = (&'static str, bool)> {
    HOST_ETC_ENTRIES.iter().copied()
}

/// The generated `/etc` for `user` and `hostname` in `state_dir`, written on first use and then
/// shared (read-only) by every sandbox: its contents depend on nothing else, and writing a
/// fresh copy for each start cost a score of file creations and deletions per sandbox.
///
/// The directory is named after a digest of its contents and is never modified once in place
/// (it is written under a temporary name and renamed), so concurrent starts, other runtimes
/// sharing `state_dir` and crashes mid-write are all harmless.
pub fn shared_etc(
    state_dir: &Path,
    user: &SandboxUser,
    hostname: &str,
) -> Result<PathBuf, (PathBuf, io::Error)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

    let files = etc_files(user, hostname);
    // Everything `write_etc` decides, so a binary that writes it differently never reuses
    // an older directory: its layout version, the files and the placeholders.
    let mut parts: Vec<&[u8]> = vec![ETC_LAYOUT_VERSION];
    for (rel, contents) in &files {
        parts.push(rel.as_bytes());
        parts.push(contents.as_bytes());
    }
    for (rel, is_dir) in etc_placeholders() {
        parts.push(rel.as_bytes());
        parts.push(if is_dir { b"d" } else { b"f" });
    }
    let dir = state_dir.join(format!("{SHARED_ETC_PREFIX}{:016x}", fnv1a(&parts)));
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(state_dir).map_err(|e| (state_dir.to_path_buf(), e))?;
    let tmp = state_dir.join(format!(
        ".tmp-etc-{}-{}",
        std::process::id(),
        NEXT_TMP.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = write_etc(&tmp, user, hostname)
        .and_then(|()| std::fs::rename(&tmp, &dir).map_err(|e| (dir.clone(), e)));
    match written {
        Ok(()) => Ok(dir),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another start (or process) put the same directory in place first.
            if dir.is_dir() { Ok(dir) } else { Err(e) }
        }
    }
}

/// A host directory that says nothing about the host: what sandboxes bind from it (the init,
/// the generated `/etc`) shows up in their `/proc/self/mountinfo` under its path (a bind
/// mount's root is its path on the source filesystem), so neither the data directory, the
/// project's folder name nor where the binary is installed may appear there.
pub const SHARED_DIR: &str = "/run/agentfense-shared";

/// The init binary as sandboxes should bind it: a hard link (or, across filesystems, a copy)
/// named after its identity in `shared_dir`, made on first use. `init` itself when the shared
/// directory cannot be written (not root), with a debug log.
pub fn shared_init(shared_dir: &Path, init: &Path) -> PathBuf {
    match place_init(shared_dir, init) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, dir = %shared_dir.display(), "init bound from its own path");
            init.to_path_buf()
        }
    }
}

/// Links older than this to another binary are removed when a new one is made (a server of
/// an older build may still be running; its next start makes its link again).
const STALE_INIT: std::time::Duration = std::time::Duration::from_secs(3600);

fn place_init(shared_dir: &Path, init: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::metadata(init)?;
    let key = fnv1a(&[
        &m.dev().to_le_bytes(),
        &m.ino().to_le_bytes(),
        &m.size().to_le_bytes(),
        &m.mtime().to_le_bytes(),
        &m.mtime_nsec().to_le_bytes(),
    ]);
    let path = shared_dir.join(format!("init-{key:016x}"));
    if std::fs::metadata(&path).is_ok_and(|p| p.len() == m.len()) {
        return Ok(path);
    }
    std::fs::create_dir_all(shared_dir)?;
    std::fs::set_permissions(shared_dir, std::fs::Permissions::from_mode(0o755))?;
    let tmp = shared_dir.join(format!(".tmp-init-{}-{key:016x}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(init, &tmp).is_err() {
        std::fs::copy(init, &tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))?;
    }
    std::fs::rename(&tmp, &path)?;
    if let Ok(entries) = std::fs::read_dir(shared_dir) {
        for e in entries.flatten() {
            let stale = e.path() != path
                && e.file_name().as_encoded_bytes().starts_with(b"init-")
                && e.metadata().is_ok_and(|m| {
                    let changed = std::time::UNIX_EPOCH
                        + std::time::Duration::from_secs(u64::try_from(m.ctime()).unwrap_or(0));
                    changed.elapsed().is_ok_and(|age| age > STALE_INIT)
                });
            if stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn opts(network: NetworkMode) -> BwrapOptions {
        BwrapOptions {
            init_path: "/opt/af/agentfense-init".into(),
            workspace: "/mnt/ws".into(),
            workspace_path: None,
            home: None,
            home_path: "/tmp/home".into(),
            etc_dir: "/var/lib/af/sb1/etc".into(),
            network,
            tmp_size: 1024,
            shm_size: 1024,
            hostname: "sandbox".into(),
            control_fd: 3,
            userns: None,
        }
    }

    #[test]
    fn user_namespace_waits_for_the_maps_and_keeps_few_capabilities() {
        let mut o = opts(NetworkMode::None);
        o.userns = Some(UsernsFds {
            block_fd: 4,
            info_fd: 5,
        });
        let got = strs(bwrap_args(&o, &merged_usr())).join(" ");
        for want in [
            "--unshare-user --uid 0 --gid 0 --userns-block-fd 4 --info-fd 5",
            "--cap-add CAP_KILL --cap-add CAP_SETUID --cap-add CAP_SETGID --cap-add CAP_CHOWN \
             --cap-add CAP_SETPCAP",
            "--bind /mnt/ws /workspace --chdir /workspace -- /run/agentfense/init 3",
        ] {
            assert!(got.contains(want), "{want:?} missing from {got}");
        }
        // Without, none of it.
        let plain = strs(bwrap_args(&opts(NetworkMode::None), &merged_usr())).join(" ");
        assert!(!plain.contains("--unshare-user") && !plain.contains("--cap-add"));
    }

    fn merged_usr() -> HostLayout {
        HostLayout {
            system: vec![
                ("/bin".into(), HostEntry::Symlink("usr/bin".into())),
                ("/sbin".into(), HostEntry::Symlink("usr/sbin".into())),
                ("/lib".into(), HostEntry::Symlink("usr/lib".into())),
                ("/lib32".into(), HostEntry::Missing),
                ("/lib64".into(), HostEntry::Dir),
                ("/libx32".into(), HostEntry::Missing),
            ],
        }
    }

    fn strs(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn exact_argv_without_network() {
        let got = strs(bwrap_args(&opts(NetworkMode::None), &merged_usr()));
        let want: Vec<&str> = vec![
            "--die-with-parent",
            "--new-session",
            "--as-pid-1",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup",
            "--unshare-net",
            "--hostname",
            "sandbox",
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/bin",
            "/bin",
            "--symlink",
            "usr/sbin",
            "/sbin",
            "--symlink",
            "usr/lib",
            "/lib",
            "--ro-bind",
            "/lib64",
            "/lib64",
            "--ro-bind",
            "/var/lib/af/sb1/etc",
            "/etc",
            "--ro-bind-try",
            "/etc/ld.so.cache",
            "/etc/ld.so.cache",
            "--ro-bind-try",
            "/etc/alternatives",
            "/etc/alternatives",
            "--ro-bind-try",
            "/etc/ssl/certs",
            "/etc/ssl/certs",
            "--ro-bind-try",
            "/etc/ssl/openssl.cnf",
            "/etc/ssl/openssl.cnf",
            "--ro-bind-try",
            "/etc/ca-certificates",
            "/etc/ca-certificates",
            "--ro-bind-try",
            "/etc/localtime",
            "/etc/localtime",
            "--ro-bind-try",
            "/etc/protocols",
            "/etc/protocols",
            "--ro-bind-try",
            "/etc/services",
            "/etc/services",
            "--ro-bind-try",
            "/etc/mime.types",
            "/etc/mime.types",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--perms",
            "1777",
            "--size",
            "1024",
            "--tmpfs",
            "/tmp",
            "--perms",
            "1777",
            "--size",
            "1024",
            "--tmpfs",
            "/dev/shm",
            "--perms",
            "0755",
            "--size",
            "16777216",
            "--tmpfs",
            "/run",
            "--ro-bind",
            "/opt/af/agentfense-init",
            "/run/agentfense/init",
            "--bind",
            "/mnt/ws",
            "/workspace",
            "--chdir",
            "/workspace",
            "--",
            "/run/agentfense/init",
            "3",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn the_workspace_path_gets_traversable_parents_and_the_start() {
        let mut o = opts(NetworkMode::None);
        o.workspace_path = Some("/home/me/proj".into());
        o.home = Some("/srv/home".into());
        let got = strs(bwrap_args(&o, &merged_usr())).join(" ");
        assert!(
            got.contains(
                "--bind /mnt/ws /workspace --perms 0755 --dir /home --perms 0755 --dir /home/me \
                 --bind /mnt/ws /home/me/proj --chdir /home/me/proj --"
            ),
            "{got}"
        );
        assert!(
            got.contains("--tmpfs /tmp --bind /srv/home /tmp/home"),
            "{got}"
        );
        o.workspace_path = Some("/tmp/p".into());
        let got = strs(bwrap_args(&o, &merged_usr())).join(" ");
        assert!(
            got.contains("--bind /mnt/ws /workspace --bind /mnt/ws /tmp/p --chdir /tmp/p --"),
            "{got}"
        );
    }

    #[test]
    fn host_network_keeps_the_namespace_and_binds_resolv_conf() {
        let got = strs(bwrap_args(&opts(NetworkMode::Host), &merged_usr()));
        assert!(!got.contains(&"--unshare-net".to_owned()));
        let i = got.iter().position(|s| s == "/etc/resolv.conf").unwrap();
        assert_eq!(got[i - 1], "--ro-bind-try");
        // Never the host /sys.
        assert!(!got.iter().any(|s| s == "/sys"));
    }

    #[test]
    fn etc_is_generated_with_placeholders() {
        let dir = tempfile::tempdir().unwrap();
        let user = SandboxUser {
            name: "sandbox".into(),
            uid: 1000,
            gid: 1000,
            home: "/tmp/home".into(),
        };
        write_etc(dir.path(), &user, "sandbox").unwrap();
        let passwd = std::fs::read_to_string(dir.path().join("passwd")).unwrap();
        assert!(passwd.contains("sandbox:x:1000:1000:sandbox:/tmp/home:/bin/sh\n"));
        assert!(dir.path().join("ssl/certs").is_dir());
        assert!(dir.path().join("ld.so.cache").is_file());
        assert!(!dir.path().join("shadow").exists());
    }

    #[test]
    fn shared_etc_is_written_once_per_contents() {
        let state = tempfile::tempdir().unwrap();
        let mut user = SandboxUser {
            name: "sandbox".into(),
            uid: 1000,
            gid: 1000,
            home: "/tmp/home".into(),
        };
        let a = shared_etc(state.path(), &user, "sandbox").unwrap();
        assert!(
            a.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(SHARED_ETC_PREFIX)
        );
        let passwd = std::fs::read_to_string(a.join("passwd")).unwrap();
        assert!(passwd.contains("sandbox:x:1000:1000:sandbox:/tmp/home:/bin/sh\n"));
        assert!(a.join("ssl/certs").is_dir());
        // Reused as is: a marker left inside survives the second call.
        std::fs::write(a.join("marker"), "x").unwrap();
        assert_eq!(shared_etc(state.path(), &user, "sandbox").unwrap(), a);
        assert!(a.join("marker").exists());
        // Other contents, another directory; the first one is left alone.
        user.uid = 1001;
        let b = shared_etc(state.path(), &user, "sandbox").unwrap();
        assert_ne!(a, b);
        assert!(
            std::fs::read_to_string(b.join("passwd"))
                .unwrap()
                .contains(":1001:")
        );
        let c = shared_etc(state.path(), &user, "other-host").unwrap();
        assert_ne!(b, c);
        assert_eq!(
            std::fs::read_to_string(c.join("hostname")).unwrap(),
            "other-host\n"
        );
        assert!(a.join("marker").exists());
        // No temporary directory is left behind.
        let mut names: Vec<String> = std::fs::read_dir(state.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with(SHARED_ETC_PREFIX)));
    }

    #[test]
    fn shared_etc_reports_an_unusable_state_dir() {
        let state = tempfile::tempdir().unwrap();
        let file = state.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let user = SandboxUser {
            name: "sandbox".into(),
            uid: 1000,
            gid: 1000,
            home: "/tmp/home".into(),
        };
        let (path, _) = shared_etc(&file, &user, "sandbox").unwrap_err();
        assert!(path.starts_with(&file), "{}", path.display());
    }
}
