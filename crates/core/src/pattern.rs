//! Compiled path patterns, matched segment by segment.
//!
//! A pattern is a list of segments. `**` is a whole segment that matches **zero or more whole
//! path segments**; any other segment is either a literal or a single-segment glob (`*`, `?`,
//! `[...]`, `\` escapes), where `*` never crosses `/`. Matching runs a small NFA whose state set
//! fits in a `u64` bitmask (hence [`MAX_PATTERN_SEGMENTS`]), so it never allocates and never
//! backtracks. The same state set answers the two questions the traversal rule needs: "can this
//! pattern still match something strictly below this directory?" and "does it match every path
//! below it?".

use std::borrow::Cow;

use globset::{GlobBuilder, GlobMatcher};
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};

use crate::PatternType;

/// The prefix that makes a pattern match names whatever their case: `(?i)**/.env*` hides
/// `.ENV` and `.Env.local` too.
pub const CASE_INSENSITIVE: &str = "(?i)";

/// `text` in Unicode normalization form C (the form patterns are compiled in): a name stored
/// decomposed (`e` + U+0301) matches a pattern written composed (`é`), and back.
pub fn nfc(text: &str) -> Cow<'_, str> {
    if is_nfc_quick(text.chars()) == IsNormalized::Yes {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.nfc().collect())
    }
}

/// `text` lower-cased for case-insensitive matching (ASCII without allocating when it has no
/// upper-case letter).
pub fn fold(text: &str) -> Cow<'_, str> {
    if text.is_ascii() {
        if text.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(text.to_ascii_lowercase())
        } else {
            Cow::Borrowed(text)
        }
    } else {
        Cow::Owned(text.to_lowercase())
    }
}

/// A pattern's text without its flags, and whether it is case-insensitive.
pub fn split_flags(raw: &str) -> (&str, bool) {
    match raw.strip_prefix(CASE_INSENSITIVE) {
        Some(body) => (body, true),
        None => (raw, false),
    }
}

/// A path segment as the patterns compare it: in NFC, and lower-cased when some pattern is
/// case-insensitive (computed once per segment for every rule, and only then).
#[derive(Debug, Clone)]
pub(crate) struct Name<'a> {
    exact: Cow<'a, str>,
    folded: Option<Cow<'a, str>>,
}

impl<'a> Name<'a> {
    /// `segment` for matching; `fold`: some pattern is case-insensitive.
    pub(crate) fn new(segment: &'a str, fold_case: bool) -> Name<'a> {
        let exact = nfc(segment);
        let folded = fold_case.then(|| match &exact {
            Cow::Borrowed(s) => fold(s),
            Cow::Owned(s) => Cow::Owned(fold(s).into_owned()),
        });
        Name { exact, folded }
    }
}

/// Most segments a pattern may have (the NFA state set is a `u64`).
pub const MAX_PATTERN_SEGMENTS: usize = 62;

/// Why a pattern could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern is empty.
    #[error("pattern is empty")]
    Empty,
    /// The pattern contains a NUL byte.
    #[error("pattern contains a NUL byte")]
    ContainsNul,
    /// `**` used inside a segment, e.g. `**.md` or `a**`.
    #[error(
        "'**' must be a whole path segment (write '**/*.md', not '**.md'); found in segment {segment:?}"
    )]
    PartialDoubleStar {
        /// The offending segment.
        segment: String,
    },
    /// `..` in a pattern.
    #[error("'..' is not allowed in a pattern")]
    DotDot,
    /// Too many segments.
    #[error("pattern has more than {MAX_PATTERN_SEGMENTS} segments")]
    TooLong,
    /// A segment glob that does not parse (e.g. an unclosed `[`).
    #[error("invalid glob segment {segment:?}: {reason}")]
    InvalidGlob {
        /// The offending segment.
        segment: String,
        /// What the glob parser said.
        reason: String,
    },
}

#[derive(Debug, Clone)]
enum Segment {
    /// `**`: zero or more whole segments.
    AnyDepth,
    /// A segment matched byte for byte.
    Literal(String),
    /// A single-segment glob.
    Glob(GlobMatcher),
}

