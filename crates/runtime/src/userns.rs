//! Per-sandbox user namespaces: every sandbox gets its own block of host uids and gids.
//!
//! Without a user namespace the init runs as host root and every sandbox's user is the same
//! host uid (1000 by default): per-uid kernel limits (`RLIMIT_NPROC`, inotify, keyrings) are
//! shared by all sandboxes and by whatever host account owns that uid, and that account can
//! reach a sandbox's processes and, through `/proc/<pid>/root`, its workspace.
//!
//! With one, bwrap runs as the first uid of the sandbox's block (no capability in the host's
//! user namespace at any point), creates the namespace and waits (`--userns-block-fd`) while
//! the server, as host root, maps the namespace's uids `0..SLOT_SIZE` onto the block. Root
//! inside is therefore an unprivileged host uid that belongs to no host account, and the
//! sandbox user (1000 inside) is `block + 1000` on the host, different for every sandbox.
//!
//! Blocks are leased through `flock` on one file per block in a host-wide directory, so that
//! several servers (and `agentfense run`) on one host never hand out the same block, and a
//! crashed process releases its blocks with its descriptors.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Result, RuntimeError};

/// Uids (and gids) per sandbox: inside, `0..SLOT_SIZE` (so root, the sandbox user and
/// `nobody` = 65534 are all mapped).
pub const SLOT_SIZE: u32 = 65_536;

/// Default first host uid of the blocks: `2^31`, above the ranges distributions give to
/// accounts (`/etc/login.defs`), to `/etc/subuid` and to systemd's container range
/// (`0x80000..0x6FFFFFFF`).
pub const DEFAULT_BASE: u32 = 1 << 31;

/// Default number of blocks (`2^31 + 16384 * 65536 = 3 * 2^30`, well below `u32::MAX`).
pub const DEFAULT_SLOTS: u32 = 16_384;

/// Default host-wide directory of the lease files.
pub const DEFAULT_LEASE_DIR: &str = "/run/agentfense-uid-blocks";

/// The blocks of host ids this runtime hands to sandboxes.
#[derive(Debug)]
pub struct IdPool {
    base: u32,
    slots: u32,
    lease_dir: PathBuf,
    /// Where the next search starts: a released block is not reused at once.
    next: AtomicU32,
}

/// One sandbox's block: host ids `base..base + SLOT_SIZE`, held while the lease file is locked.
#[derive(Debug)]
pub struct IdLease {
    base: u32,
    _lock: File,
}

impl IdLease {
    /// The host id of id `inner` inside the sandbox.
    pub fn host_id(&self, inner: u32) -> u32 {
        self.base + inner.min(SLOT_SIZE - 1)
    }

    /// First host id of the block (root inside).
    pub fn base(&self) -> u32 {
        self.base
    }
}

