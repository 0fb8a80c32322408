//! Case-insensitive codebases (issue 24, finding 1). This kernel has no ext4 casefold, so the
//! codebase is served by [`CaseMirror`], a small read-only FUSE mirror that resolves names
//! the way APFS, vfat or a casefolded directory does: `.ENV` opens the entry stored as `.env`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentfense_core::{Level, PermissionRule, Policy, presets};
use agentfense_fs::{FsConfig, PublishMode, mount};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, Request,
};

use super::util::{Mnt, require_fuse, write};

const TTL: Duration = Duration::from_secs(1);

/// Inode numbers are indexes into `paths` (1 = the root).
struct CaseMirror {
    paths: Mutex<Vec<PathBuf>>,
}

impl CaseMirror {
    fn path(&self, ino: INodeNo) -> Option<PathBuf> {
        let paths = self.paths.lock().unwrap();
        usize::try_from(ino.0 - 1)
            .ok()
            .and_then(|i| paths.get(i).cloned())
    }

    fn ino(&self, p: &Path) -> INodeNo {
        let mut paths = self.paths.lock().unwrap();
        let i = paths.iter().position(|q| q == p).unwrap_or_else(|| {
            paths.push(p.to_path_buf());
            paths.len() - 1
        });
        INodeNo(i as u64 + 1)
    }

    fn attr(&self, p: &Path) -> std::io::Result<FileAttr> {
        let m = std::fs::symlink_metadata(p)?;
        let kind = if m.is_dir() {
            FileType::Directory
        } else if m.file_type().is_symlink() {
            FileType::Symlink
        } else {
            FileType::RegularFile
        };
        let t = |s: i64| UNIX_EPOCH + Duration::from_secs(s.max(0) as u64);
        Ok(FileAttr {
            ino: self.ino(p),
            size: m.len(),
            blocks: m.blocks(),
            atime: t(m.atime()),
            mtime: t(m.mtime()),
            ctime: t(m.ctime()),
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm: (m.mode() & 0o7777) as u16,
            nlink: 1,
            uid: m.uid(),
            gid: m.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

fn errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(5))
}

impl Filesystem for CaseMirror {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(dir) = self.path(parent) else {
            return reply.error(Errno::ENOENT);
        };
        let want = name.to_string_lossy().to_lowercase();
        let found = std::fs::read_dir(&dir).ok().and_then(|mut it| {
            it.find_map(|e| {
                let e = e.ok()?;
                (e.file_name().to_string_lossy().to_lowercase() == want).then(|| e.path())
            })
        });
        match found.map(|p| self.attr(&p)) {
            Some(Ok(a)) => reply.entry(&TTL, &a, Generation(0)),
            Some(Err(e)) => reply.error(errno(&e)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path(ino).map(|p| self.attr(&p)) {
            Some(Ok(a)) => reply.attr(&TTL, &a),
            Some(Err(e)) => reply.error(errno(&e)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.path(ino).map(std::fs::read_link) {
            Some(Ok(t)) => reply.data(t.as_os_str().as_bytes()),
            Some(Err(e)) => reply.error(errno(&e)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(p) = self.path(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut buf = vec![0; size as usize];
        match std::fs::File::open(p).and_then(|f| f.read_at(&mut buf, offset)) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(dir) = self.path(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut entries: Vec<(OsString, PathBuf)> = match std::fs::read_dir(&dir) {
            Ok(it) => it.flatten().map(|e| (e.file_name(), e.path())).collect(),
            Err(e) => return reply.error(errno(&e)),
        };
        entries.sort();
        for (i, (name, p)) in entries.iter().enumerate().skip(offset as usize) {
            let Ok(a) = self.attr(p) else { continue };
            if reply.add(a.ino, i as u64 + 1, a.kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// `backing` served case-insensitively at `at` while the value lives.
struct Mirror(#[allow(dead_code)] fuser::BackgroundSession);

fn mirror(backing: &Path, at: &Path) -> Mirror {
    std::fs::create_dir_all(at).unwrap();
    let fs = CaseMirror {
        paths: Mutex::new(vec![backing.to_path_buf()]),
    };
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("casemirror".into()),
    ];
    let s = fuser::spawn_mount(fs, at, &cfg).unwrap();
    for _ in 0..100 {
        if std::fs::read_dir(at).is_ok_and(|mut d| d.next().is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Mirror(s)
}

#[test]
fn other_spellings_on_a_case_insensitive_codebase_are_absent() {
    require_fuse!("other_spellings_on_a_case_insensitive_codebase_are_absent");
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    for p in [
        ".env",
        "secrets/db.txt",
        "server.key",
        "id_rsa",
        "src/main.py",
        "private/plan.txt",
        "src/Notes.txt",
        "src/Тайна.txt",
    ] {
        write(&backing, p, &format!("LEAK {p}\n"));
    }
    write(&backing, "README.md", "readme\n");
    // Names whose case cannot be probed faithfully, which the attacker looks up first.
    for dir in ["", "src", "private"] {
        std::fs::write(backing.join(dir).join("ı"), "").unwrap();
    }
    let lower = dir.path().join("lower");
    let _mirror = mirror(&backing, &lower);
    // The mirror itself is case-insensitive: the attack's premise.
    assert_eq!(
        std::fs::read_to_string(lower.join(".ENV")).unwrap(),
        "LEAK .env\n"
    );
    std::fs::create_dir_all(dir.path().join("mnt")).unwrap();
    // agent-safe (secret names in any case) plus the user's own exact rules.
    let mut rules = presets::get("agent-safe").unwrap().rules();
    rules.push(PermissionRule::glob("/private/**", Level::None, 50));
    rules.push(PermissionRule::glob("/src/Notes.txt", Level::None, 50));
    rules.push(PermissionRule::glob("/src/Тайна.txt", Level::None, 50));
    let mut cfg = FsConfig::new(
        "sb-case",
        &lower,
        dir.path().join("delta"),
        dir.path().join("mnt"),
        Policy::compile(rules).unwrap(),
    );
    cfg.publish_mode = PublishMode::Explicit;
    let m = Mnt {
        handle: Some(mount(cfg).unwrap()),
        dir,
    };
    // A first lookup of a name whose case cannot be probed faithfully (not UTF-8, or `ı`)
    // must not teach the mount that a directory does not fold.
    m.sh("stat ı src/ı; true");
    let (_, out, err) = m.sh(
        "cat .ENV SECRETS/db.txt server.KEY ID_RSA Secrets/DB.TXT PRIVATE/plan.txt \
         Private/PLAN.TXT src/notes.txt src/NOTES.TXT SRC/Notes.txt src/тайна.txt src/ТАЙНА.txt; \
         ls -a",
    );
    assert!(!out.contains("LEAK") && !err.contains("LEAK"), "{out}{err}");
    for p in [
        ".ENV",
        "SECRETS",
        "server.KEY",
        "ID_RSA",
        "PRIVATE",
        "src/notes.txt",
        "readme.MD",
        "SRC",
    ] {
        assert_eq!(m.py(&format!("os.stat({p:?})")), "ENOENT", "{p}");
    }
    // The stored spellings work as on any codebase.
    assert_eq!(
        m.ok("cat README.md src/main.py"),
        "readme\nLEAK src/main.py\n"
    );
    assert_eq!(m.ok("ls -A | grep -v ı"), "README.md\nsrc\n");
    assert_eq!(m.ok("ls -A src | grep -v ı"), "main.py\n");
}
