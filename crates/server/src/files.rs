//! Codebase file storage: one directory per codebase under the codebases root.
//!
//! Every host path is resolved beneath the codebase directory with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so neither `..`
//! nor a symlink inside a codebase can make the (root) server read or write outside it; the
//! last component is never followed either. Uploads are written to a staging directory on the
//! same filesystem (never visible inside a codebase or a sandbox) and renamed into place, so an
//! interrupted upload leaves nothing half-written.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentfense_core::SandboxPath;
use md5::{Digest, Md5};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};

use crate::ids::CodebaseId;

const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// A file-storage operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The codebase's directory is missing: its files are not in this server's codebase
    /// storage (another server's local disk, or removed behind the server's back).
    #[error(
        "codebase {0} has no files in this server's codebase storage (storage.codebase_path): \
         servers sharing a metadata database must share that directory too, or the codebase's \
         files stay with the server that stored them"
    )]
    NoCodebaseDir(String),
    /// The path does not exist (or goes through a symlink, which is treated as absent).
    #[error("file not found: {0}")]
    NotFound(String),
    /// The path names a directory where a file is needed, or the reverse.
    #[error("{path} is {what}")]
    WrongKind {
        /// The path.
        path: String,
        /// e.g. "a directory", "a symlink", "not a directory".
        what: &'static str,
    },
    /// Upload size does not match the announced `total_size`.
    #[error("upload of {path}: received {received} bytes but total_size said {announced}")]
    SizeMismatch {
        /// The path.
        path: String,
        /// Announced.
        announced: u64,
        /// Received.
        received: u64,
    },
    /// Upload exceeds the configured cap.
    #[error("upload of {path} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The path.
        path: String,
        /// The cap.
        limit: u64,
    },
    /// An I/O step failed.
    #[error("{op} {path} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: impl Into<String>) -> impl FnOnce(io::Error) -> FilesError {
    let path = path.into();
    move |source| FilesError::Io { op, path, source }
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the codebase root, without a leading `/`.
    pub path: String,
    /// Last component.
    pub name: String,
    /// Directory?
    pub is_dir: bool,
    /// Size in bytes (of the link itself for symlinks).
    pub size: u64,
    /// Modification time.
    pub modified: SystemTime,
}

/// What an upload did, for the result and the codebase's stats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// Bytes written.
    pub size: u64,
    /// Lowercase hex MD5 of the content.
    pub md5: String,
    /// Size of the file it replaced, if any.
    pub replaced: Option<u64>,
}

/// An upload in progress: bytes go to a staging file until [`Upload::commit`].
#[derive(Debug)]
pub struct Upload {
    file: File,
    staging: PathBuf,
    target: SandboxPath,
    cb_dir: PathBuf,
    hasher: Md5,
    received: u64,
    limit: u64,
    committed: bool,
}

/// The codebases root.
#[derive(Debug, Clone)]
pub struct CodebaseFiles {
    root: PathBuf,
    staging: PathBuf,
}

fn stat_time(st: &Stat) -> SystemTime {
    let secs = st.st_mtime.max(0) as u64;
    let nanos = (st.st_mtime_nsec as u32).min(999_999_999);
    UNIX_EPOCH + Duration::new(secs, nanos)
}

fn rel_arg(rel: &str) -> &str {
    if rel.is_empty() { "." } else { rel }
}

impl CodebaseFiles {
    /// Uses `root` (created if missing, mode 0700) for codebase trees.
    pub fn open(root: &Path) -> Result<CodebaseFiles, FilesError> {
        let staging = root.join(".staging");
        for d in [root, &staging] {
            std::fs::create_dir_all(d)
                .map_err(io_err("create directory", d.display().to_string()))?;
            set_mode(d, 0o700)?;
        }
        // Leftovers of uploads interrupted by a crash.
        if let Ok(rd) = std::fs::read_dir(&staging) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(CodebaseFiles {
            root: root.to_owned(),
            staging,
        })
    }

    /// The host directory holding a codebase's files (the FUSE lower layer).
    pub fn dir(&self, id: &CodebaseId) -> PathBuf {
        self.root.join(id.as_str())
    }

    /// Creates the (empty) directory of a new codebase.
    pub fn create(&self, id: &CodebaseId) -> Result<(), FilesError> {
        let d = self.dir(id);
        std::fs::create_dir(&d)
            .map_err(io_err("create codebase directory", d.display().to_string()))?;
        set_mode(&d, 0o755)
    }