impl IdPool {
    /// A pool of `slots` blocks from host uid `base`, leased through files in `lease_dir`
    /// (created, root-only). Refuses a range that does not fit in 32 bits or that holds an
    /// account or a subordinate range of this host (`/etc/passwd`, `/etc/group`,
    /// `/etc/subuid`, `/etc/subgid`).
    pub fn new(base: u32, slots: u32, lease_dir: &Path) -> Result<IdPool> {
        let end = u64::from(base) + u64::from(slots) * u64::from(SLOT_SIZE);
        if slots == 0 || base == 0 || end > u64::from(u32::MAX) {
            return Err(RuntimeError::invalid(format!(
                "sandbox uid range {base} + {slots} x {SLOT_SIZE} does not fit in 1..2^32-1"
            )));
        }
        if let Some(clash) = host_ids_in(u64::from(base), end) {
            return Err(RuntimeError::invalid(format!(
                "sandbox uid range {base}..{end} overlaps {clash}: sandboxes must map to ids \
                 no host account uses (set runtime.sandbox_uid_base elsewhere)"
            )));
        }
        create_private_dir(lease_dir).map_err(|source| RuntimeError::Io {
            op: "creating the uid lease directory",
            source,
        })?;
        // Start at a random block: servers on one host then rarely contend for the same one.
        let mut seed = [0u8; 4];
        let start = match rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::empty())
        {
            Ok(4) => u32::from_ne_bytes(seed) % slots,
            _ => 0,
        };
        Ok(IdPool {
            base,
            slots,
            lease_dir: lease_dir.to_owned(),
            next: AtomicU32::new(start),
        })
    }

    /// Leases a free block.
    pub fn lease(&self) -> Result<IdLease> {
        use rustix::fs::{FlockOperation, flock};
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.slots {
            let slot = first.wrapping_add(i) % self.slots;
            // Named after the block's first uid, not its number: pools with other bases
            // sharing the directory still never hand out the same ids.
            let base = self.base + slot * SLOT_SIZE;
            let path = self.lease_dir.join(base.to_string());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| RuntimeError::Io {
                    op: "opening a uid lease file",
                    source,
                })?;
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    self.next.store(slot.wrapping_add(1), Ordering::Relaxed);
                    return Ok(IdLease { base, _lock: file });
                }
                Err(rustix::io::Errno::WOULDBLOCK) => continue,
                Err(e) => {
                    return Err(RuntimeError::Io {
                        op: "locking a uid lease file",
                        source: e.into(),
                    });
                }
            }
        }
        Err(RuntimeError::invalid(format!(
            "all {} sandbox uid blocks are in use on this host",
            self.slots
        )))
    }
}

/// Why this host will not let an unprivileged uid (bwrap, as a sandbox's block) create a user
/// namespace, judged from the knobs distributions use, or `None` when nothing forbids it.
/// `read` gives a sysctl's value (`None`: absent on this kernel).
pub fn userns_unavailable(read: impl Fn(&str) -> Option<String>) -> Option<String> {
    let num = |key: &str| read(key).and_then(|v| v.trim().parse::<i64>().ok());
    if num("/proc/sys/user/max_user_namespaces") == Some(0) {
        return Some("user.max_user_namespaces is 0".into());
    }
    if num("/proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
        return Some("kernel.unprivileged_userns_clone is 0".into());
    }
    if num("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
        return Some(
            "kernel.apparmor_restrict_unprivileged_userns is 1 (AppArmor confines unprivileged \
             user namespaces)"
                .into(),
        );
    }
    None
}

/// [`userns_unavailable`] on this host.
pub fn host_userns_unavailable() -> Option<String> {
    userns_unavailable(|path| std::fs::read_to_string(path).ok())
}

/// Maps ids `0..SLOT_SIZE` of the user namespace of process `pid` onto `lease`'s block
/// (uids and gids). The caller must be host root.
pub fn write_maps(pid: u32, lease: &IdLease) -> io::Result<()> {
    let line = format!("0 {} {SLOT_SIZE}\n", lease.base);
    let proc = PathBuf::from(format!("/proc/{pid}"));
    // The process must be bwrap's, running as the block's first uid (not a reused pid).
    let status = std::fs::read_to_string(proc.join("status"))?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u32>().ok());
    if uid != Some(lease.base) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "process {pid} is not the sandbox's (uid {uid:?}, expected {})",
                lease.base
            ),
        ));
    }
    std::fs::write(proc.join("uid_map"), &line)?;
    std::fs::write(proc.join("gid_map"), &line)
}

/// Where bwrap, as an unprivileged uid, finds what it binds. The workspace (under the server's
/// root-only mount directory), the init and the generated `/etc` (under a state directory that
/// may sit in `/root`) are out of its reach on the host, and bwrap resolves every source path
/// itself (`realpath`, so `--bind-fd` does not help).
///
/// So between fork and exec, still as root, the spawning child builds bwrap a root of its own:
/// a new mount namespace (private: nothing propagates either way), a small tmpfs mounted over
/// this directory, the host's `/usr`, `/etc`, `/proc`, `/dev` and library directories bound
/// into it, the three paths bound at `/run/agentfense/{workspace,init,etc}`, and a pivot into
/// it. bwrap's process then holds no other mount of the host: in particular no other
/// sandbox's FUSE mount, whose unmount would otherwise wait for this bwrap to exit.
pub const STAGING_DIR: &str = "/run/agentfense";

