//! Git-compatible unified diffs of a list of per-path changes, binaries included.
//!
//! [`render`] writes what `git diff --binary --full-index` would write for the same changes,
//! so that `git apply` (run at the root of a copy of the old tree) reproduces the new tree
//! byte for byte, executable bits and symlink targets included. It is a pure function: it
//! takes the contents, never touches the file system, and never fails.
//!
//! What it follows from git's own output, because `git apply` relies on it:
//! * names are `a/<path>` and `b/<path>`, C-quoted as with `core.quotePath=true` when the path
//!   has a control byte, `"`, `\` or a byte >= 0x80; a `---`/`+++` name with a space ends with
//!   a tab;
//! * every section with content has an `index` line with full 40-hex blob ids (a binary patch
//!   is refused without them, and `git apply` checks the result against the new id); a
//!   mode-only change has no `index` line, as in git;
//! * an added or deleted empty file has neither `---`/`+++` lines nor hunks;
//! * a change between a symlink and anything else is a deletion followed by an addition;
//! * a binary side (a NUL in the first 8000 bytes, [`is_binary`]) makes a `GIT binary patch`
//!   with `literal` blocks (zlib, then git's base85) for the new content and for the old one.
//!
//! Hunks come from a line diff (lines end at `\n`, any bytes allowed) with
//! [`PatchOptions::context`] lines of context. `git apply` needs context to place hunks: a
//! patch rendered with `context: 0` applies only with `git apply --unidiff-zero`.

use std::io::{self, Write as _};
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::ZlibEncoder;
use sha1::{Digest as _, Sha1};
use similar::{Algorithm, DiffOp, DiffTag};

/// Lines of context around each hunk unless told otherwise (as `git diff`).
pub const DEFAULT_CONTEXT: usize = 3;

/// Cap on a patch's size unless told otherwise.
pub const DEFAULT_MAX_BYTES: usize = 16 << 20;

/// How much of a file [`is_binary`] looks at (git's `FIRST_FEW_BYTES`).
const BINARY_PROBE: usize = 8000;

/// Time one file's line diff may take before the rest of it is written as plain removals and
/// additions (still a correct patch, only a less minimal one), so that a huge rewritten file
/// cannot stall a review.
const DIFF_DEADLINE: Duration = Duration::from_secs(2);

/// Bytes of compressed data on one base85 line of a binary patch.
const BASE85_LINE: usize = 52;

/// Git's base85 digits (RFC 1924 order).
const BASE85: &[u8; 85] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~";

/// The blob id of an absent side.
const NULL_ID: [u8; 20] = [0; 20];

/// One side of a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// Git's kind of entry.
    pub mode: GitMode,
    /// The file's content; for a symlink, its target.
    pub bytes: Vec<u8>,
}

/// The modes git records for a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GitMode {
    /// A regular file, `100644`.
    File,
    /// A regular file with an execute bit, `100755`.
    Executable,
    /// A symbolic link, `120000`.
    Symlink,
}

impl GitMode {
    /// The mode git gives an entry: a symlink, or a file that is executable when any of the
    /// execute bits of `perm` is set (the rest of `perm` is ignored).
    pub fn of(kind_is_symlink: bool, perm: u32) -> GitMode {
        if kind_is_symlink {
            GitMode::Symlink
        } else if perm & 0o111 != 0 {
            GitMode::Executable
        } else {
            GitMode::File
        }
    }

    /// The mode as git writes it.
    pub fn octal(self) -> &'static str {
        match self {
            GitMode::File => "100644",
            GitMode::Executable => "100755",
            GitMode::Symlink => "120000",
        }
    }
}

/// A path and what it was and became; `None` is an absent side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileChange<'a> {
    /// Relative to the root of the tree, without a leading `/`; any bytes.
    pub path: &'a [u8],
    /// Before the change; `None`: the file is added.
    pub old: Option<&'a Blob>,
    /// After the change; `None`: the file is deleted.
    pub new: Option<&'a Blob>,
}

/// How [`render`] writes a patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchOptions {
    /// Lines of context around each hunk ([`DEFAULT_CONTEXT`]). Below 1 the patch needs
    /// `git apply --unidiff-zero`.
    pub context: usize,
    /// The most bytes the patch may take ([`DEFAULT_MAX_BYTES`]). A file that would go past
    /// it is left out with everything after it, and the patch is marked truncated.
    pub max_bytes: usize,
}