    /// Deletes a codebase's files (never following symlinks).
    pub fn delete(&self, id: &CodebaseId) -> Result<(), FilesError> {
        let d = self.dir(id);
        match std::fs::remove_dir_all(&d) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete codebase directory", d.display().to_string())(e)),
        }
    }

    fn open_root(&self, id: &CodebaseId) -> Result<OwnedFd, FilesError> {
        let d = self.dir(id);
        rustix::fs::open(
            &d,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::RDONLY,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::NOENT => FilesError::NoCodebaseDir(id.to_string()),
            e => io_err("open codebase directory", d.display().to_string())(e.into()),
        })
    }

    /// Starts an upload of `path` (a file path, not the root).
    pub fn begin_upload(
        &self,
        id: &CodebaseId,
        path: &SandboxPath,
        limit: u64,
    ) -> Result<Upload, FilesError> {
        if path.is_root() {
            return Err(FilesError::WrongKind {
                path: "/".into(),
                what: "the codebase root, not a file",
            });
        }
        // Fail early on a missing codebase directory.
        drop(self.open_root(id)?);
        let name = format!("upload-{}", crate::ids::SessionId::generate().as_str());
        let staging = self.staging.join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)
            .map_err(io_err("create staging file for", path.as_str()))?;
        Ok(Upload {
            file,
            staging,
            target: path.clone(),
            cb_dir: self.dir(id),
            hasher: Md5::new(),
            received: 0,
            limit,
            committed: false,
        })
    }

    /// Opens a regular file for reading.
    pub fn open_file(&self, id: &CodebaseId, path: &SandboxPath) -> Result<File, FilesError> {
        let root = self.open_root(id)?;
        let fd = rustix::fs::openat2(
            &root,
            rel_arg(path.relative()),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            BENEATH,
        )
        .map_err(|e| not_found_or(e, path, "open"))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| io_err("stat", path.as_str())(e.into()))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Ok(File::from(fd)),
            FileType::Directory => Err(FilesError::WrongKind {
                path: path.to_string(),
                what: "a directory",
            }),
            _ => Err(FilesError::WrongKind {
                path: path.to_string(),
                what: "not a regular file",
            }),
        }
    }

    /// Lists `dir` (or the whole tree below it when `recursive`), sorted by path. A missing
    /// directory lists as empty; a file is an error.
    pub fn list(
        &self,
        id: &CodebaseId,
        dir: &SandboxPath,
        recursive: bool,
    ) -> Result<Vec<FileEntry>, FilesError> {
        let root = self.open_root(id)?;
        let dfd = match rustix::fs::openat2(
            &root,
            rel_arg(dir.relative()),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            BENEATH,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP | rustix::io::Errno::XDEV) => {
                return Ok(Vec::new());
            }
            Err(rustix::io::Errno::NOTDIR) => {
                // A symlink (never followed) lists as empty, like a missing directory; a
                // regular file is a caller mistake.
                let is_link = rustix::fs::openat2(
                    &root,
                    rel_arg(dir.relative()),
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                    BENEATH,
                )
                .and_then(|fd| rustix::fs::fstat(&fd))
                .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
                .unwrap_or(true);
                if is_link {
                    return Ok(Vec::new());
                }
                return Err(FilesError::WrongKind {
                    path: dir.to_string(),
                    what: "not a directory",
                });
            }
            Err(e) => return Err(io_err("open directory", dir.as_str())(e.into())),
        };
        let mut out = Vec::new();
        list_into(dfd.as_fd(), dir, recursive, &mut out)?;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Total size and number of regular files at `paths` (relative to the codebase root) and
    /// below them, for keeping the codebase's stats up to date around a publish without
    /// walking the whole tree. Missing paths and symlinks count as nothing; a path below
    /// another one in the list is counted once.
    pub fn usage(&self, id: &CodebaseId, paths: &[PathBuf]) -> Result<(u64, u64), FilesError> {
        let root = self.open_root(id)?;
        let mut sorted: Vec<&PathBuf> = paths.iter().collect();
        sorted.sort();
        // Sorted by components, a path's descendants come right after it: comparing with the
        // last kept path is enough (a publish may name tens of thousands of paths).
        let mut kept: Vec<&PathBuf> = Vec::new();
        for p in sorted {
            if !kept.last().is_some_and(|k| p.starts_with(k)) {
                kept.push(p);
            }
        }
        let (mut size, mut count) = (0u64, 0u64);
        for rel in kept {
            let Ok(sp) = SandboxPath::parse(&rel.to_string_lossy()) else {
                continue;
            };
            if sp.is_root() {
                let (s, n) = self.scan_stats(id)?;
                size += s;
                count += n;
                continue;
            }
            let st = match rustix::fs::openat2(
                &root,
                sp.relative(),
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                BENEATH,
            )
            .and_then(|fd| rustix::fs::fstat(&fd))
            {
                Ok(st) => st,
                Err(
                    rustix::io::Errno::NOENT
                    | rustix::io::Errno::LOOP
                    | rustix::io::Errno::XDEV
                    | rustix::io::Errno::NOTDIR,
                ) => continue,
                Err(e) => return Err(io_err("stat", sp.as_str())(e.into())),
            };
            match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => {
                    size += st.st_size.max(0) as u64;
                    count += 1;
                }
                FileType::Directory => {
                    for e in self.list(id, &sp, true)?.iter().filter(|e| !e.is_dir) {
                        size += e.size;
                        count += 1;
                    }
                }
                _ => {}
            }
        }
        Ok((size, count))
    }

    /// Total size and number of regular files of a codebase (a full scan).
    pub fn scan_stats(&self, id: &CodebaseId) -> Result<(u64, u64), FilesError> {
        let entries = self.list(id, &SandboxPath::root(), true)?;
        Ok(entries
            .iter()
            .filter(|e| !e.is_dir)
            .fold((0, 0), |(s, n), e| (s + e.size, n + 1)))
    }
}

