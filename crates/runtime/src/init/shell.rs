//! Session plumbing: the per-call files in the root-owned channel directory and the
//! execute-only shell images.

use super::*;

/// The names of one session call's files in [`CHANNEL_DIR`]: `<kind>-<32 random hex digits>`.
#[derive(Debug, Clone)]
pub(super) struct CallFiles {
    pub(super) command: String,
    pub(super) stdout: String,
    pub(super) stderr: String,
    pub(super) status: String,
}

impl CallFiles {
    pub(super) fn new() -> io::Result<Self> {
        let name = |kind: &str| -> io::Result<String> {
            let mut b = [0u8; 16];
            let mut filled = 0;
            while filled < b.len() {
                filled += rustix::rand::getrandom(
                    &mut b[filled..],
                    rustix::rand::GetRandomFlags::empty(),
                )?;
            }
            Ok(format!("{kind}-{:032x}", u128::from_le_bytes(b)))
        };
        Ok(CallFiles {
            command: name("c")?,
            stdout: name("o")?,
            stderr: name("e")?,
            status: name("s")?,
        })
    }

    /// Removes whichever of the files exist (relative to the channel directory: never a path).
    pub(super) fn remove(&self, chan: &OwnedFd) {
        for name in [&self.command, &self.stdout, &self.stderr, &self.status] {
            let _ =
                nix::unistd::unlinkat(chan, name.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Execute-only copies of session shells, one per binary: a root-owned, sealed memfd with
/// mode 0111. The kernel makes a process that executes a file it may not read non-dumpable,
/// so no other process of the sandbox user can reach into the shell (`/proc/<pid>/fd`,
/// `/proc/<pid>/mem`, ptrace), which holds the session channel.
#[derive(Default)]
pub(super) struct ShellImages {
    /// By device, inode, size and modification time of the original.
    pub(super) by_file: HashMap<(u64, u64, i64, i64, i64), OwnedFd>,
}

impl ShellImages {
    /// The image of `shell` (searched in the `PATH` of `env` when it has no `/`), opened with
    /// the sandbox user's file-system identity: the init never opens for the sandbox what the
    /// sandbox could not open itself, wherever a link points.
    pub(super) fn get(
        &mut self,
        cfg: &InitConfig,
        shell: &str,
        env: &[String],
        cwd: &str,
    ) -> Result<BorrowedFd<'_>, (&'static str, Errno)> {
        let file = as_sandbox_fs_user(cfg, || open_shell(shell, env, cwd))?;
        let st = nix::sys::stat::fstat(&file).map_err(|e| ("exec", e))?;
        let key = (
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime,
            st.st_mtime_nsec,
        );
        // Bounded: a sandbox opening sessions on ever new shells of its own must not grow
        // the init (running shells keep their image mapped).
        if self.by_file.len() >= MAX_SHELL_IMAGES && !self.by_file.contains_key(&key) {
            self.by_file.clear();
        }
        let image: &OwnedFd = match self.by_file.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(copy_execute_only(file).map_err(|e| ("image", e))?)
            }
        };
        Ok(image.as_fd())
    }
}

/// Most shell images the init keeps (see [`ShellImages`]).
pub(super) const MAX_SHELL_IMAGES: usize = 8;

/// Runs `f` with the file-system uid and gid of the sandbox user (the init is single-threaded).
pub(super) fn as_sandbox_fs_user<T>(cfg: &InitConfig, f: impl FnOnce() -> T) -> T {
    nix::unistd::setfsgid(Gid::from_raw(cfg.gid));
    nix::unistd::setfsuid(Uid::from_raw(cfg.uid));
    let r = f();
    nix::unistd::setfsuid(Uid::from_raw(0));
    nix::unistd::setfsgid(Gid::from_raw(0));
    r
}

/// Opens the executable regular file `shell` would run, like `execvp` finds it.
pub(super) fn open_shell(
    shell: &str,
    env: &[String],
    cwd: &str,
) -> Result<OwnedFd, (&'static str, Errno)> {
    let candidates: Vec<String> = if shell.starts_with('/') {
        vec![shell.to_owned()]
    } else if shell.contains('/') {
        vec![format!("{cwd}/{shell}")]
    } else {
        let path = env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(crate::DEFAULT_PATH);
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("{d}/{shell}"))
            .collect()
    };
    let mut last = Errno::ENOENT;
    for c in candidates {
        // O_NONBLOCK: a FIFO planted as the shell must not block PID 1.
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        match nix::fcntl::open(c.as_str(), flags, Mode::empty()) {
            Ok(fd) => match nix::sys::stat::fstat(&fd) {
                Ok(st)
                    if st.st_mode & libc::S_IFMT == libc::S_IFREG
                        && st.st_mode & 0o111 != 0
                        && u64::try_from(st.st_size).is_ok_and(|n| n <= MAX_SHELL_SIZE) =>
                {
                    return Ok(fd);
                }
                Ok(_) => last = Errno::EACCES,
                Err(e) => last = e,
            },
            Err(e) => last = e,
        }
    }
    Err(("exec", last))
}

/// Largest shell binary the init copies (bash is ~1.3 MiB).
pub(super) const MAX_SHELL_SIZE: u64 = 64 << 20;

/// Copies `file` (at most [`MAX_SHELL_SIZE`] bytes, even if it grows meanwhile) into a sealed,
/// root-owned memfd with mode 0111.
pub(super) fn copy_execute_only(file: OwnedFd) -> Result<OwnedFd, Errno> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    // MFD_EXEC (Linux >= 6.3) keeps the memfd executable whatever `vm.memfd_noexec` says
    // below 2; older kernels reject the flag and make every memfd executable.
    let memfd = match rustix::fs::memfd_create("agentfense-shell", flags | MemfdFlags::EXEC) {
        // `vm.memfd_noexec = 2` answers EACCES: the exec then fails with a clear errno.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::ACCESS) => {
            rustix::fs::memfd_create("agentfense-shell", flags)
        }
        r => r,
    }
    .map_err(|e| Errno::from_raw(e.raw_os_error()))?;
    let mut dst = std::fs::File::from(memfd);
    let mut src = std::io::Read::take(std::fs::File::from(file), MAX_SHELL_SIZE);
    std::io::copy(&mut src, &mut dst)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let memfd = OwnedFd::from(dst);
    let sys = |e: rustix::io::Errno| Errno::from_raw(e.raw_os_error());
    rustix::fs::fchmod(&memfd, rustix::fs::Mode::from_raw_mode(0o111)).map_err(sys)?;
    rustix::fs::fcntl_add_seals(
        &memfd,
        SealFlags::SEAL | SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE,
    )
    .map_err(sys)?;
    Ok(memfd)
}
