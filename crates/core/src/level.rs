//! Access levels and pattern types.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a path lets an agent do. Ordered: `None < View < Read < Write`.
///
/// * `None`: the path does not exist for the agent (ENOENT everywhere, absent from listings).
/// * `View`: the name is listed and `stat` works; content cannot be read (EACCES).
/// * `Read`: content is readable; nothing is writable.
/// * `Write`: read, modify, create and delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Invisible.
    None,
    /// Listed and stat-able, not readable.
    View,
    /// Readable, not writable.
    Read,
    /// Readable and writable.
    Write,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 4] = [Level::None, Level::View, Level::Read, Level::Write];

    /// The lowercase name used in rules, the CLI and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "none",
            Level::View => "view",
            Level::Read => "read",
            Level::Write => "write",
        }
    }

    /// True when the path is visible at all (`>= View`).
    pub fn is_visible(self) -> bool {
        self >= Level::View
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A string that is not one of `none`, `view`, `read`, `write`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown permission level {input:?}: expected one of none, view, read, write")]
pub struct ParseLevelError {
    /// What was given.
    pub input: String,
}

impl FromStr for Level {
    type Err = ParseLevelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Level::ALL
            .into_iter()
            .find(|l| l.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ParseLevelError {
                input: s.to_owned(),
            })
    }
}

/// How a rule's pattern is interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatternType {
    /// Glob pattern (`*`, `?`, `[...]`, `**`), anchored at the root. The wire default.
    #[default]
    Glob,
    /// A directory and everything below it.
    Directory,
    /// Exactly one path.
    File,
}

impl PatternType {
    /// The lowercase name used in rules and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            PatternType::Glob => "glob",
            PatternType::Directory => "directory",
            PatternType::File => "file",
        }
    }

    /// Rank used to order rules of equal priority: file > directory > glob.
    pub(crate) fn rank(self) -> u8 {
        match self {
            PatternType::File => 3,
            PatternType::Directory => 2,
            PatternType::Glob => 1,
        }
    }
}

impl fmt::Display for PatternType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A string that is not one of `glob`, `directory`, `file`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pattern type {input:?}: expected one of glob, directory, file")]
pub struct ParsePatternTypeError {
    /// What was given.
    pub input: String,
}

impl FromStr for PatternType {
    type Err = ParsePatternTypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "glob" => Ok(PatternType::Glob),
            "directory" | "dir" => Ok(PatternType::Directory),
            "file" => Ok(PatternType::File),
            _ => Err(ParsePatternTypeError {
                input: s.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered() {
        assert!(Level::None < Level::View);
        assert!(Level::View < Level::Read);
        assert!(Level::Read < Level::Write);
    }

    #[test]
    fn levels_parse_and_print() {
        for l in Level::ALL {
            assert_eq!(l.as_str().parse::<Level>(), Ok(l));
        }
        assert_eq!("WRITE".parse::<Level>(), Ok(Level::Write));
        assert!("execute".parse::<Level>().is_err());
    }

    #[test]
    fn pattern_types_parse() {
        assert_eq!("dir".parse::<PatternType>(), Ok(PatternType::Directory));
        assert!("regex".parse::<PatternType>().is_err());
    }
}