fn not_found_or(e: rustix::io::Errno, path: &SandboxPath, op: &'static str) -> FilesError {
    match e {
        // ELOOP: a symlink on the way or at the end; EXDEV: an escape attempt.
        rustix::io::Errno::NOENT | rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
            FilesError::NotFound(path.to_string())
        }
        rustix::io::Errno::NOTDIR => FilesError::NotFound(path.to_string()),
        e => io_err(op, path.as_str())(e.into()),
    }
}

fn list_into(
    dfd: BorrowedFd<'_>,
    dir: &SandboxPath,
    recursive: bool,
    out: &mut Vec<FileEntry>,
) -> Result<(), FilesError> {
    let mut names = Vec::new();
    let mut reader =
        rustix::fs::Dir::read_from(dfd).map_err(|e| io_err("list", dir.as_str())(e.into()))?;
    for ent in reader.by_ref() {
        let ent = ent.map_err(|e| io_err("list", dir.as_str())(e.into()))?;
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        names.push(name.to_vec());
    }
    for raw in names {
        let name_os = OsStr::from_bytes(&raw);
        let st = match rustix::fs::statat(dfd, name_os, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue, // removed meanwhile
            Err(e) => return Err(io_err("stat", dir.as_str())(e.into())),
        };
        let name = String::from_utf8_lossy(&raw).into_owned();
        let Ok(child) = dir.join(&name) else { continue };
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        out.push(FileEntry {
            path: child.relative().to_owned(),
            name: name.clone(),
            is_dir,
            size: st.st_size.max(0) as u64,
            modified: stat_time(&st),
        });
        if is_dir && recursive {
            let sub = rustix::fs::openat(
                dfd,
                name_os,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io_err("open directory", child.as_str())(e.into()))?;
            list_into(sub.as_fd(), &child, true, out)?;
        }
    }
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> Result<(), FilesError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", p.display().to_string()))
}