impl Default for PatchOptions {
    fn default() -> Self {
        PatchOptions {
            context: DEFAULT_CONTEXT,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// A rendered patch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Patch {
    /// The patch text, for `git apply`. Not UTF-8 in general (contents are raw).
    pub text: Vec<u8>,
    /// Whether changes were left out to stay within [`PatchOptions::max_bytes`]. The text
    /// still applies: it holds whole sections only, those of the changes before the first
    /// one left out.
    pub truncated: bool,
    /// How many file sections (`diff --git` headers) the text holds. Identical sides make
    /// none; a change between a symlink and another kind makes two.
    pub files: usize,
}

/// Renders `changes`, in the order given, as one patch (see the module docs).
///
/// Changes with both sides absent, or with identical sides, are skipped. Rendering stops
/// before the first change whose sections would take the text past `opts.max_bytes`.
pub fn render(changes: &[FileChange<'_>], opts: &PatchOptions) -> Patch {
    let mut patch = Patch::default();
    let mut section = Vec::new();
    for change in changes {
        section.clear();
        let budget = opts.max_bytes.saturating_sub(patch.text.len());
        let sections = match render_change(change, opts.context, budget, &mut section) {
            Ok(sections) => sections,
            // Compressing into memory does not fail; if it ever did, the patch would
            // rather end here, marked, than lose a file silently.
            Err(_) => {
                patch.truncated = true;
                break;
            }
        };
        if section.len() > budget {
            patch.truncated = true;
            break;
        }
        patch.text.extend_from_slice(&section);
        patch.files += sections;
    }
    patch
}

/// Whether git takes `bytes` for binary content: a NUL in the first 8000 bytes.
pub fn is_binary(bytes: &[u8]) -> bool {
    bytes.iter().take(BINARY_PROBE).any(|&b| b == 0)
}

/// Git's id of a blob with this content: the SHA-1 of `blob <len>\0` and the content.
pub fn git_blob_sha1(bytes: &[u8]) -> [u8; 20] {
    let mut hasher = Sha1::new();
    hasher.update(format!("blob {}\0", bytes.len()).as_bytes());
    hasher.update(bytes);
    hasher.finalize().into()
}

/// Writes the sections of one change to `out` and returns how many. Stops early, leaving
/// `out` longer than `budget`, once it is clear the change does not fit.
fn render_change(
    change: &FileChange<'_>,
    context: usize,
    budget: usize,
    out: &mut Vec<u8>,
) -> io::Result<usize> {
    match (change.old, change.new) {
        (None, None) => Ok(0),
        (Some(old), Some(new)) if old == new => Ok(0),
        (Some(old), Some(new))
            if (old.mode == GitMode::Symlink) != (new.mode == GitMode::Symlink) =>
        {
            write_section(change.path, Some(old), None, context, budget, out)?;
            write_section(change.path, None, Some(new), context, budget, out)?;
            Ok(2)
        }
        (old, new) => {
            write_section(change.path, old, new, context, budget, out)?;
            Ok(1)
        }
    }
}

/// Writes one `diff --git` section; at least one side is present and the sides differ.
fn write_section(
    path: &[u8],
    old: Option<&Blob>,
    new: Option<&Blob>,
    context: usize,
    budget: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let a_name = quote_name(b"a/", path);
    let b_name = quote_name(b"b/", path);
    out.extend_from_slice(b"diff --git ");
    out.extend_from_slice(&a_name);
    out.push(b' ');
    out.extend_from_slice(&b_name);
    out.push(b'\n');
    match (old, new) {
        (None, Some(new)) => writeln!(out, "new file mode {}", new.mode.octal())?,
        (Some(old), None) => writeln!(out, "deleted file mode {}", old.mode.octal())?,
        (Some(old), Some(new)) if old.mode != new.mode => {
            writeln!(out, "old mode {}", old.mode.octal())?;
            writeln!(out, "new mode {}", new.mode.octal())?;
            if old.bytes == new.bytes {
                return Ok(());
            }
        }
        _ => {}
    }

    out.extend_from_slice(b"index ");
    push_hex(out, &old.map_or(NULL_ID, |b| git_blob_sha1(&b.bytes)));
    out.extend_from_slice(b"..");
    push_hex(out, &new.map_or(NULL_ID, |b| git_blob_sha1(&b.bytes)));
    if let (Some(old), Some(new)) = (old, new)
        && old.mode == new.mode
    {
        write!(out, " {}", old.mode.octal())?;
    }
    out.push(b'\n');

    let old_bytes = old.map_or(&[][..], |b| &b.bytes);
    let new_bytes = new.map_or(&[][..], |b| &b.bytes);
    if is_binary(old_bytes) || is_binary(new_bytes) {
        out.extend_from_slice(b"GIT binary patch\n");
        write_literal(new_bytes, out)?;
        if out.len() > budget {
            return Ok(());
        }
        return write_literal(old_bytes, out);
    }

    let old_lines: Vec<&[u8]> = old_bytes.split_inclusive(|&b| b == b'\n').collect();
    let new_lines: Vec<&[u8]> = new_bytes.split_inclusive(|&b| b == b'\n').collect();
    let hunks = similar::group_diff_ops(line_diff(&old_lines, &new_lines), context);
    if hunks.is_empty() {
        // An empty file added or deleted: git writes no file names and no hunk.
        return Ok(());
    }

    write_file_label(out, b"--- ", old.map(|_| &a_name[..]));
    write_file_label(out, b"+++ ", new.map(|_| &b_name[..]));
    for hunk in &hunks {
        let (Some(first), Some(last)) = (hunk.first(), hunk.last()) else {
            continue;
        };
        let old_range = first.old_range().start..last.old_range().end;
        let new_range = first.new_range().start..last.new_range().end;
        out.extend_from_slice(b"@@ -");
        push_hunk_range(out, old_range.start, old_range.len())?;
        out.extend_from_slice(b" +");
        push_hunk_range(out, new_range.start, new_range.len())?;
        out.extend_from_slice(b" @@\n");
        for op in hunk {
            let (tag, old_range, new_range) = op.as_tag_tuple();
            if tag == DiffTag::Equal {
                for line in &old_lines[old_range] {
                    push_hunk_line(out, b' ', line);
                }
                continue;
            }
            if matches!(tag, DiffTag::Delete | DiffTag::Replace) {
                for line in &old_lines[old_range] {
                    push_hunk_line(out, b'-', line);
                }
            }
            if matches!(tag, DiffTag::Insert | DiffTag::Replace) {
                for line in &new_lines[new_range] {
                    push_hunk_line(out, b'+', line);
                }
            }
        }
        if out.len() > budget {
            return Ok(());
        }
    }
    Ok(())
}

/// The edit script from `old` to `new` lines, with positions that add up.
///
/// similar's Myers can misplace the other side of a deletion or insertion (the `new_index` of
/// a `Delete`, the `old_index` of an `Insert`: mitsuhiko/similar#78), which would put wrong
/// line numbers in hunk headers. So the positions are recomputed from the lengths, in order,
/// and the script is checked against the lines; one that does not hold (never seen) gives
/// way to removing every old line and adding every new one, which is still a correct patch.
fn line_diff(old: &[&[u8]], new: &[&[u8]]) -> Vec<DiffOp> {
    let deadline = Instant::now() + DIFF_DEADLINE;
    let raw = similar::capture_diff_slices_deadline(Algorithm::Myers, old, new, Some(deadline));
    let mut ops = Vec::with_capacity(raw.len());
    let (mut o, mut n) = (0, 0);
    for op in raw {
        let (tag, old_range, new_range) = op.as_tag_tuple();
        let (old_len, new_len) = (old_range.len(), new_range.len());
        ops.push(match tag {
            DiffTag::Equal => {
                if old_len != new_len || old.get(o..o + old_len) != new.get(n..n + new_len) {
                    return rewrite(old.len(), new.len());
                }
                DiffOp::Equal {
                    old_index: o,
                    new_index: n,
                    len: old_len,
                }
            }
            DiffTag::Delete => DiffOp::Delete {
                old_index: o,
                old_len,
                new_index: n,
            },
            DiffTag::Insert => DiffOp::Insert {
                old_index: o,
                new_index: n,
                new_len,
            },
            DiffTag::Replace => DiffOp::Replace {
                old_index: o,
                old_len,
                new_index: n,
                new_len,
            },
        });
        o += old_len;
        n += new_len;
    }
    if (o, n) != (old.len(), new.len()) {
        return rewrite(old.len(), new.len());
    }
    ops
}

/// The edit script that removes all `old_len` lines and adds all `new_len` lines.
fn rewrite(old_len: usize, new_len: usize) -> Vec<DiffOp> {
    match (old_len, new_len) {
        (0, 0) => Vec::new(),
        (0, _) => vec![DiffOp::Insert {
            old_index: 0,
            new_index: 0,
            new_len,
        }],
        (_, 0) => vec![DiffOp::Delete {
            old_index: 0,
            old_len,
            new_index: 0,
        }],
        _ => vec![DiffOp::Replace {
            old_index: 0,
            old_len,
            new_index: 0,
            new_len,
        }],
    }
}

/// `prefix` and `path` as git names them: C-quoted as a whole when `path` has a byte that
/// `core.quotePath=true` quotes.
fn quote_name(prefix: &[u8], path: &[u8]) -> Vec<u8> {
    fn needs_quote(b: u8) -> bool {
        b < 0x20 || b == 0x7f || b == b'"' || b == b'\\' || b >= 0x80
    }
    let mut name = Vec::with_capacity(prefix.len() + path.len() + 2);
    if !path.iter().copied().any(needs_quote) {
        name.extend_from_slice(prefix);
        name.extend_from_slice(path);
        return name;
    }
    name.push(b'"');
    name.extend_from_slice(prefix);
    for &b in path {
        let escape: &[u8] = match b {
            0x07 => b"\\a",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0b => b"\\v",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b if needs_quote(b) => {
                name.extend_from_slice(format!("\\{b:03o}").as_bytes());
                continue;
            }
            b => {
                name.push(b);
                continue;
            }
        };
        name.extend_from_slice(escape);
    }
    name.push(b'"');
    name
}

/// A `---` or `+++` line: the name (or `/dev/null` for an absent side), and a tab after a
/// name with a space, as git writes it.
fn write_file_label(out: &mut Vec<u8>, marker: &[u8], name: Option<&[u8]>) {
    let name = name.unwrap_or(b"/dev/null");
    out.extend_from_slice(marker);
    out.extend_from_slice(name);
    if name.contains(&b' ') {
        out.push(b'\t');
    }
    out.push(b'\n');
}

/// One side of a hunk header, from a 0-based start: `l,s`, `l` alone when `s` is 1, and for
/// an empty range the line before it (`0,0` at the top).
fn push_hunk_range(out: &mut Vec<u8>, start: usize, len: usize) -> io::Result<()> {
    match len {
        0 => write!(out, "{start},0"),
        1 => write!(out, "{}", start + 1),
        _ => write!(out, "{},{len}", start + 1),
    }
}

/// A hunk line; one without a final newline (the last of its file) gets git's marker.
fn push_hunk_line(out: &mut Vec<u8>, marker: u8, line: &[u8]) {
    out.push(marker);
    out.extend_from_slice(line);
    if !line.ends_with(b"\n") {
        out.extend_from_slice(b"\n\\ No newline at end of file\n");
    }
}

/// A `literal` block of a binary patch: the size, the zlib stream in base85 lines, and the
/// blank line that ends the block.
fn write_literal(data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(data)?;
    let deflated = encoder.finish()?;
    writeln!(out, "literal {}", data.len())?;
    for line in deflated.chunks(BASE85_LINE) {
        push_base85_line(out, line);
    }
    out.push(b'\n');
    Ok(())
}

/// One base85 line of a binary patch: a letter for the byte count (`A`..`Z` for 1..26,
/// `a`..`z` for 27..52), then 5 digits for every 4 bytes (the last group padded with zeros),
/// most significant first.
fn push_base85_line(out: &mut Vec<u8>, bytes: &[u8]) {
    debug_assert!((1..=BASE85_LINE).contains(&bytes.len()));
    let n = bytes.len() as u8;
    out.push(if n <= 26 { b'A' + n - 1 } else { b'a' + n - 27 });
    for group in bytes.chunks(4) {
        let mut acc = (0..4).fold(0u32, |acc, i| {
            (acc << 8) | u32::from(group.get(i).copied().unwrap_or(0))
        });
        let mut digits = [0u8; 5];
        for digit in digits.iter_mut().rev() {
            *digit = BASE85[(acc % 85) as usize];
            acc /= 85;
        }
        out.extend_from_slice(&digits);
    }
    out.push(b'\n');
}

/// A blob id in lowercase hex, as git writes full ids.
fn push_hex(out: &mut Vec<u8>, id: &[u8; 20]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in id {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::ffi::OsStr;
    use std::fs;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::path::Path;
    use std::process::{Command, Output};

    use pretty_assertions::assert_eq;
    use proptest::prelude::*;

    use super::*;

    type Tree = BTreeMap<Vec<u8>, Blob>;

    fn file(bytes: impl Into<Vec<u8>>) -> Blob {
        Blob {
            mode: GitMode::File,
            bytes: bytes.into(),
        }
    }

    fn exe(bytes: impl Into<Vec<u8>>) -> Blob {
        Blob {
            mode: GitMode::Executable,
            bytes: bytes.into(),
        }
    }

    fn link(target: impl Into<Vec<u8>>) -> Blob {
        Blob {
            mode: GitMode::Symlink,
            bytes: target.into(),
        }
    }

    fn text(patch: &Patch) -> String {
        String::from_utf8(patch.text.clone()).unwrap()
    }

    fn render_one(path: &str, old: Option<&Blob>, new: Option<&Blob>) -> Patch {
        render(
            &[FileChange {
                path: path.as_bytes(),
                old,
                new,
            }],
            &PatchOptions::default(),
        )
    }

    /// Every path of either tree, with its two sides.
    fn changes<'a>(base: &'a Tree, new: &'a Tree) -> Vec<FileChange<'a>> {
        let paths: std::collections::BTreeSet<&Vec<u8>> = base.keys().chain(new.keys()).collect();
        paths
            .into_iter()
            .map(|path| FileChange {
                path,
                old: base.get(path),
                new: new.get(path),
            })
            .collect()
    }

    fn write_tree(root: &Path, tree: &Tree) {
        for (path, blob) in tree {
            let full = root.join(OsStr::from_bytes(path));
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            match blob.mode {
                GitMode::Symlink => symlink(OsStr::from_bytes(&blob.bytes), &full).unwrap(),
                GitMode::File | GitMode::Executable => {
                    fs::write(&full, &blob.bytes).unwrap();
                    let perm = if blob.mode == GitMode::File {
                        0o644
                    } else {
                        0o755
                    };
                    fs::set_permissions(&full, fs::Permissions::from_mode(perm)).unwrap();
                }
            }
        }
    }

    /// The files and symlinks under `root` (directories only as parts of paths), `.git` left
    /// out.
    fn read_tree(root: &Path) -> Tree {
        fn walk(root: &Path, dir: &Path, tree: &mut Tree) {
            for entry in fs::read_dir(dir).unwrap() {
                let entry = entry.unwrap();
                let full = entry.path();
                let rel = full
                    .strip_prefix(root)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec();
                if rel == b".git" {
                    continue;
                }
                let meta = fs::symlink_metadata(&full).unwrap();
                let blob = if meta.file_type().is_symlink() {
                    link(fs::read_link(&full).unwrap().as_os_str().as_bytes())
                } else if meta.is_dir() {
                    walk(root, &full, tree);
                    continue;
                } else {
                    Blob {
                        mode: GitMode::of(false, meta.permissions().mode()),
                        bytes: fs::read(&full).unwrap(),
                    }
                };
                tree.insert(rel, blob);
            }
        }
        let mut tree = Tree::new();
        walk(root, root, &mut tree);
        tree
    }

    /// Runs the real git in `dir`, isolated from the machine's and the user's configuration.
    fn git(dir: &Path, home: &Path, args: &[&str]) -> Output {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("HOME", home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .env_remove("GIT_INDEX_FILE")
            .output()
            .unwrap_or_else(|e| {
                panic!("these tests need the `git` binary on PATH to check patches: {e}")
            })
    }

    fn git_ok(dir: &Path, home: &Path, args: &[&str], patch: &[u8]) {
        let out = git(dir, home, args);
        assert!(
            out.status.success(),
            "git {args:?} failed ({}):\n{}\n--- patch ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(patch),
        );
    }

    /// Writes `base` to a fresh repository, applies `patch` there with `git apply` (after a
    /// `--check`), and returns the tree that results.
    fn apply(base: &Tree, patch: &[u8], extra: &[&str]) -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let work = tmp.path().join("work");
        let patch_file = tmp.path().join("change.patch");
        fs::create_dir_all(&home).unwrap();
        fs::create_dir_all(&work).unwrap();
        fs::write(&patch_file, patch).unwrap();
        write_tree(&work, base);
        git_ok(&work, &home, &["init", "-q"], patch);
        let patch_arg = patch_file.to_str().unwrap();
        for check in [true, false] {
            let mut args = vec!["-c", "core.quotePath=true", "apply"];
            if check {
                args.push("--check");
            }
            args.extend_from_slice(extra);
            args.push(patch_arg);
            git_ok(&work, &home, &args, patch);
        }
        read_tree(&work)
    }

    /// Renders the change from `base` to `new`, applies it with git and checks the result.
    fn round_trip(base: &Tree, new: &Tree) -> Patch {
        let patch = render(&changes(base, new), &PatchOptions::default());
        assert!(!patch.truncated);
        if patch.text.is_empty() {
            // `git apply` refuses an empty patch; nothing changed.
            assert_eq!(patch.files, 0);
            assert!(base == new, "changes but an empty patch");
            return patch;
        }
        let got = apply(base, &patch.text, &[]);
        assert!(
            got == *new,
            "git apply made a different tree\n--- patch ---\n{}",
            String::from_utf8_lossy(&patch.text)
        );
        patch
    }

    /// Deterministic noise (xorshift64*).
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed >> 12;
                seed ^= seed << 25;
                seed ^= seed >> 27;
                (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    fn numbered(lines: std::ops::Range<usize>) -> Vec<u8> {
        lines
            .map(|i| format!("line {i}\n"))
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn git_mode_from_kind_and_permissions() {
        assert_eq!(GitMode::of(false, 0o644), GitMode::File);
        assert_eq!(GitMode::of(false, 0o100600), GitMode::File);
        assert_eq!(GitMode::of(false, 0o744), GitMode::Executable);
        assert_eq!(GitMode::of(false, 0o641), GitMode::Executable);
        assert_eq!(GitMode::of(true, 0o777), GitMode::Symlink);
        assert_eq!(GitMode::of(true, 0), GitMode::Symlink);
        assert_eq!(
            [GitMode::File, GitMode::Executable, GitMode::Symlink].map(GitMode::octal),
            ["100644", "100755", "120000"]
        );
    }

    #[test]
    fn names_are_quoted_like_git_with_quote_path() {
        let q = |path: &[u8]| String::from_utf8(quote_name(b"a/", path)).unwrap();
        assert_eq!(q(b"src/lib.rs"), "a/src/lib.rs");
        assert_eq!(q(b"with space/x y"), "a/with space/x y");
        assert_eq!(q(b"d d/t\tab"), r#""a/d d/t\tab""#);
        assert_eq!(q(b"say \"hi\""), r#""a/say \"hi\"""#);
        assert_eq!(q(b"back\\slash"), r#""a/back\\slash""#);
        assert_eq!(q(b"\x07\x08\n\x0b\x0c\r"), r#""a/\a\b\n\v\f\r""#);
        assert_eq!(q(b"\x01\x1b\x7f"), r#""a/\001\033\177""#);
        assert_eq!(q("ünï.txt".as_bytes()), r#""a/\303\274n\303\257.txt""#);
        assert_eq!(q(b"caf\xe9"), r#""a/caf\351""#);
        assert_eq!(
            q(b"~!#$%&'()*+,-.:;<=>?@[]^_`{|}"),
            "a/~!#$%&'()*+,-.:;<=>?@[]^_`{|}"
        );
    }

    #[test]
    fn base85_matches_git() {
        let line = |bytes: &[u8]| {
            let mut out = Vec::new();
            push_base85_line(&mut out, bytes);
            String::from_utf8(out).unwrap()
        };
        // The zlib stream of "bin\0arz" in a binary patch written by `git diff --binary`.
        let from_git = [120, 1, 75, 202, 204, 99, 72, 44, 170, 2, 0, 9, 210, 2, 135];
        assert_eq!(line(&from_git), "OcmYew%wtF_ssaEB(gKG7\n");
        assert_eq!(line(&[0]), "A00000\n");
        assert_eq!(line(&[0xff; 4]), "D|NsC0\n");
        let counting: Vec<u8> = (0..52).collect();
        assert_eq!(
            line(&counting),
            "z009C61O)~M2nh-c3=Iws5D^j+6crX17#SKH9337XAR!_nBqb&%C@Cr{EG;fCFflSS\n"
        );
        assert_eq!(&line(&counting[..26])[..1], "Z");
        assert_eq!(&line(&counting[..27])[..1], "a");
    }

    #[test]
    fn blob_ids_match_git_hash_object() {
        let hex = |bytes: &[u8]| {
            let mut out = Vec::new();
            push_hex(&mut out, &git_blob_sha1(bytes));
            String::from_utf8(out).unwrap()
        };
        // `printf '' | git hash-object --stdin` and `echo 'hello world' | git hash-object --stdin`.
        assert_eq!(hex(b""), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
        assert_eq!(
            hex(b"hello world\n"),
            "3b18e512dba79e4c8300dd08aeb37f8e728b8dad"
        );
    }

    #[test]
    fn binary_is_a_nul_in_the_first_8000_bytes() {
        assert!(!is_binary(b""));
        assert!(!is_binary(b"caf\xe9\n\xff\xfe"));
        assert!(is_binary(b"a\0b"));
        let mut late = vec![b'x'; 8000];
        late.push(0);
        assert!(!is_binary(&late));
        late[7999] = 0;
        assert!(is_binary(&late));
    }

    #[test]
    fn modified_text_without_newline_is_written_as_git_does() {
        // `git diff --full-index` for q: "q" -> "r\n".
        let patch = render_one("q", Some(&file("q")), Some(&file("r\n")));
        assert_eq!(
            text(&patch),
            "diff --git a/q b/q\n\
             index ea0c8a85cb7293feae2c9e151d1d395be59b61fa..4286f428e3b19fe84de503916ce0e7dc8deefea1 100644\n\
             --- a/q\n\
             +++ b/q\n\
             @@ -1 +1 @@\n\
             -q\n\
             \\ No newline at end of file\n\
             +r\n"
        );
        assert_eq!((patch.files, patch.truncated), (1, false));
    }

    #[test]
    fn names_with_spaces_end_with_a_tab() {
        let patch = render_one("x y", Some(&file("a\nb\n")), Some(&file("a\nc\n")));
        assert_eq!(
            text(&patch),
            "diff --git a/x y b/x y\n\
             index 422c2b7ab3b3c668038da977e4e93a5fc623169c..0f7bc766052a5a0ee28a393d51d2370f96d8ceb8 100644\n\
             --- a/x y\t\n\
             +++ b/x y\t\n\
             @@ -1,2 +1,2 @@\n \
             a\n\
             -b\n\
             +c\n"
        );
        let patch = render_one("d d/t\tab", None, Some(&file("n")));
        assert_eq!(
            text(&patch),
            "diff --git \"a/d d/t\\tab\" \"b/d d/t\\tab\"\n\
             new file mode 100644\n\
             index 0000000000000000000000000000000000000000..ef073cc45ccc66c921adc7ccc6221e38aa54ae17\n\
             --- /dev/null\n\
             +++ \"b/d d/t\\tab\"\t\n\
             @@ -0,0 +1 @@\n\
             +n\n\
             \\ No newline at end of file\n"
        );
    }

    #[test]
    fn hunk_headers_for_added_and_deleted_files() {
        let added = render_one("f", None, Some(&exe("a\nb\n")));
        assert_eq!(
            text(&added),
            "diff --git a/f b/f\n\
             new file mode 100755\n\
             index 0000000000000000000000000000000000000000..422c2b7ab3b3c668038da977e4e93a5fc623169c\n\
             --- /dev/null\n\
             +++ b/f\n\
             @@ -0,0 +1,2 @@\n\
             +a\n\
             +b\n"
        );
        let deleted = render_one("f", Some(&file("a\nb\n")), None);
        assert_eq!(
            text(&deleted),
            "diff --git a/f b/f\n\
             deleted file mode 100644\n\
             index 422c2b7ab3b3c668038da977e4e93a5fc623169c..0000000000000000000000000000000000000000\n\
             --- a/f\n\
             +++ /dev/null\n\
             @@ -1,2 +0,0 @@\n\
             -a\n\
             -b\n"
        );
        let emptied = render_one("f", Some(&file("a\n")), Some(&file("")));
        assert!(
            text(&emptied).ends_with("@@ -1 +0,0 @@\n-a\n"),
            "{}",
            text(&emptied)
        );
    }

    #[test]
    fn empty_files_have_no_hunks() {
        let empty = file("");
        assert_eq!(
            text(&render_one("e", None, Some(&empty))),
            "diff --git a/e b/e\n\
             new file mode 100644\n\
             index 0000000000000000000000000000000000000000..e69de29bb2d1d6434b8b29ae775ad8c2e48c5391\n"
        );
        assert_eq!(
            text(&render_one("e", Some(&empty), None)),
            "diff --git a/e b/e\n\
             deleted file mode 100644\n\
             index e69de29bb2d1d6434b8b29ae775ad8c2e48c5391..0000000000000000000000000000000000000000\n"
        );
    }

    #[test]
    fn mode_changes_and_type_changes() {
        let mode_only = render_one("m", Some(&file("e\n")), Some(&exe("e\n")));
        assert_eq!(
            text(&mode_only),
            "diff --git a/m b/m\nold mode 100644\nnew mode 100755\n"
        );
        let both = render_one("m", Some(&exe("e\n")), Some(&file("f\n")));
        assert!(
            text(&both)
                .starts_with("diff --git a/m b/m\nold mode 100755\nnew mode 100644\nindex d905d9d"),
            "{}",
            text(&both)
        );
        assert!(
            !text(&both).contains(".. 100"),
            "no mode on a changed mode's index line"
        );
        // As `git diff` writes a symlink replaced by a file.
        let type_change = render_one("sl", Some(&link("tgt")), Some(&file("file\n")));
        assert_eq!(
            text(&type_change),
            "diff --git a/sl b/sl\n\
             deleted file mode 120000\n\
             index c7e58fc98433ad8c1408f2d1fe79c52de3a18dcb..0000000000000000000000000000000000000000\n\
             --- a/sl\n\
             +++ /dev/null\n\
             @@ -1 +0,0 @@\n\
             -tgt\n\
             \\ No newline at end of file\n\
             diff --git a/sl b/sl\n\
             new file mode 100644\n\
             index 0000000000000000000000000000000000000000..f73f3093ff865c514c6c51f867e35f693487d0d3\n\
             --- /dev/null\n\
             +++ b/sl\n\
             @@ -0,0 +1 @@\n\
             +file\n"
        );
        assert_eq!(type_change.files, 2);
    }

    #[test]
    fn identical_and_absent_sides_make_nothing() {
        let same = file("x\n");
        let patch = render(
            &[
                FileChange {
                    path: b"a",
                    old: Some(&same),
                    new: Some(&same.clone()),
                },
                FileChange {
                    path: b"b",
                    old: None,
                    new: None,
                },
            ],
            &PatchOptions::default(),
        );
        assert_eq!(patch, Patch::default());
    }

    #[test]
    fn binary_patches_have_both_literals() {
        let patch = render_one("b", Some(&file("bin\0ary")), Some(&file("bin\0arz")));
        let text = text(&patch);
        assert!(
            text.starts_with(
                "diff --git a/b b/b\n\
                 index 87ae6b695deceaf160611414f7dcd5c7366b2e79..a095159ad85024dc613b4a1b4325706f2513b926 100644\n\
                 GIT binary patch\n\
                 literal 7\n"
            ),
            "{text}"
        );
        assert_eq!(text.matches("literal 7\n").count(), 2);
        assert!(text.ends_with("\n\n"));
        let deleted = self::text(&render_one("b", Some(&file("bin\0ary")), None));
        assert!(deleted.contains("deleted file mode 100644\n"), "{deleted}");
        assert!(
            deleted.contains("GIT binary patch\nliteral 0\n"),
            "{deleted}"
        );
        assert!(deleted.contains("\n\nliteral 7\n"), "{deleted}");
        assert!(deleted.ends_with("\n\n"), "{deleted}");
    }

    #[test]
    fn hunks_merge_within_twice_the_context_and_split_beyond() {
        let headers = |patch: &Patch| -> Vec<String> {
            text(patch)
                .lines()
                .filter(|l| l.starts_with("@@"))
                .map(str::to_owned)
                .collect()
        };
        let old = String::from_utf8(numbered(0..40)).unwrap();
        let far = format!("{}tail\n", old.replace("line 0\n", "Line 0\n"));
        let patch = render_one("f", Some(&file(old.clone())), Some(&file(far)));
        assert_eq!(headers(&patch), ["@@ -1,4 +1,4 @@", "@@ -38,3 +38,4 @@"]);
        // Six unchanged lines between two changes: one hunk, as git makes it.
        let near = old
            .replace("line 0\n", "Line 0\n")
            .replace("line 7\n", "Line 7\n");
        let patch = render_one("f", Some(&file(old)), Some(&file(near)));
        assert_eq!(headers(&patch), ["@@ -1,11 +1,11 @@"]);
    }

    #[test]
    fn hunk_positions_do_not_trust_similar_indices() {
        // Myers reports this Delete at new line 15 and the last Insert at old line 5
        // (mitsuhiko/similar#78); the hunk must still say 6 old lines.
        let lines = |ids: &[&str]| ids.iter().map(|l| format!("{l}\n")).collect::<String>();
        let old = lines(&["", "l4", "", "l2", "l1", "l4"]);
        let new = lines(&[
            "l4", "l2", "", "", "l5", "l2", "l3", "l3", "l5", "l4", "l4", "l2", "", "l2", "l4",
            "l4", "l1", "l5", "l5",
        ]);
        let patch = render_one("f", Some(&file(old.clone())), Some(&file(new.clone())));
        assert!(
            text(&patch).contains("\n@@ -1,6 +1,19 @@\n"),
            "{}",
            text(&patch)
        );
        let base: Tree = [(b"f".to_vec(), file(old))].into();
        let next: Tree = [(b"f".to_vec(), file(new))].into();
        round_trip(&base, &next);
    }

    #[test]
    fn zero_context_applies_with_unidiff_zero() {
        let old = numbered(0..20);
        let new = String::from_utf8(old.clone())
            .unwrap()
            .replace("line 3\n", "line three\n")
            .replace("line 9\n", "")
            .replace("line 15\n", "line 15\nline 15.5\n")
            .into_bytes();
        let (old, new) = (file(old), file(new));
        let opts = PatchOptions {
            context: 0,
            ..PatchOptions::default()
        };
        let patch = render(
            &[FileChange {
                path: b"f",
                old: Some(&old),
                new: Some(&new),
            }],
            &opts,
        );
        let headers: Vec<&str> = std::str::from_utf8(&patch.text)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("@@"))
            .collect();
        assert_eq!(
            headers,
            ["@@ -4 +4 @@", "@@ -10 +9,0 @@", "@@ -16,0 +16 @@"]
        );
        let base: Tree = [(b"f".to_vec(), old)].into();
        let next: Tree = [(b"f".to_vec(), new)].into();
        assert_eq!(apply(&base, &patch.text, &["--unidiff-zero"]), next);
    }

    #[test]
    fn truncation_keeps_whole_sections() {
        let blobs: Vec<(Vec<u8>, Blob)> = (0..5)
            .map(|i| (format!("f{i}").into_bytes(), file(numbered(0..i * 10 + 1))))
            .collect();
        let changes: Vec<FileChange<'_>> = blobs
            .iter()
            .map(|(path, blob)| FileChange {
                path,
                old: None,
                new: Some(blob),
            })
            .collect();
        let full = render(&changes, &PatchOptions::default());
        assert_eq!((full.files, full.truncated), (5, false));
        let cap = full.text.len() - 1;
        let cut = render(
            &changes,
            &PatchOptions {
                max_bytes: cap,
                ..PatchOptions::default()
            },
        );
        assert!(cut.truncated);
        assert_eq!(cut.files, 4);
        assert!(cut.text.len() <= cap);
        assert!(full.text.starts_with(&cut.text));
        assert!(full.text[cut.text.len()..].starts_with(b"diff --git a/f4 b/f4\n"));
        let expected: Tree = blobs[..4].iter().cloned().collect();
        assert_eq!(apply(&Tree::new(), &cut.text, &[]), expected);
        let none = render(
            &changes,
            &PatchOptions {
                max_bytes: 10,
                ..PatchOptions::default()
            },
        );
        assert_eq!(
            none,
            Patch {
                text: Vec::new(),
                truncated: true,
                files: 0
            }
        );
    }

    #[test]
    fn git_apply_reproduces_every_kind_of_change() {
        let bytes: Vec<u8> = (0..=255).collect();
        let mut bytes_modified = bytes.clone();
        bytes_modified[10] = 0xaa;
        bytes_modified.extend_from_slice(b"more");
        let long = numbered(0..40);
        let long_modified = String::from_utf8(long.clone())
            .unwrap()
            .replace("line 2\n", "line two\n")
            .replace("line 30\n", "")
            .replace("line 39\n", "line 39\nline 40\n")
            .into_bytes();

        let entries = |list: Vec<(&[u8], Blob)>| -> Tree {
            list.into_iter().map(|(p, b)| (p.to_vec(), b)).collect()
        };
        let base = entries(vec![
            (b"same.txt", file("unchanged\n")),
            (b"modified.txt", file(long)),
            (b"deleted.txt", file("gone\n")),
            (b"bin/modified.bin", file(bytes.clone())),
            (b"bin/deleted.bin", exe(bytes.clone())),
            (b"bin/to-text", file("\0\x01\x02")),
            (b"text-to-bin", file("text\n")),
            (b"mode-only.sh", file("#!/bin/sh\n")),
            (b"mode-and-content.sh", file("#!/bin/sh\necho a\n")),
            (b"exe-to-file", exe("x\n")),
            (b"link-changed", link("target/a")),
            (b"link-to-file", link("somewhere")),
            (b"file-to-link", file("content\n")),
            (b"exe-to-link", exe("content\n")),
            (b"no-eol.txt", file("a\nb")),
            (b"gains-eol.txt", file("x")),
            (b"loses-eol.txt", file("x\n")),
            (b"empty-deleted", file("")),
            (b"becomes-empty", file("text\n")),
            (b"was-empty", file("")),
            (b"with space.txt", file("one\ntwo\n")),
            ("ünïcødé.txt".as_bytes(), file("alpha\n")),
            (b"latin1.txt", file(b"caf\xe9 cr\xe8me\n\xff\n".as_slice())),
            (b"crlf.txt", file("a\r\nb\r\n")),
            (b"blank-lines.txt", file("\n\n\na\n\n\n")),
        ]);
        let new = entries(vec![
            (b"same.txt", file("unchanged\n")),
            (b"modified.txt", file(long_modified)),
            (b"added.txt", file("new\nfile\n")),
            (b"added.sh", exe("#!/bin/sh\nexit 0\n")),
            (b"bin/modified.bin", file(bytes_modified)),
            (
                b"bin/added.bin",
                file(noise(100 * 1024, 0x9e37_79b9_7f4a_7c15)),
            ),
            (b"bin/all-bytes", exe(bytes)),
            (b"bin/to-text", file("now text\n")),
            (b"text-to-bin", file("text\0\n")),
            (b"mode-only.sh", exe("#!/bin/sh\n")),
            (b"mode-and-content.sh", exe("#!/bin/sh\necho b\n")),
            (b"exe-to-file", file("x\n")),
            (b"link-new", link("../outside/target")),
            (b"link-changed", link("target/b")),
            (b"link-to-file", file("was a link\n")),
            (b"file-to-link", link("file-to-link-target")),
            (b"exe-to-link", link("x")),
            (b"no-eol.txt", file("a\nc")),
            (b"gains-eol.txt", file("x\n")),
            (b"loses-eol.txt", file("x")),
            (b"empty-added", file("")),
            (b"becomes-empty", file("")),
            (b"was-empty", file("text\n")),
            (b"with space.txt", file("one\n2\n")),
            (b"dir with space/a b c", file("spaced\n")),
            (b"odd b/name", file("looks like two names\n")),
            (b"trailing space ", file("trailing\n")),
            (b"tab\there", file("tab\n")),
            (b"quote\"name", file("quote\n")),
            (b"back\\slash", file("backslash\n")),
            ("ünïcødé.txt".as_bytes(), file("beta\n")),
            (b"caf\xe9-latin1-name", file("name\n")),
            (
                b"latin1.txt",
                file(b"caf\xe9 cr\xe8me br\xfbl\xe9e\n\xff\n".as_slice()),
            ),
            (b"crlf.txt", file("a\r\nc\r\n")),
            (b"blank-lines.txt", file("\n\na\n\n\n\n")),
            (b"new/nested/dir/file.txt", file("deep\n")),
        ]);
        let patch = round_trip(&base, &new);
        let text = String::from_utf8_lossy(&patch.text);
        for header in [
            "diff --git \"a/tab\\there\" \"b/tab\\there\"\n",
            "diff --git \"a/quote\\\"name\" \"b/quote\\\"name\"\n",
            "diff --git \"a/\\303\\274n\\303\\257c\\303\\270d\\303\\251.txt\" ",
            "diff --git a/with space.txt b/with space.txt\n",
            "diff --git \"a/caf\\351-latin1-name\" ",
        ] {
            assert!(text.contains(header), "missing {header:?} in\n{text}");
        }
        // 39 paths, one unchanged, three type changes with two sections each.
        assert_eq!(changes(&base, &new).len(), 39);
        assert_eq!(patch.files, 39 - 1 + 3);
    }

    #[test]
    fn binary_round_trip_from_nothing_and_back() {
        let blob = file(noise(3000, 7));
        let one: Tree = [(b"x.bin".to_vec(), blob)].into();
        round_trip(&Tree::new(), &one);
        round_trip(&one, &Tree::new());
    }

    fn text_from_lines(lines: &[u8], final_newline: bool) -> Vec<u8> {
        let mut out: Vec<u8> = lines
            .iter()
            .flat_map(|&id| {
                if id == 0 {
                    b"\n".to_vec()
                } else {
                    format!("l{id}\n").into_bytes()
                }
            })
            .collect();
        if !final_newline {
            out.pop();
        }
        out
    }

    fn side() -> impl Strategy<Value = Option<Blob>> {
        prop::option::weighted(
            0.85,
            (
                prop::collection::vec(0u8..6, 0..24),
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(lines, eol, executable)| Blob {
                    mode: if executable {
                        GitMode::Executable
                    } else {
                        GitMode::File
                    },
                    bytes: text_from_lines(&lines, eol),
                }),
        )
    }

    /// Short contents over few byte values: text, non-UTF-8 text and binary all come up.
    fn any_bytes() -> impl Strategy<Value = Option<Blob>> {
        prop::option::weighted(
            0.85,
            prop::collection::vec(prop::sample::select(b"ab\n\n\xe9\0".to_vec()), 0..40)
                .prop_map(file),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]

        #[test]
        fn random_byte_changes_round_trip(old in any_bytes(), new in any_bytes()) {
            let base: Tree = old.map(|b| (b"f".to_vec(), b)).into_iter().collect();
            let next: Tree = new.map(|b| (b"f".to_vec(), b)).into_iter().collect();
            round_trip(&base, &next);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn random_text_changes_round_trip(old in side(), new in side(), other in side()) {
            let mut base = Tree::new();
            let mut next = Tree::new();
            base.insert(b"keep".to_vec(), file("kept\n"));
            next.insert(b"keep".to_vec(), file("kept\n"));
            if let Some(old) = old {
                base.insert(b"f".to_vec(), old);
            }
            if let Some(new) = new {
                next.insert(b"f".to_vec(), new);
            }
            if let Some(other) = other {
                next.insert(b"sub/g".to_vec(), other);
            }
            round_trip(&base, &next);
        }
    }
}