impl Segment {
    fn matches(&self, name: &Name<'_>, fold: bool) -> bool {
        // A name made without folding only meets exact patterns (see `Name::new`).
        let s = match &name.folded {
            Some(folded) if fold => folded,
            _ => &name.exact,
        };
        match self {
            Segment::AnyDepth => true,
            Segment::Literal(l) => l == s.as_ref(),
            Segment::Glob(g) => g.is_match(s.as_ref()),
        }
    }
}

/// A compiled pattern: the NFA over path segments.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    segments: Vec<Segment>,
    /// Case-insensitive ([`CASE_INSENSITIVE`]): segments hold lower-case text and match the
    /// lower-cased name.
    fold: bool,
}

/// The NFA state: bit `i` set means "the first `i` pattern segments have been consumed".
pub(crate) type State = u64;

impl Pattern {
    /// Compiles `raw` as a pattern of type `kind`.
    ///
    /// The pattern is normalised like a path (leading `/` implied, `.` and empty segments
    /// dropped, trailing `/` ignored). `file` and `directory` patterns are literal; a
    /// `directory` pattern also matches everything below. `..` is rejected in every type.
    pub(crate) fn compile(raw: &str, kind: PatternType) -> Result<Self, PatternError> {
        let (body, fold_case) = split_flags(raw);
        if body.trim().is_empty() {
            return Err(PatternError::Empty);
        }
        if body.contains('\0') {
            return Err(PatternError::ContainsNul);
        }
        let text = nfc(body);
        let text = if fold_case {
            fold(&text).into_owned()
        } else {
            text.into_owned()
        };
        let mut segments = Vec::new();
        for part in text.split('/') {
            match part {
                "" | "." => continue,
                ".." => return Err(PatternError::DotDot),
                _ => {}
            }
            let seg = match kind {
                PatternType::File | PatternType::Directory => Segment::Literal(part.to_owned()),
                PatternType::Glob => compile_glob_segment(part)?,
            };
            // `**/**` is the same as `**`: collapsing keeps the NFA small and makes
            // "matches everything below" a check of the last segment only.
            if matches!(seg, Segment::AnyDepth)
                && matches!(segments.last(), Some(Segment::AnyDepth))
            {
                continue;
            }
            segments.push(seg);
        }
        if kind == PatternType::Directory && !matches!(segments.last(), Some(Segment::AnyDepth)) {
            segments.push(Segment::AnyDepth);
        }
        if segments.len() > MAX_PATTERN_SEGMENTS {
            return Err(PatternError::TooLong);
        }
        Ok(Pattern {
            segments,
            fold: fold_case,
        })
    }

    fn accept_bit(&self) -> State {
        1 << self.segments.len()
    }

    /// Adds every state reachable by letting a `**` match zero segments.
    fn closure(&self, mut state: State) -> State {
        for (i, seg) in self.segments.iter().enumerate() {
            if state & (1 << i) != 0 && matches!(seg, Segment::AnyDepth) {
                state |= 1 << (i + 1);
            }
        }
        state
    }

    /// Whether the pattern is case-insensitive.
    pub(crate) fn folds(&self) -> bool {
        self.fold
    }

    /// The state before any segment is consumed (the root).
    pub(crate) fn start(&self) -> State {
        self.closure(1)
    }

    /// Consumes one path segment.
    #[cfg(test)]
    pub(crate) fn step(&self, state: State, segment: &str) -> State {
        self.step_name(state, &Name::new(segment, self.fold))
    }

    /// Consumes one path segment, normalised once for every pattern ([`Name`]).
    pub(crate) fn step_name(&self, state: State, name: &Name<'_>) -> State {
        let mut next = 0;
        let mut rest = state & (self.accept_bit() - 1);
        while rest != 0 {
            let i = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            let seg = &self.segments[i];
            if seg.matches(name, self.fold) {
                next |= match seg {
                    // `**` may consume this segment and stay, ready for more.
                    Segment::AnyDepth => 1 << i,
                    _ => 1 << (i + 1),
                };
            }
        }
        self.closure(next)
    }

