//! Unit tests of the cgroup layouts against a temporary directory: the exact writes.
use super::*;
use pretty_assertions::assert_eq;
use std::sync::Mutex;

/// Records writes and delegates to the real file system under a temp root.
#[derive(Debug, Default)]
struct Recording {
    writes: Mutex<Vec<(PathBuf, String)>>,
    /// Paths whose first write fails with EBUSY (like a v2 cgroup with processes).
    busy_once: Mutex<Vec<PathBuf>>,
}

impl CgroupFs for Recording {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        StdCgroupFs.create_dir_all(path)
    }
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let mut busy = self.busy_once.lock().unwrap();
        if let Some(i) = busy.iter().position(|p| p == path) {
            busy.remove(i);
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        drop(busy);
        self.writes
            .lock()
            .unwrap()
            .push((path.to_path_buf(), value.to_owned()));
        std::fs::write(path, value)
    }
    fn read(&self, path: &Path) -> io::Result<String> {
        StdCgroupFs.read(path)
    }
    // Directories here hold plain files (not cgroupfs control files), so rmdir alone
    // would fail.
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }
    fn exists(&self, path: &Path) -> bool {
        StdCgroupFs.exists(path)
    }
    fn list_dirs(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        StdCgroupFs.list_dirs(path)
    }
    fn chown(&self, path: &Path, _uid: u32, _gid: u32) -> io::Result<()> {
        self.writes
            .lock()
            .unwrap()
            .push((path.to_path_buf(), "chown".to_owned()));
        Ok(())
    }
    fn open_dir(&self, path: &Path) -> io::Result<std::fs::File> {
        StdCgroupFs.open_dir(path)
    }
}

const HYBRID: &str = "9:name=systemd:/\n8:pids:/\n4:memory:/svc/x\n1:cpu:/\n0::/\n";

fn limits() -> ResourceLimits {
    ResourceLimits {
        memory_bytes: Some(64 << 20),
        cpu_quota_us: Some(50_000),
        cpu_shares: Some(512),
        pids_limit: Some(50),
    }
}

#[test]
fn service_path_parsing() {
    assert_eq!(service_path(HYBRID, "memory").as_deref(), Some("svc/x"));
    assert_eq!(service_path(HYBRID, "pids").as_deref(), Some(""));
    assert_eq!(service_path(HYBRID, "").as_deref(), Some(""));
    assert_eq!(service_path(HYBRID, "blkio"), None);
}

#[test]
fn v1_hybrid_writes_exactly_the_limits() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for c in ["memory", "pids", "cpu", "unified"] {
        std::fs::create_dir_all(r.join(c)).unwrap();
        std::fs::write(r.join(c).join("cgroup.procs"), "").unwrap();
    }
    let fs = Arc::new(Recording::default());
    let m = CgroupManager::detect(fs.clone(), r, HYBRID, "agentfense").unwrap();
    assert_eq!(
        m.layout(),
        &Layout::V1(V1 {
            memory: Some(r.join("memory/svc/x/agentfense")),
            pids: Some(r.join("pids/agentfense")),
            cpu: Some(r.join("cpu/agentfense")),
            unified: Some(r.join("unified/agentfense")),
        })
    );
    let cg = m.create("sb1", &limits()).unwrap();
    let writes = fs.writes.lock().unwrap().clone();
    let rel: Vec<(String, String)> = writes
        .into_iter()
        .map(|(p, v)| (p.strip_prefix(r).unwrap().display().to_string(), v))
        .collect();
    let want = vec![
        (
            "memory/svc/x/agentfense/sb1/memory.limit_in_bytes",
            "67108864",
        ),
        ("pids/agentfense/sb1/pids.max", "50"),
        ("cpu/agentfense/sb1/cpu.cfs_period_us", "100000"),
        ("cpu/agentfense/sb1/cpu.cfs_quota_us", "50000"),
        ("cpu/agentfense/sb1/cpu.shares", "512"),
    ];
    let want: Vec<(String, String)> = want
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
    assert_eq!(rel, want);
    assert_eq!(
        cg.procs_files(),
        vec![
            r.join("memory/svc/x/agentfense/sb1/cgroup.procs"),
            r.join("pids/agentfense/sb1/cgroup.procs"),
            r.join("cpu/agentfense/sb1/cgroup.procs"),
            r.join("unified/agentfense/sb1/cgroup.procs"),
        ]
    );
    std::fs::write(
        r.join("memory/svc/x/agentfense/sb1/memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
    )
    .unwrap();
    std::fs::write(r.join("pids/agentfense/sb1/pids.events"), "max 7\n").unwrap();
    assert_eq!(
        cg.counters(),
        LimitCounters {
            oom_kills: 3,
            pids_max: 7
        }
    );
    // Per-command cgroups live in the unified hierarchy.
    let mut ex = cg.exec_cgroup("e7").unwrap().unwrap();
    assert_eq!(ex.dir(), r.join("unified/agentfense/sb1/e7"));
    assert!(
        ex.take_handle()
            .is_some_and(|f| f.metadata().unwrap().is_dir())
    );
    assert!(ex.take_handle().is_none());
    std::fs::write(r.join("unified/agentfense/sb1/e7/cgroup.kill"), "").unwrap();
    ex.kill();
    assert_eq!(
        fs.writes.lock().unwrap().last().unwrap(),
        &(
            r.join("unified/agentfense/sb1/e7/cgroup.kill"),
            "1".to_owned()
        )
    );
    // kill_all prefers cgroup.kill of the unified hierarchy.
    std::fs::write(r.join("unified/agentfense/sb1/cgroup.kill"), "").unwrap();
    cg.kill_all();
    assert_eq!(
        fs.writes.lock().unwrap().last().unwrap(),
        &(r.join("unified/agentfense/sb1/cgroup.kill"), "1".to_owned())
    );
}