/// One step of building the staging root (paths already prefixed with [`STAGING_DIR`]).
#[derive(Debug)]
enum Op {
    Dir(CString),
    File(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    Bind {
        src: CString,
        dst: CString,
        recursive: bool,
    },
}

/// The staging root of one sandbox start, and its handshake pipes.
#[derive(Debug)]
pub struct Staging {
    mounts: std::sync::Arc<StagedRoot>,
    info_r: OwnedFd,
    info_w: OwnedFd,
    block_r: OwnedFd,
    block_w: OwnedFd,
}

/// Where the staged paths appear in bwrap's root.
const STAGED: [&str; 3] = [
    "/run/agentfense/workspace",
    "/run/agentfense/init",
    "/run/agentfense/etc",
];

/// Where a persistent `$HOME` appears in bwrap's root, when the sandbox has one.
const STAGED_HOME: &str = "/run/agentfense/home";

impl Staging {
    /// Plans (nothing is mounted yet: see [`StagedRoot::enter`]) the staging root for
    /// `workspace`, `init` and `etc` on a host laid out as `host`. The pipes are close-on-exec
    /// (see [`Staging::inherited`]).
    pub fn new(
        workspace: &Path,
        init: &Path,
        etc: &Path,
        home: Option<&Path>,
        host: &crate::bwrap::HostLayout,
    ) -> io::Result<Staging> {
        use crate::bwrap::HostEntry;
        use rustix::pipe::{PipeFlags, pipe_with};
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
        };
        let root = Path::new(STAGING_DIR);
        std::fs::create_dir_all(root)?;
        let at = |p: &str| c(&root.join(p.trim_start_matches('/')));
        let mut ops = Vec::new();
        for d in [
            "/usr",
            "/etc",
            "/proc",
            "/dev",
            "/tmp",
            "/run",
            "/run/agentfense",
        ] {
            ops.push(Op::Dir(at(d)?));
        }
        for (d, recursive) in [
            ("/usr", true),
            ("/etc", true),
            ("/proc", true),
            ("/dev", true),
        ] {
            ops.push(Op::Bind {
                src: c(Path::new(d))?,
                dst: at(d)?,
                recursive,
            });
        }
        for (path, kind) in &host.system {
            match kind {
                HostEntry::Dir => {
                    ops.push(Op::Dir(at(path)?));
                    ops.push(Op::Bind {
                        src: c(Path::new(path))?,
                        dst: at(path)?,
                        recursive: true,
                    });
                }
                HostEntry::Symlink(target) => ops.push(Op::Symlink {
                    target: c(target)?,
                    link: at(path)?,
                }),
                HostEntry::Missing => {}
            }
        }
        let staged = [workspace, init, etc].into_iter().zip(STAGED);
        for (src, dst) in staged.chain(home.map(|h| (h, STAGED_HOME))) {
            // The init is a file: its mount point must be one.
            ops.push(if dst.ends_with("init") {
                Op::File(at(dst)?)
            } else {
                Op::Dir(at(dst)?)
            });
            ops.push(Op::Bind {
                src: c(src)?,
                dst: at(dst)?,
                recursive: false,
            });
        }
        let (info_r, info_w) = pipe_with(PipeFlags::CLOEXEC)?;
        let (block_r, block_w) = pipe_with(PipeFlags::CLOEXEC)?;
        Ok(Staging {
            mounts: std::sync::Arc::new(StagedRoot {
                root: c(root)?,
                ops,
            }),
            info_r,
            info_w,
            block_r,
            block_w,
        })
    }

    /// The (workspace, init, etc) paths in bwrap's root, for its arguments.
    pub fn paths() -> (PathBuf, PathBuf, PathBuf) {
        (STAGED[0].into(), STAGED[1].into(), STAGED[2].into())
    }