    /// The path consumed so far matches the pattern.
    pub(crate) fn accepts(&self, state: State) -> bool {
        state & self.accept_bit() != 0
    }

    /// Some path strictly below the one consumed so far could match.
    pub(crate) fn can_match_below(&self, state: State) -> bool {
        state & (self.accept_bit() - 1) != 0
    }

    /// Every path strictly below the one consumed so far matches (the rest is `**`).
    pub(crate) fn matches_all_below(&self, state: State) -> bool {
        let n = self.segments.len();
        n > 0 && matches!(self.segments[n - 1], Segment::AnyDepth) && state & (1 << (n - 1)) != 0
    }

    /// Whether the whole `path` matches, for tests and one-off checks.
    #[cfg(test)]
    pub(crate) fn is_match(&self, path: &crate::SandboxPath) -> bool {
        let state = path
            .components()
            .fold(self.start(), |st, seg| self.step(st, seg));
        self.accepts(state)
    }
}

fn compile_glob_segment(part: &str) -> Result<Segment, PatternError> {
    if part == "**" {
        return Ok(Segment::AnyDepth);
    }
    if part.contains("**") {
        return Err(PatternError::PartialDoubleStar {
            segment: part.to_owned(),
        });
    }
    if !part.contains(['*', '?', '[', '\\']) {
        return Ok(Segment::Literal(part.to_owned()));
    }
    // Braces are not part of our grammar (nor of the original's): make them literal.
    let escaped = part.replace('{', "\\{").replace('}', "\\}");
    let glob = GlobBuilder::new(&escaped)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| PatternError::InvalidGlob {
            segment: part.to_owned(),
            reason: e.kind().to_string(),
        })?;
    Ok(Segment::Glob(glob.compile_matcher()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SandboxPath;
    use proptest::prelude::*;

    fn m(pattern: &str, path: &str) -> bool {
        Pattern::compile(pattern, PatternType::Glob)
            .unwrap()
            .is_match(&SandboxPath::parse(path).unwrap())
    }

    #[test]
    fn case_insensitive_patterns_match_every_spelling() {
        for (pattern, path, want) in [
            ("(?i)**/.env*", "/.ENV", true),
            ("(?i)**/.env*", "/a/.Env.local", true),
            ("(?i)**/secrets/**", "/App/SECRETS/db.txt", true),
            ("(?i)**/*.pem", "/cert.PEM", true),
            ("(?i)**/id_rsa", "/deploy/ID_RSA", true),
            ("(?i)/Docs/**", "/docs/x", true),
            ("(?i)**/straße", "/STRASSE", false),
            ("(?i)**/ÉTÉ", "/été", true),
            // Without the flag, exact as before.
            ("**/.env*", "/.ENV", false),
            ("**/secrets/**", "/Secrets/db.txt", false),
        ] {
            assert_eq!(m(pattern, path), want, "{pattern} {path}");
        }
    }

    #[test]
    fn patterns_and_names_meet_in_one_normalization_form() {
        let nfc = "/nfd/s\u{e9}crets/**";
        let nfd = "/nfd/se\u{301}crets/**";
        for (pattern, path) in [
            (nfc, "/nfd/se\u{301}crets/pw.txt"),
            (nfd, "/nfd/s\u{e9}crets/pw.txt"),
            (nfc, "/nfd/s\u{e9}crets/pw.txt"),
            (nfd, "/nfd/se\u{301}crets/pw.txt"),
        ] {
            assert!(m(pattern, path), "{pattern:?} {path:?}");
        }
    }

    #[test]
    fn issue_examples() {
        // `**/.env*` matches at the top and at any depth.
        assert!(m("**/.env*", "/.env"));
        assert!(m("**/.env*", "/a/b/.env.local"));
        assert!(!m("**/.env*", "/a/env"));
        // `**/secrets/**`: the directory itself and everything below, at any depth.
        for p in ["/secrets", "/secrets/db.txt", "/app/x/secrets/k/y"] {
            assert!(m("**/secrets/**", p), "{p}");
        }
        assert!(!m("**/secrets/**", "/app/secretsx/y"));
        // `/secrets/**` matches `/secrets` itself and all below.
        assert!(m("/secrets/**", "/secrets"));
        assert!(m("/secrets/**", "/secrets/a/b"));
        assert!(!m("/secrets/**", "/x/secrets"));
        // `*.md` is top level only.
        assert!(m("*.md", "/README.md"));
        assert!(!m("*.md", "/docs/x.md"));
        // `**/*.py` at every depth.
        assert!(m("**/*.py", "/a.py"));
        assert!(m("**/*.py", "/src/lib/b.py"));
        assert!(!m("**/*.py", "/src"));
    }

    #[test]
    fn double_star_anywhere_and_repeated() {
        assert!(m("/a/**/b", "/a/b"));
        assert!(m("/a/**/b", "/a/x/y/b"));
        assert!(!m("/a/**/b", "/a/x/y/c"));
        assert!(m("**/x/**/y/**", "/x/y"));
        assert!(m("**/x/**/y/**", "/p/x/q/r/y/s/t"));
        assert!(!m("**/x/**/y/**", "/p/y/x"));
        assert!(m("**", "/"));
        assert!(m("/**", "/deep/er/path"));
        assert!(!m("**/*", "/"));
        assert!(m("**/*", "/a"));
        assert!(m("**/**/a", "/a"));
    }

    #[test]
    fn single_segment_wildcards() {
        assert!(m("/docs/*", "/docs/a"));
        assert!(!m("/docs/*", "/docs/a/b"));
        assert!(m("/f?o", "/foo"));
        assert!(!m("/f?o", "/fo/o"));
        assert!(m("/[ab]x", "/bx"));
        assert!(!m("/[!ab]x", "/bx"));
        assert!(m("/*", "/.hidden"), "no dotfile special case");
        assert!(m("/\\*", "/*"));
        assert!(!m("/\\*", "/a"));
        assert!(m("/{a,b}", "/{a,b}"), "braces are literal");
        assert!(!m("/{a,b}", "/a"));
    }

    #[test]
    fn file_and_directory_types_are_literal() {
        let f = Pattern::compile("/docs/*.md", PatternType::File).unwrap();
        assert!(f.is_match(&SandboxPath::parse("/docs/*.md").unwrap()));
        assert!(!f.is_match(&SandboxPath::parse("/docs/a.md").unwrap()));
        let d = Pattern::compile("docs/", PatternType::Directory).unwrap();
        for p in ["/docs", "/docs/a", "/docs/a/b"] {
            assert!(d.is_match(&SandboxPath::parse(p).unwrap()), "{p}");
        }
        for p in ["/docsx", "/x/docs", "/"] {
            assert!(!d.is_match(&SandboxPath::parse(p).unwrap()), "{p}");
        }
        let root = Pattern::compile("/", PatternType::Directory).unwrap();
        assert!(root.is_match(&SandboxPath::root()));
        assert!(root.is_match(&SandboxPath::parse("/a/b").unwrap()));
    }

    #[test]
    fn malformed_patterns_are_errors() {
        assert_eq!(
            Pattern::compile("", PatternType::Glob).unwrap_err(),
            PatternError::Empty
        );
        assert!(matches!(
            Pattern::compile("**.md", PatternType::Glob),
            Err(PatternError::PartialDoubleStar { .. })
        ));
        assert!(matches!(
            Pattern::compile("/a[", PatternType::Glob),
            Err(PatternError::InvalidGlob { .. })
        ));
        assert!(matches!(
            Pattern::compile("/a/../b", PatternType::Glob),
            Err(PatternError::DotDot)
        ));
        assert!(matches!(
            Pattern::compile(&"a/".repeat(70), PatternType::Glob),
            Err(PatternError::TooLong)
        ));
    }

    #[test]
    fn below_analysis() {
        let walk = |pat: &Pattern, dir: &str| {
            SandboxPath::parse(dir)
                .unwrap()
                .components()
                .fold(pat.start(), |st, s| pat.step(st, s))
        };
        let secrets = Pattern::compile("**/secrets/**", PatternType::Glob).unwrap();
        let st = walk(&secrets, "/app/secrets");
        assert!(secrets.matches_all_below(st));
        let st = walk(&secrets, "/app");
        assert!(!secrets.matches_all_below(st));
        assert!(secrets.can_match_below(st));

        let py = Pattern::compile("**/*.py", PatternType::Glob).unwrap();
        assert!(py.can_match_below(walk(&py, "/src/lib")));
        assert!(!py.matches_all_below(walk(&py, "/src/lib")));

        let file = Pattern::compile("/docs/readme.md", PatternType::File).unwrap();
        assert!(file.can_match_below(walk(&file, "/docs")));
        assert!(!file.can_match_below(walk(&file, "/src")));
        assert!(!file.can_match_below(walk(&file, "/docs/readme.md")));

        let top = Pattern::compile("*.md", PatternType::Glob).unwrap();
        assert!(!top.can_match_below(walk(&top, "/docs")));
    }

    /// A deliberately different matcher (recursive backtracking over segments) to check the
    /// NFA against.
    fn reference(pat: &[&str], path: &[&str]) -> bool {
        match pat.split_first() {
            None => path.is_empty(),
            Some((&"**", rest)) => (0..=path.len()).any(|k| reference(rest, &path[k..])),
            Some((seg, rest)) => match path.split_first() {
                None => false,
                Some((p, prest)) => {
                    seg_match(seg.as_bytes(), p.as_bytes()) && reference(rest, prest)
                }
            },
        }
    }

    /// `*` and `?` only, on one segment.
    fn seg_match(pat: &[u8], s: &[u8]) -> bool {
        match pat.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|k| seg_match(rest, &s[k..])),
            Some((b'?', rest)) => !s.is_empty() && seg_match(rest, &s[1..]),
            Some((c, rest)) => s.first() == Some(c) && seg_match(rest, &s[1..]),
        }
    }

    fn pattern_segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("**".to_owned()),
            Just("*".to_owned()),
            "[ab]{1,2}",
            "[ab?*]{1,3}".prop_filter("no partial **", |s| !s.contains("**")),
        ]
    }

    proptest! {
        #[test]
        fn nfa_agrees_with_reference(
            pat in proptest::collection::vec(pattern_segment(), 1..5),
            path in proptest::collection::vec("[ab]{1,2}", 0..5),
        ) {
            let pattern = Pattern::compile(&pat.join("/"), PatternType::Glob).unwrap();
            let sp = SandboxPath::parse(&path.join("/")).unwrap();
            let pat_refs: Vec<&str> = pat.iter().map(String::as_str).collect();
            let path_refs: Vec<&str> = path.iter().map(String::as_str).collect();
            prop_assert_eq!(pattern.is_match(&sp), reference(&pat_refs, &path_refs));
        }

        #[test]
        fn below_analysis_agrees_with_enumeration(
            pat in proptest::collection::vec(pattern_segment(), 1..4),
            dir in proptest::collection::vec("[ab]", 0..3),
        ) {
            let pattern = Pattern::compile(&pat.join("/"), PatternType::Glob).unwrap();
            let st = dir.iter().fold(pattern.start(), |st, s| pattern.step(st, s));
            // Enumerate every extension of `dir` by 1..=3 segments over the strings of length
            // 1..=3 over {a, b}: every literal the generator can produce.
            let mut any = false;
            let mut all = true;
            let mut alphabet: Vec<String> = vec![];
            for len in 1..=3u32 {
                for bits in 0..(1u32 << len) {
                    alphabet.push((0..len).map(|i| if bits >> i & 1 == 1 { 'b' } else { 'a' }).collect());
                }
            }
            let mut frontier = vec![st];
            for _ in 0..3 {
                let mut next = Vec::new();
                for s in &frontier {
                    for a in &alphabet {
                        let t = pattern.step(*s, a);
                        if pattern.accepts(t) { any = true } else { all = false }
                        next.push(t);
                    }
                }
                frontier = next;
            }
            // With at most 3 pattern segments, depth 3 is enough to see any possible match.
            prop_assert_eq!(pattern.can_match_below(st), any);
            // `matches_all_below` is a sound under-approximation: when it says yes, it is.
            if pattern.matches_all_below(st) { prop_assert!(all); }
        }
    }
}
