//! The audit trail's files: a hash chain across records, rotation by size and day, retention,
//! and verification.
//!
//! Every record carries `seq` (1, 2, 3, ... across every file of the trail) and `prev_hash`,
//! the lower-case hex SHA-256 of the previous record's line (its exact bytes without the
//! newline; 64 zeros before the first). Editing, removing or reordering a record therefore
//! breaks the chain at the record after it, which [`verify`] finds. The chain cannot protect
//! the newest records against someone who rewrites the file from there on: forwarding the
//! trail elsewhere as it is written (a SIEM) is what anchors it.
//!
//! The current file is `audit.jsonl`; when it reaches the size limit, or at the first record of
//! a new UTC day, it is renamed to `audit.jsonl.<UTC time>-<seq of its last record>` (e.g.
//! `audit.jsonl.20261207T133529.123Z-000000001042`) and a new one is started, the chain running on across
//! them. Rotated files older than the retention are deleted (then [`verify`] starts the chain
//! at the oldest record left).
//!
//! Durability: each batch of records is written to the kernel before the writer waits for more
//! (nothing is lost to a `kill -9` of the server), and `fdatasync`ed at most a second later, at
//! each rotation and at shutdown (at most a second is lost to a power failure).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// `prev_hash` of the first record of a trail.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Rotation and retention of the trail's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailOptions {
    /// Start a new file past this size (0: never by size).
    pub rotate_bytes: u64,
    /// Start a new file at the first record of each UTC day.
    pub daily: bool,
    /// Delete rotated files older than this (`None`: keep them all).
    pub retention: Option<Duration>,
}

impl Default for TrailOptions {
    fn default() -> Self {
        TrailOptions {
            rotate_bytes: 100 << 20,
            daily: true,
            retention: Some(Duration::from_secs(90 * 24 * 3600)),
        }
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(line: &[u8]) -> String {
    hex(&Sha256::digest(line))
}

/// The UTC day of `t` (`2026-12-07`).
fn day(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned()
}

/// Rotated files of the trail at `path`, oldest first: by the seq of their last record, which
/// their name carries (`audit.jsonl.<UTC time>-<seq>`), never by a clock that may step back.
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut out: Vec<(u64, String, PathBuf)> = std::fs::read_dir(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })
    .into_iter()
    .flatten()
    .flatten()
    .filter_map(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        let suffix = n.strip_prefix(&prefix)?;
        stamp_time(suffix)?;
        let seq = suffix
            .split('-')
            .nth(1)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        Some((seq, suffix.to_owned(), dir.join(&n)))
    })
    .collect();
    out.sort();
    out.into_iter().map(|(_, _, p)| p).collect()
}

/// Every file of the trail, oldest first (the current one last, if it exists).
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut all = rotated_files(path);
    if path.exists() {
        all.push(path.to_path_buf());
    }
    all
}

/// The rotation time a rotated file's name carries (`20261207T133529.123Z-<seq>`).
fn stamp_time(stamp: &str) -> Option<SystemTime> {
    let s = stamp.split('-').next()?;
    if s.len() != 20 || !s.ends_with('Z') {
        return None;
    }
    let b = s.as_bytes();
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}Z",
        std::str::from_utf8(&b[0..4]).ok()?,
        std::str::from_utf8(&b[4..6]).ok()?,
        std::str::from_utf8(&b[6..8]).ok()?,
        std::str::from_utf8(&b[9..11]).ok()?,
        std::str::from_utf8(&b[11..13]).ok()?,
        std::str::from_utf8(&b[13..19]).ok()?,
    );
    humantime::parse_rfc3339(&rfc).ok()
}

fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t)
        .to_string()
        .replace(['-', ':'], "")
}

/// The last complete line of `path` that is a JSON record (a line torn by a crash is
/// skipped), if any in its last MiB.
fn last_line(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(1 << 20);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
        return Ok(None);
    };
    let mut lines: Vec<&[u8]> = buf[..end].split(|&b| b == b'\n').collect();
    if start > 0 && !lines.is_empty() {
        // The first piece may be the end of a longer line.
        lines.remove(0);
    }
    Ok(lines
        .into_iter()
        .rev()
        .find(|l| serde_json::from_slice::<serde_json::Value>(l).is_ok())
        .map(<[u8]>::to_vec))
}

/// The `seq` of a record line (0 for a record from before the chain).
fn seq_of(line: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
        .unwrap_or(0)
}

/// The open end of the trail: where the next record goes and what it chains to.
pub(super) struct Trail {
    path: PathBuf,
    out: BufWriter<File>,
    bytes: u64,
    day: Option<String>,
    seq: u64,
    prev: String,
    opts: TrailOptions,
    last_sync: Instant,
    dirty: bool,
}