#[test]
fn v2_writes_exactly_the_limits() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::write(r.join("cgroup.controllers"), "memory pids cpu").unwrap();
    std::fs::create_dir_all(r.join("srv")).unwrap();
    let fs = Arc::new(Recording::default());
    let m = CgroupManager::detect(fs.clone(), r, "0::/srv\n", "agentfense").unwrap();
    assert_eq!(
        m.layout(),
        &Layout::V2(V2 {
            base: r.join("srv/agentfense")
        })
    );
    let _cg = m.create("sb1", &limits()).unwrap();
    let rel: Vec<(String, String)> = fs
        .writes
        .lock()
        .unwrap()
        .iter()
        .map(|(p, v)| (p.strip_prefix(r).unwrap().display().to_string(), v.clone()))
        .collect();
    let want: Vec<(String, String)> = [
        ("srv/cgroup.subtree_control", "+memory +pids +cpu"),
        (
            "srv/agentfense/cgroup.subtree_control",
            "+memory +pids +cpu",
        ),
        ("srv/agentfense/sb1/memory.max", "67108864"),
        ("srv/agentfense/sb1/pids.max", "50"),
        ("srv/agentfense/sb1/cpu.max", "50000 100000"),
        ("srv/agentfense/sb1/cpu.weight", "20"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(rel, want);
}

#[test]
fn v2_moves_the_server_out_of_its_busy_cgroup() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::write(r.join("cgroup.controllers"), "memory pids cpu").unwrap();
    std::fs::create_dir_all(r.join("srv")).unwrap();
    std::fs::write(r.join("srv/cgroup.procs"), "41\n42\n").unwrap();
    let fs = Arc::new(Recording::default());
    fs.busy_once
        .lock()
        .unwrap()
        .push(r.join("srv/cgroup.subtree_control"));
    let m = CgroupManager::detect(fs.clone(), r, "0::/srv\n", "agentfense").unwrap();
    let _cg = m.create("sb1", &ResourceLimits::default()).unwrap();
    let rel: Vec<(String, String)> = fs
        .writes
        .lock()
        .unwrap()
        .iter()
        .map(|(p, v)| (p.strip_prefix(r).unwrap().display().to_string(), v.clone()))
        .collect();
    let want: Vec<(String, String)> = [
        ("srv/agentfense-server/cgroup.procs", "41"),
        ("srv/agentfense-server/cgroup.procs", "42"),
        ("srv/cgroup.subtree_control", "+memory +pids +cpu"),
        (
            "srv/agentfense/cgroup.subtree_control",
            "+memory +pids +cpu",
        ),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(rel, want);
}

#[test]
fn no_limits_writes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("pids")).unwrap();
    std::fs::write(r.join("pids/cgroup.procs"), "").unwrap();
    let fs = Arc::new(Recording::default());
    let m = CgroupManager::detect(fs.clone(), r, HYBRID, "af").unwrap();
    let cg = m.create("sb", &ResourceLimits::default()).unwrap();
    assert!(fs.writes.lock().unwrap().is_empty());
    assert_eq!(cg.procs_files(), vec![r.join("pids/af/sb/cgroup.procs")]);
    // A memory limit without a memory controller fails closed.
    let err = m
        .create(
            "sb2",
            &ResourceLimits {
                memory_bytes: Some(1),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, RuntimeError::CgroupsUnavailable { .. }));
}

#[test]
fn weight_conversion() {
    assert_eq!(shares_to_weight(1024), 39);
    assert_eq!(shares_to_weight(2), 1);
    assert_eq!(shares_to_weight(262_144), 10_000);
}

#[test]
fn remove_stale_removes_only_sandbox_cgroups() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("memory/svc/agentfense");
    for d in ["sb-sb_1/cmd-1", "sb-sb_2", "other"] {
        std::fs::create_dir_all(base.join(d)).unwrap();
    }
    let mgr = CgroupManager {
        fs: Arc::new(StdCgroupFs),
        layout: Arc::new(Layout::V1(V1 {
            memory: Some(base.clone()),
            pids: None,
            cpu: None,
            unified: None,
        })),
    };
    let mut removed = mgr.remove_stale();
    removed.sort();
    assert_eq!(removed, vec![base.join("sb-sb_1"), base.join("sb-sb_2")]);
    assert!(base.join("other").exists());
    assert!(!base.join("sb-sb_1").exists());
}