    /// Where the persistent `$HOME` (if any) appears in bwrap's root.
    pub fn home_path() -> &'static str {
        STAGED_HOME
    }

    /// What the spawning child does before exec ([`StagedRoot::enter`]).
    pub fn root(&self) -> std::sync::Arc<StagedRoot> {
        self.mounts.clone()
    }

    /// The handshake descriptors' numbers for bwrap's arguments.
    pub fn for_bwrap(&self) -> crate::bwrap::UsernsFds {
        crate::bwrap::UsernsFds {
            block_fd: self.block_r.as_raw_fd(),
            info_fd: self.info_w.as_raw_fd(),
        }
    }

    /// The descriptors bwrap must inherit (the spawn clears their close-on-exec flag).
    pub fn inherited(&self) -> [RawFd; 2] {
        [self.block_r.as_raw_fd(), self.info_w.as_raw_fd()]
    }

    /// After bwrap is spawned: waits (at most `timeout`) for the pid of its namespace's first
    /// process, maps the namespace's ids onto `lease` and lets bwrap go on.
    pub async fn map_ids(self, lease: &IdLease, timeout: std::time::Duration) -> io::Result<()> {
        let Staging {
            info_r,
            info_w,
            block_r,
            block_w,
            ..
        } = self;
        // Only bwrap holds these now: end-of-file on the info pipe if it dies.
        drop((info_w, block_r));
        let read = tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            File::from(info_r).read_to_string(&mut text).map(|_| text)
        });
        let text = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "bwrap did not report its pid"))?
            .map_err(io::Error::other)??;
        let pid = child_pid(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bwrap reported no child-pid: {text:?}"),
            )
        })?;
        write_maps(pid, lease)?;
        File::from(block_w).write_all(b"1")
    }
}

/// bwrap's root, planned (see [`STAGING_DIR`]).
#[derive(Debug)]
pub struct StagedRoot {
    root: CString,
    ops: Vec<Op>,
}

