//! [`SandboxPath`]: a path inside a sandbox, validated and normalised once, at the edge.

use std::fmt;

/// Longest accepted path, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

/// Longest accepted file name (one path component), in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// Why a path was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path contains a NUL byte.
    #[error("path {input:?} contains a NUL byte")]
    ContainsNul {
        /// The rejected input.
        input: String,
    },
    /// `..` would climb above the sandbox root.
    #[error("path {input:?} climbs above the root with '..'")]
    EscapesRoot {
        /// The rejected input.
        input: String,
    },
    /// Longer than [`MAX_PATH_LEN`].
    #[error("path is {len} bytes long; the limit is {MAX_PATH_LEN}")]
    TooLong {
        /// Length of the input.
        len: usize,
    },
    /// A path component longer than [`MAX_NAME_LEN`].
    #[error("file name {name:?}... is {len} bytes long; the limit is {MAX_NAME_LEN}")]
    NameTooLong {
        /// The name's first 32 characters.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A single path component that is empty, `.`, `..`, or contains `/` or NUL.
    #[error("{input:?} is not a valid file name")]
    InvalidName {
        /// The rejected name.
        input: String,
    },
}

/// A normalised, sandbox-relative path.
///
/// Invariants (enforced by every constructor): starts with `/`; no empty, `.` or `..`
/// components; no trailing `/` except for the root itself; no NUL byte; at most
/// [`MAX_PATH_LEN`] bytes. `..` components are resolved lexically; one that would climb above
/// the root is an error, never clamped.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxPath(String);

impl SandboxPath {
    /// The sandbox root, `/`.
    pub fn root() -> Self {
        SandboxPath("/".to_owned())
    }

    /// Validates and normalises `input`: a leading `/` is added, `.` and empty components are
    /// dropped, `..` is resolved, a trailing `/` is removed. `""` is the root.
    pub fn parse(input: &str) -> Result<Self, PathError> {
        if input.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong { len: input.len() });
        }
        if input.contains('\0') {
            return Err(PathError::ContainsNul {
                input: input.to_owned(),
            });
        }
        let mut parts: Vec<&str> = Vec::new();
        for part in input.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        return Err(PathError::EscapesRoot {
                            input: input.to_owned(),
                        });
                    }
                }
                p if p.len() > MAX_NAME_LEN => {
                    return Err(PathError::NameTooLong {
                        name: p.chars().take(32).collect(),
                        len: p.len(),
                    });
                }
                p => parts.push(p),
            }
        }
        let mut out = String::with_capacity(input.len() + 1);
        for p in &parts {
            out.push('/');
            out.push_str(p);
        }
        if out.is_empty() {
            out.push('/');
        }
        Ok(SandboxPath(out))
    }

    /// The normalised path, e.g. `/src/main.py` (the root is `/`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path without its leading `/` (the root is `""`), for joining onto a host directory.
    pub fn relative(&self) -> &str {
        &self.0[1..]
    }

    /// True for `/`.
    pub fn is_root(&self) -> bool {
        self.0.len() == 1
    }

    /// The components, top first; empty for the root.
    pub fn components(&self) -> impl DoubleEndedIterator<Item = &str> + Clone {
        self.relative().split('/').filter(|c| !c.is_empty())
    }

    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        if self.is_root() {
            0
        } else {
            self.0.bytes().filter(|b| *b == b'/').count()
        }
    }

    /// The last component, `None` for the root.
    pub fn file_name(&self) -> Option<&str> {
        if self.is_root() {
            None
        } else {
            self.0.rsplit('/').next()
        }
    }

    /// The parent directory, `None` for the root.
    pub fn parent(&self) -> Option<SandboxPath> {
        if self.is_root() {
            return None;
        }
        let cut = self.0.rfind('/').unwrap_or(0);
        Some(if cut == 0 {
            SandboxPath::root()
        } else {
            SandboxPath(self.0[..cut].to_owned())
        })
    }

    /// This path with one more component. `name` must be a single valid file name.
    pub fn join(&self, name: &str) -> Result<SandboxPath, PathError> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(PathError::InvalidName {
                input: name.to_owned(),
            });
        }
        if name.len() > MAX_NAME_LEN {
            return Err(PathError::NameTooLong {
                name: name.chars().take(32).collect(),
                len: name.len(),
            });
        }
        let len = self.0.len() + 1 + name.len();
        if len > MAX_PATH_LEN {
            return Err(PathError::TooLong { len });
        }
        let mut s = String::with_capacity(len);
        if !self.is_root() {
            s.push_str(&self.0);
        }
        s.push('/');
        s.push_str(name);
        Ok(SandboxPath(s))
    }

    /// True when `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &SandboxPath) -> bool {
        other.is_root()
            || self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    /// Every proper ancestor except the root, top first (`/a`, `/a/b` for `/a/b/c`).
    pub fn ancestors_below_root(&self) -> impl Iterator<Item = &str> {
        self.0
            .match_indices('/')
            .skip(1)
            .map(move |(i, _)| &self.0[..i])
    }
}