impl Upload {
    /// Appends a chunk.
    pub fn write(&mut self, data: &[u8]) -> Result<(), FilesError> {
        self.received += data.len() as u64;
        if self.received > self.limit {
            return Err(FilesError::TooLarge {
                path: self.target.to_string(),
                limit: self.limit,
            });
        }
        self.hasher.update(data);
        self.file
            .write_all(data)
            .map_err(io_err("write", self.target.as_str()))
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Checks the size, creates parent directories (never through a symlink) and renames the
    /// staged file into place, replacing a regular file but never a directory or symlink.
    pub fn commit(mut self, announced: Option<u64>) -> Result<Uploaded, FilesError> {
        let path = self.target.to_string();
        if let Some(n) = announced
            && n != self.received
        {
            return Err(FilesError::SizeMismatch {
                path,
                announced: n,
                received: self.received,
            });
        }
        self.file.flush().map_err(io_err("write", path.as_str()))?;
        let root = rustix::fs::open(
            &self.cb_dir,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::RDONLY,
            Mode::empty(),
        )
        .map_err(|e| io_err("open codebase directory", path.as_str())(e.into()))?;
        let parent = self.target.parent().unwrap_or_else(SandboxPath::root);
        let pfd = mkdir_all_beneath(root.as_fd(), &parent)?;
        let name = self.target.file_name().unwrap_or_default().to_owned();
        let replaced = match rustix::fs::statat(&pfd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => Some(st.st_size.max(0) as u64),
                FileType::Directory => {
                    return Err(FilesError::WrongKind {
                        path,
                        what: "a directory",
                    });
                }
                _ => {
                    return Err(FilesError::WrongKind {
                        path,
                        what: "a symlink or special file; it is not written through",
                    });
                }
            },
            Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return Err(io_err("stat", path.as_str())(e.into())),
        };
        let staging_dir = self.staging.parent().unwrap_or(Path::new("/"));
        let staging_name = self.staging.file_name().unwrap_or_default();
        let sfd = rustix::fs::open(
            staging_dir,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::RDONLY,
            Mode::empty(),
        )
        .map_err(|e| io_err("open staging directory", path.as_str())(e.into()))?;
        // Uploaded files are world-readable inside the sandbox's view (the rules decide).
        rustix::fs::fchmod(&self.file, Mode::from_raw_mode(0o644))
            .map_err(|e| io_err("chmod", path.as_str())(e.into()))?;
        rustix::fs::renameat(&sfd, staging_name, &pfd, name.as_str())
            .map_err(|e| io_err("rename into place", path.as_str())(e.into()))?;
        self.committed = true;
        let md5 = self
            .hasher
            .clone()
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Uploaded {
            size: self.received,
            md5,
            replaced,
        })
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.staging);
        }
    }
}

/// Opens (creating as needed, mode 0755) every directory of `dir` beneath `root`, refusing
/// symlinks at every step.
fn mkdir_all_beneath(root: BorrowedFd<'_>, dir: &SandboxPath) -> Result<OwnedFd, FilesError> {
    let mut cur = rustix::io::dup(root).map_err(|e| io_err("open", dir.as_str())(e.into()))?;
    for comp in dir.components() {
        match rustix::fs::mkdirat(&cur, comp, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io_err("create directory", dir.as_str())(e.into())),
        }
        cur = rustix::fs::openat2(
            &cur,
            comp,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            BENEATH,
        )
        .map_err(|e| match e {
            rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP => FilesError::WrongKind {
                path: dir.to_string(),
                what: "not a directory (a file or symlink is in the way)",
            },
            e => io_err("open directory", dir.as_str())(e.into()),
        })?;
    }
    Ok(cur)
}