impl StagedRoot {
    /// Enters a private mount namespace, builds the root there and pivots into it. Runs
    /// between fork and exec (as root): only async-signal-safe system calls on memory prepared
    /// before the fork.
    ///
    /// # Safety
    /// Call only in a forked child that is about to exec.
    pub unsafe fn enter(&self) -> io::Result<()> {
        let none = std::ptr::null::<libc::c_char>();
        let data = std::ptr::null::<libc::c_void>();
        // SAFETY: plain system calls on NUL-terminated strings that outlive them.
        let ok = unsafe {
            libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, data) == 0
                && libc::mount(
                    c"tmpfs".as_ptr(),
                    self.root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"mode=0755,size=64k".as_ptr().cast(),
                ) == 0
                && self.ops.iter().all(|op| match op {
                    // Modes set explicitly: the server's umask must not make them untraversable
                    // for bwrap's uid.
                    Op::Dir(p) => {
                        libc::mkdir(p.as_ptr(), 0o755) == 0 && libc::chmod(p.as_ptr(), 0o755) == 0
                    }
                    Op::File(p) => {
                        let fd = libc::open(
                            p.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        fd >= 0 && libc::close(fd) == 0 && libc::chmod(p.as_ptr(), 0o644) == 0
                    }
                    Op::Symlink { target, link } => libc::symlink(target.as_ptr(), link.as_ptr()) == 0,
                    Op::Bind { src, dst, recursive } => {
                        let rec = if *recursive { libc::MS_REC } else { 0 };
                        libc::mount(src.as_ptr(), dst.as_ptr(), none, libc::MS_BIND | rec, data) == 0
                    }
                })
                // The new root replaces the old one, which is then let go entirely.
                && libc::chdir(self.root.as_ptr()) == 0
                && libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0
                && libc::umount2(c".".as_ptr(), libc::MNT_DETACH) == 0
                && libc::chdir(c"/".as_ptr()) == 0
        };
        if ok {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// `child-pid` of bwrap's `--info-fd` JSON.
fn child_pid(info: &str) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(info).ok()?;
    u32::try_from(v.get("child-pid")?.as_u64()?).ok()
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The first account or subordinate range of this host with an id in `lo..hi`, described.
fn host_ids_in(lo: u64, hi: u64) -> Option<String> {
    for (file, ranges) in [
        ("/etc/passwd", false),
        ("/etc/group", false),
        ("/etc/subuid", true),
        ("/etc/subgid", true),
    ] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        if let Some(name) = clash_in(&text, ranges, lo, hi) {
            return Some(format!("{name} in {file}"));
        }
    }
    None
}

/// The name of the first entry of a passwd-like (`name:x:id:...`) or subid-like
/// (`name:start:count`) file with ids in `lo..hi`.
pub(crate) fn clash_in(text: &str, ranges: bool, lo: u64, hi: u64) -> Option<String> {
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        let (start, count) = if ranges {
            match (f.get(1), f.get(2)) {
                (Some(s), Some(c)) => (s.parse::<u64>().ok()?, c.parse::<u64>().ok()?),
                _ => continue,
            }
        } else {
            match f.get(2).and_then(|s| s.parse::<u64>().ok()) {
                Some(id) => (id, 1),
                None => continue,
            }
        };
        if start < hi && start + count > lo {
            return Some(f[0].to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clashes_are_found_in_both_file_kinds() {
        let passwd = "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/a:/bin/sh\n";
        assert_eq!(
            clash_in(passwd, false, 1000, 2000).as_deref(),
            Some("alice")
        );
        assert_eq!(clash_in(passwd, false, 1001, 2000), None);
        let subuid = "alice:100000:65536\n";
        assert_eq!(
            clash_in(subuid, true, 165_535, 200_000).as_deref(),
            Some("alice")
        );
        assert_eq!(clash_in(subuid, true, 165_536, 200_000), None);
        assert_eq!(clash_in("garbage\n\n", true, 0, u64::MAX), None);
    }

    #[test]
    fn leases_are_distinct_and_released_with_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let pool = IdPool::new(DEFAULT_BASE, 2, dir.path()).unwrap();
        let a = pool.lease().unwrap();
        let b = pool.lease().unwrap();
        assert_ne!(a.base(), b.base());
        assert!(pool.lease().is_err(), "only two blocks");
        // Another pool over the same directory (another server) sees them taken too.
        let other = IdPool::new(DEFAULT_BASE, 2, dir.path()).unwrap();
        assert!(other.lease().is_err());
        let freed = a.base();
        drop(a);
        assert_eq!(other.lease().unwrap().base(), freed);
        assert_eq!(b.host_id(1000), b.base() + 1000);
    }

    #[test]
    fn hosts_that_forbid_unprivileged_user_namespaces_are_named() {
        let host = |vals: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vals.iter()
                    .find(|(p, _)| k.ends_with(p))
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(
            userns_unavailable(host(&[("max_user_namespaces", "96367\n")])),
            None
        );
        assert_eq!(userns_unavailable(host(&[])), None);
        for (knob, v) in [
            ("max_user_namespaces", "0\n"),
            ("unprivileged_userns_clone", "0\n"),
            ("apparmor_restrict_unprivileged_userns", "1\n"),
        ] {
            let why = userns_unavailable(move |k: &str| k.ends_with(knob).then(|| v.to_owned()));
            assert!(why.is_some_and(|w| w.contains(knob)), "{knob}");
        }
    }

    #[test]
    fn child_pid_is_read_from_bwrap_info() {
        let info = "{\n    \"child-pid\": 3104,\n    \"mnt-namespace\": 4026532176\n}\n";
        assert_eq!(child_pid(info), Some(3104));
        assert_eq!(child_pid("{}"), None);
        assert_eq!(child_pid(""), None);
    }

    #[test]
    fn ranges_beyond_32_bits_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(IdPool::new(u32::MAX - 10, 1, dir.path()).is_err());
        assert!(IdPool::new(DEFAULT_BASE, 0, dir.path()).is_err());
    }
}