impl fmt::Display for SandboxPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SandboxPath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SandboxPath {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxPath::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> String {
        SandboxPath::parse(s).unwrap().as_str().to_owned()
    }

    #[test]
    fn normalises() {
        assert_eq!(p(""), "/");
        assert_eq!(p("/"), "/");
        assert_eq!(p("docs"), "/docs");
        assert_eq!(p("docs/"), "/docs");
        assert_eq!(p("/docs/"), "/docs");
        assert_eq!(p("//a//b/./c/"), "/a/b/c");
        assert_eq!(p("./a/../b"), "/b");
        assert_eq!(p("a/b/.."), "/a");
    }

    #[test]
    fn rejects_escape_nul_and_length() {
        assert!(matches!(
            SandboxPath::parse("../etc/passwd"),
            Err(PathError::EscapesRoot { .. })
        ));
        assert!(matches!(
            SandboxPath::parse("/a/../../b"),
            Err(PathError::EscapesRoot { .. })
        ));
        assert!(matches!(
            SandboxPath::parse("a\0b"),
            Err(PathError::ContainsNul { .. })
        ));
        assert!(matches!(
            SandboxPath::parse(&"a/".repeat(3000)),
            Err(PathError::TooLong { .. })
        ));
        // `..foo` is an ordinary name, not a climb (the original rejected it).
        assert_eq!(p("..foo/x"), "/..foo/x");
    }

    #[test]
    fn navigation() {
        let x = SandboxPath::parse("/a/b/c").unwrap();
        assert_eq!(x.file_name(), Some("c"));
        assert_eq!(x.parent().unwrap().as_str(), "/a/b");
        assert_eq!(x.depth(), 3);
        assert_eq!(x.relative(), "a/b/c");
        assert_eq!(x.components().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(x.ancestors_below_root().collect::<Vec<_>>(), ["/a", "/a/b"]);
        assert_eq!(SandboxPath::root().depth(), 0);
        assert_eq!(SandboxPath::root().parent(), None);
        assert_eq!(
            SandboxPath::parse("/a").unwrap().parent(),
            Some(SandboxPath::root())
        );
        assert_eq!(SandboxPath::root().join("x").unwrap().as_str(), "/x");
        assert_eq!(x.join("d").unwrap().as_str(), "/a/b/c/d");
        for bad in ["", ".", "..", "a/b", "a\0"] {
            assert!(x.join(bad).is_err(), "{bad:?}");
        }
        let ab = SandboxPath::parse("/a/b").unwrap();
        assert!(x.starts_with(&ab));
        assert!(ab.starts_with(&ab));
        assert!(!SandboxPath::parse("/a/bc").unwrap().starts_with(&ab));
        assert!(x.starts_with(&SandboxPath::root()));
    }

    proptest! {
        #[test]
        fn parse_is_idempotent_and_canonical(s in "[a-z./]{0,40}") {
            if let Ok(once) = SandboxPath::parse(&s) {
                let twice = SandboxPath::parse(once.as_str()).unwrap();
                prop_assert_eq!(&once, &twice);
                let t = once.as_str();
                prop_assert!(t.starts_with('/'));
                prop_assert!(!t.contains("//"));
                prop_assert!(t == "/" || !t.ends_with('/'));
                prop_assert!(once.components().all(|c| c != "." && c != ".."));
                // Rebuilding from components gives the same path.
                let mut rebuilt = SandboxPath::root();
                for c in once.components() {
                    rebuilt = rebuilt.join(c).unwrap();
                }
                prop_assert_eq!(rebuilt, once);
            }
        }

        #[test]
        fn never_escapes(s in "(\\.\\./|[a-z]{1,3}/|\\./){0,8}") {
            // Counting: accepted iff the running depth never goes negative.
            let mut depth: i32 = 0;
            let mut ok = true;
            for c in s.split('/') {
                match c {
                    ".." => { depth -= 1; if depth < 0 { ok = false; break; } }
                    "" | "." => {}
                    _ => depth += 1,
                }
            }
            prop_assert_eq!(SandboxPath::parse(&s).is_ok(), ok);
        }
    }

    #[test]
    fn too_long_names_are_refused_naming_the_limit() {
        let long = "n".repeat(300);
        let e = SandboxPath::parse(&format!("/docs/{long}")).unwrap_err();
        assert!(e.to_string().contains("the limit is 255"), "{e}");
        assert!(matches!(e, PathError::NameTooLong { len: 300, .. }));
        assert!(SandboxPath::root().join(&long).is_err());
        assert!(SandboxPath::parse(&format!("/{}", "n".repeat(255))).is_ok());
    }
}