/// Reads a whole file; for tests and small files.
pub fn read_all(mut f: File) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn setup() -> (tempfile::TempDir, CodebaseFiles, CodebaseId) {
        let dir = tempfile::tempdir().unwrap();
        let files = CodebaseFiles::open(&dir.path().join("codebases")).unwrap();
        let id = CodebaseId::generate();
        files.create(&id).unwrap();
        (dir, files, id)
    }

    fn p(s: &str) -> SandboxPath {
        SandboxPath::parse(s).unwrap()
    }

    fn upload(
        files: &CodebaseFiles,
        id: &CodebaseId,
        path: &str,
        data: &[u8],
    ) -> Result<Uploaded, FilesError> {
        let mut u = files.begin_upload(id, &p(path), 1 << 20)?;
        for chunk in data.chunks(3) {
            u.write(chunk)?;
        }
        u.commit(Some(data.len() as u64))
    }

    #[test]
    fn upload_download_list_round_trip() {
        let (_d, files, id) = setup();
        let up = upload(&files, &id, "src/main.py", b"hello world!").unwrap();
        assert_eq!(up.size, 12);
        assert_eq!(up.md5, "fc3ff98e8c6a0d3087d515c0473f8677");
        assert_eq!(up.replaced, None);
        let again = upload(&files, &id, "/src/main.py", b"x").unwrap();
        assert_eq!(again.replaced, Some(12));
        assert_eq!(
            read_all(files.open_file(&id, &p("src/main.py")).unwrap()).unwrap(),
            b"x"
        );
        upload(&files, &id, "empty", b"").unwrap();
        let all: Vec<(String, bool)> = files
            .list(&id, &SandboxPath::root(), true)
            .unwrap()
            .into_iter()
            .map(|e| (e.path, e.is_dir))
            .collect();
        assert_eq!(
            all,
            vec![
                ("empty".into(), false),
                ("src".into(), true),
                ("src/main.py".into(), false)
            ]
        );
        let top: Vec<String> = files
            .list(&id, &SandboxPath::root(), false)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(top, ["empty", "src"]);
        assert_eq!(files.list(&id, &p("missing"), false).unwrap(), vec![]);
        assert_eq!(files.scan_stats(&id).unwrap(), (1, 2));
        // Nothing is left in staging.
        assert_eq!(std::fs::read_dir(&files.staging).unwrap().count(), 0);
    }

    #[test]
    fn usage_counts_files_and_directories_once() {
        let (_d, files, id) = setup();
        upload(&files, &id, "a.txt", b"12345").unwrap();
        upload(&files, &id, "out/x", b"12").unwrap();
        upload(&files, &id, "out/deep/y", b"123").unwrap();
        let paths: Vec<PathBuf> = ["out", "out/x", "a.txt", "missing"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(files.usage(&id, &paths).unwrap(), (10, 3));
        assert_eq!(files.usage(&id, &[PathBuf::from("")]).unwrap(), (10, 3));
        assert_eq!(files.usage(&id, &[]).unwrap(), (0, 0));
    }

    #[test]
    fn never_follows_symlinks() {
        let (d, files, id) = setup();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host secret").unwrap();
        std::os::unix::fs::symlink(&outside, files.dir(&id).join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), files.dir(&id).join("f")).unwrap();
        // Writing through a symlinked directory or onto a symlink is refused.
        assert!(matches!(
            upload(&files, &id, "link/x", b"pwn"),
            Err(FilesError::WrongKind { .. })
        ));
        assert!(matches!(
            upload(&files, &id, "f", b"pwn"),
            Err(FilesError::WrongKind { .. })
        ));
        assert!(!outside.join("x").exists());
        assert_eq!(
            std::fs::read_to_string(outside.join("secret")).unwrap(),
            "host secret"
        );
        // Reading through them looks like a missing file.
        assert!(matches!(
            files.open_file(&id, &p("f")),
            Err(FilesError::NotFound(_))
        ));
        assert!(matches!(
            files.open_file(&id, &p("link/secret")),
            Err(FilesError::NotFound(_))
        ));
        assert_eq!(files.list(&id, &p("link"), false).unwrap(), vec![]);
        // The link itself is listed, but not descended.
        let names: Vec<String> = files
            .list(&id, &SandboxPath::root(), true)
            .unwrap()
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(names, ["f", "link"]);
    }

    #[test]
    fn size_checks_and_interrupted_uploads_leave_nothing() {
        let (_d, files, id) = setup();
        let mut u = files.begin_upload(&id, &p("a"), 1 << 20).unwrap();
        u.write(b"abc").unwrap();
        assert!(matches!(
            u.commit(Some(5)),
            Err(FilesError::SizeMismatch {
                announced: 5,
                received: 3,
                ..
            })
        ));
        let mut u = files.begin_upload(&id, &p("b"), 4).unwrap();
        assert!(matches!(
            u.write(b"12345"),
            Err(FilesError::TooLarge { .. })
        ));
        drop(u);
        let mut u = files.begin_upload(&id, &p("c"), 10).unwrap();
        u.write(b"half").unwrap();
        drop(u); // client went away
        assert_eq!(files.list(&id, &SandboxPath::root(), true).unwrap(), vec![]);
        assert_eq!(std::fs::read_dir(&files.staging).unwrap().count(), 0);
        assert!(matches!(
            files.open_file(&id, &p("a")),
            Err(FilesError::NotFound(_))
        ));
        upload(&files, &id, "dir/x", b"1").unwrap();
        assert!(matches!(
            upload(&files, &id, "dir", b"1"),
            Err(FilesError::WrongKind { .. })
        ));
        assert!(matches!(
            upload(&files, &id, "dir/x/y", b"1"),
            Err(FilesError::WrongKind { .. })
        ));
        assert!(matches!(
            files.open_file(&id, &p("dir")),
            Err(FilesError::WrongKind { .. })
        ));
    }
}