/// A record with its place in the chain.
#[derive(Serialize)]
struct Chained<'a, T: Serialize> {
    timestamp: String,
    seq: u64,
    prev_hash: &'a str,
    #[serde(flatten)]
    body: &'a T,
}

impl Trail {
    /// Opens (creating) the trail at `path`, continuing the chain of its last record.
    pub(super) fn open(path: &Path, opts: TrailOptions) -> io::Result<Trail> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .read(true)
            .mode(0o600)
            .open(path)?;
        let mut len = file.metadata()?.len();
        if len > 0 {
            // A record cut short by a crash stays as it is (verify names it); the next one
            // starts on a line of its own.
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
                len += 1;
            }
        }
        let tail = match last_line(path)? {
            Some(l) => Some(l),
            None => match rotated_files(path).last() {
                Some(p) => last_line(p)?,
                None => None,
            },
        };
        let (seq, prev) = match tail {
            Some(l) => (seq_of(&l), digest(&l)),
            None => (0, GENESIS.to_owned()),
        };
        let day = if len > 0 {
            file.metadata()?.modified().ok().map(day)
        } else {
            None
        };
        let trail = Trail {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            bytes: len,
            day,
            seq,
            prev,
            opts,
            last_sync: Instant::now(),
            dirty: false,
        };
        trail.prune();
        Ok(trail)
    }

    /// Appends one record (`body` serializes to a JSON object), rotating first when due.
    pub(super) fn append<T: Serialize>(&mut self, at: SystemTime, body: &T) -> io::Result<()> {
        let today = day(at);
        let by_size = self.opts.rotate_bytes > 0 && self.bytes >= self.opts.rotate_bytes;
        let by_day = self.opts.daily && self.day.as_ref().is_some_and(|d| *d != today);
        if self.bytes > 0 && (by_size || by_day) {
            self.rotate()?;
        }
        let record = Chained {
            timestamp: humantime::format_rfc3339_millis(at).to_string(),
            seq: self.seq + 1,
            prev_hash: &self.prev,
            body,
        };
        let mut line = serde_json::to_vec(&record).map_err(io::Error::other)?;
        let hash = digest(&line);
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.seq += 1;
        self.prev = hash;
        self.bytes += line.len() as u64;
        self.day.get_or_insert(today);
        self.dirty = true;
        Ok(())
    }

    /// Hands what was appended to the kernel; `fdatasync` at most once a second (always with
    /// `sync`).
    pub(super) fn flush(&mut self, sync: bool) -> io::Result<()> {
        self.out.flush()?;
        if self.dirty && (sync || self.last_sync.elapsed() >= Duration::from_secs(1)) {
            self.out.get_ref().sync_data()?;
            self.last_sync = Instant::now();
            self.dirty = false;
        }
        Ok(())
    }

    /// Renames the current file away and starts a new one.
    fn rotate(&mut self) -> io::Result<()> {
        self.flush(true)?;
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        // The seq of its last record orders it among the others.
        let base = format!("{name}.{}-{:012}", stamp(SystemTime::now()), self.seq);
        let mut target = self.path.with_file_name(&base);
        let mut n = 1;
        while target.exists() {
            target = self.path.with_file_name(format!("{base}-{n}"));
            n += 1;
        }
        std::fs::rename(&self.path, &target)?;
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .read(true)
            .mode(0o600)
            .open(&self.path)?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })
        {
            let _ = d.sync_all();
        }
        self.out = BufWriter::new(file);
        self.bytes = 0;
        self.day = None;
        tracing::info!(rotated = %target.display(), "audit trail rotated");
        self.prune();
        Ok(())
    }

    /// Deletes rotated files past the retention.
    fn prune(&self) {
        let Some(keep) = self.opts.retention else {
            return;
        };
        let now = SystemTime::now();
        for f in rotated_files(&self.path) {
            let name = f
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let Some(t) = name.rsplit_once('.').and_then(|_| {
                let prefix = format!(
                    "{}.",
                    self.path.file_name().unwrap_or_default().to_string_lossy()
                );
                name.strip_prefix(&prefix).and_then(stamp_time)
            }) else {
                continue;
            };
            if now.duration_since(t).is_ok_and(|age| age > keep) {
                match std::fs::remove_file(&f) {
                    Ok(()) => {
                        tracing::info!(file = %f.display(), "audit file past retention deleted")
                    }
                    Err(e) => {
                        tracing::warn!(file = %f.display(), error = %e, "cannot delete an audit file past retention")
                    }
                }
            }
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Files read, oldest first.
    pub files: Vec<PathBuf>,
    /// Records read.
    pub records: u64,
    /// Records from before the chain existed (no `seq`), not verifiable.
    pub unchained: u64,
    /// The first and last `seq` seen.
    pub first_seq: Option<u64>,
    /// The last `seq` seen.
    pub last_seq: Option<u64>,
    /// The hash of the last record (to anchor the trail elsewhere).
    pub last_hash: Option<String>,
    /// Where the chain starts later than seq 1 because older files were deleted by the
    /// retention (not a problem).
    pub starts_after_retention: bool,
    /// Every break of the chain: `file:line: what`.
    pub problems: Vec<String>,
}

/// Checks the whole chain of the trail at `path` (every rotated file, then the current one).
pub fn verify(path: &Path) -> io::Result<Verification> {
    let mut v = Verification {
        files: files(path),
        ..Verification::default()
    };
    let mut prev: Option<(u64, String)> = None;
    let mut in_chain = false;
    let files = v.files.clone();
    for (fi, f) in files.iter().enumerate() {
        let mut r = BufReader::new(File::open(f)?);
        let mut n = 0usize;
        loop {
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            n += 1;
            let at = format!("{}:{n}", f.display());
            if line.last() != Some(&b'\n') {
                v.problems
                    .push(format!("{at}: an incomplete record (cut short by a crash)"));
                break;
            }
            line.pop();
            if line.is_empty() {
                continue;
            }
            v.records += 1;
            let Ok(rec) = serde_json::from_slice::<serde_json::Value>(&line) else {
                // Torn by a crash, or garbage: the writer went on from the last record, and
                // one that replaced a record breaks the chain at the next.
                v.problems.push(format!("{at}: not a JSON record"));
                continue;
            };
            let hash = digest(&line);
            let (Some(seq), Some(ph)) = (
                rec.get("seq").and_then(|s| s.as_u64()),
                rec.get("prev_hash").and_then(|s| s.as_str()),
            ) else {
                if in_chain {
                    v.problems.push(format!(
                        "{at}: a record without seq/prev_hash inside the chain"
                    ));
                }
                // A record from before the chain: the first chained one links to it.
                v.unchained += 1;
                prev = Some((0, hash));
                continue;
            };
            in_chain = true;
            match &prev {
                Some((pseq, phash)) => {
                    if ph != phash {
                        v.problems.push(format!(
                            "{at}: seq {seq} does not follow the record before it (that record, \
                             or one between them, was edited, removed or reordered)"
                        ));
                    } else if seq != pseq + 1 {
                        v.problems.push(format!("{at}: seq {seq} after seq {pseq}"));
                    }
                }
                None if ph == GENESIS && seq == 1 => {}
                None if fi == 0 && n == 1 => v.starts_after_retention = true,
                None => v.problems.push(format!(
                    "{at}: seq {seq} chains to a record that is not there"
                )),
            }
            v.first_seq.get_or_insert(seq);
            v.last_seq = Some(seq);
            v.last_hash = Some(hash.clone());
            prev = Some((seq, hash));
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Ev {
        event: &'static str,
        n: u64,
    }

    fn write(path: &Path, opts: TrailOptions, range: std::ops::Range<u64>, at: SystemTime) {
        let mut t = Trail::open(path, opts).unwrap();
        for n in range {
            t.append(at, &Ev { event: "e", n }).unwrap();
        }
        t.flush(true).unwrap();
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn rewrite(path: &Path, lines: &[String]) {
        let mut s = lines.join("\n");
        s.push('\n');
        std::fs::write(path, s).unwrap();
    }

    fn no_rotation() -> TrailOptions {
        TrailOptions {
            rotate_bytes: 0,
            daily: false,
            retention: None,
        }
    }

    #[test]
    fn records_chain_and_verify_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        write(&p, no_rotation(), 0..3, SystemTime::now());
        write(&p, no_rotation(), 3..5, SystemTime::now());
        let l = lines(&p);
        assert_eq!(l.len(), 5);
        let first: serde_json::Value = serde_json::from_str(&l[0]).unwrap();
        assert_eq!(
            (first["seq"].as_u64(), first["prev_hash"].as_str()),
            (Some(1), Some(GENESIS))
        );
        let v = verify(&p).unwrap();
        assert_eq!(v.problems, Vec::<String>::new());
        assert_eq!((v.records, v.first_seq, v.last_seq), (5, Some(1), Some(5)));
        assert_eq!(
            v.last_hash.as_deref(),
            Some(digest(l[4].as_bytes()).as_str())
        );
    }

    #[test]
    fn an_edited_removed_or_reordered_record_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        write(&p, no_rotation(), 0..6, SystemTime::now());
        let good = lines(&p);
        // Edited: one character of record 3 (its content, keeping valid JSON).
        let mut edited = good.clone();
        edited[2] = edited[2].replace("\"n\":2", "\"n\":9");
        rewrite(&p, &edited);
        let v = verify(&p).unwrap();
        assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
        assert!(
            v.problems[0].contains(":4: seq 4 does not follow"),
            "{:?}",
            v.problems
        );
        // Removed: record 4.
        let mut removed = good.clone();
        removed.remove(3);
        rewrite(&p, &removed);
        let v = verify(&p).unwrap();
        assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
        assert!(v.problems[0].contains(":4: seq 5"), "{:?}", v.problems);
        // Reordered: records 2 and 3 swapped.
        let mut swapped = good.clone();
        swapped.swap(1, 2);
        rewrite(&p, &swapped);
        assert!(!verify(&p).unwrap().problems.is_empty());
        // The first record removed: it no longer starts at the genesis.
        rewrite(&p, &good[1..]);
        let v = verify(&p).unwrap();
        assert!(v.starts_after_retention && v.problems.is_empty(), "{v:?}");
        rewrite(&p, &good);
        assert!(verify(&p).unwrap().problems.is_empty());
    }

    #[test]
    fn rotation_by_size_and_day_keeps_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let opts = TrailOptions {
            rotate_bytes: 300,
            daily: true,
            retention: None,
        };
        let day1 = humantime::parse_rfc3339("2026-12-05T10:00:00Z").unwrap();
        let day2 = humantime::parse_rfc3339("2026-12-06T10:00:00Z").unwrap();
        write(&p, opts.clone(), 0..2, day1);
        // A new day starts a new file even below the size limit.
        write(&p, opts.clone(), 2..3, day2);
        assert_eq!(rotated_files(&p).len(), 1);
        write(&p, opts.clone(), 3..20, day2);
        let rotated = rotated_files(&p);
        assert!(rotated.len() >= 3, "{rotated:?}");
        let v = verify(&p).unwrap();
        assert_eq!(v.problems, Vec::<String>::new());
        assert_eq!(
            (v.records, v.last_seq, v.files.len()),
            (20, Some(20), rotated.len() + 1)
        );
        // Every rotated file is private to the server.
        use std::os::unix::fs::PermissionsExt;
        for f in files(&p) {
            assert_eq!(
                f.metadata().unwrap().permissions().mode() & 0o777,
                0o600,
                "{f:?}"
            );
        }
    }

    #[test]
    fn retention_deletes_old_rotated_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        write(&p, no_rotation(), 0..2, SystemTime::now());
        let old = dir.path().join("audit.jsonl.20200101T000000.000Z");
        let young = dir
            .path()
            .join(format!("audit.jsonl.{}", stamp(SystemTime::now())));
        std::fs::copy(&p, &old).unwrap();
        std::fs::copy(&p, &young).unwrap();
        let unrelated = dir.path().join("audit.jsonl.bak");
        std::fs::write(&unrelated, "mine\n").unwrap();
        let opts = TrailOptions {
            retention: Some(Duration::from_secs(90 * 24 * 3600)),
            ..no_rotation()
        };
        drop(Trail::open(&p, opts).unwrap());
        assert!(!old.exists() && young.exists() && unrelated.exists() && p.exists());
    }

    #[test]
    fn a_record_cut_short_by_a_crash_is_named_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        write(&p, no_rotation(), 0..3, SystemTime::now());
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"timestamp\":\"2026-").unwrap();
        drop(f);
        write(&p, no_rotation(), 3..5, SystemTime::now());
        let l = lines(&p);
        assert_eq!(l.len(), 6);
        let v = verify(&p).unwrap();
        // The torn line is named; the records after it chain to the last whole one before it.
        assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
        assert!(
            v.problems[0].contains(":4: not a JSON record"),
            "{:?}",
            v.problems
        );
        let after: serde_json::Value = serde_json::from_str(&l[4]).unwrap();
        assert_eq!(after["seq"], 4);
        assert_eq!(after["prev_hash"], digest(l[2].as_bytes()));
    }

    #[test]
    fn records_from_before_the_chain_lead_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        std::fs::write(
            &p,
            "{\"timestamp\":\"2026-11-01T00:00:00.000Z\",\"event\":\"sandbox_started\"}\n",
        )
        .unwrap();
        write(&p, no_rotation(), 0..2, SystemTime::now());
        let v = verify(&p).unwrap();
        assert_eq!(v.problems, Vec::<String>::new());
        assert_eq!((v.unchained, v.first_seq), (1, Some(1)));
    }
}
