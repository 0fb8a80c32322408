//! The one-line rule syntax of `--rule`: `[TYPE:]PATTERN=LEVEL[@PRIORITY]`.
//!
//! `TYPE` is `glob` (the default), `dir`/`directory` or `file`; the last `=` separates the
//! pattern from the level (patterns may contain `=`); the priority is a whole number. Examples:
//! `/docs/**=write@10`, `dir:/build=none@-5`, `**/*.py=read`.

use crate::{Level, PatternType, PermissionRule};

/// A rule spec that does not parse, with what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleSpecError {
    /// No `=` at all.
    #[error(
        "rule {spec:?} has no '=': write it as PATTERN=LEVEL[@PRIORITY], e.g. '/docs/**=write@10'"
    )]
    NoLevel {
        /// The spec as given.
        spec: String,
    },
    /// The level is not one of none, view, read, write.
    #[error("rule {spec:?}: unknown level {level:?} (expected none, view, read or write)")]
    Level {
        /// The spec as given.
        spec: String,
        /// The level as given.
        level: String,
    },
    /// The priority is not a whole number.
    #[error("rule {spec:?}: priority {priority:?} is not a whole number")]
    Priority {
        /// The spec as given.
        spec: String,
        /// The priority as given.
        priority: String,
    },
    /// Nothing before the `=`.
    #[error("rule {spec:?} has an empty pattern")]
    EmptyPattern {
        /// The spec as given.
        spec: String,
    },
}

impl PermissionRule {
    /// Parses `[TYPE:]PATTERN=LEVEL[@PRIORITY]` (see the module docs). The pattern itself is
    /// checked when the rules are compiled.
    pub fn parse_spec(spec: &str) -> Result<PermissionRule, RuleSpecError> {
        let (lhs, rhs) = spec
            .rsplit_once('=')
            .ok_or_else(|| RuleSpecError::NoLevel {
                spec: spec.to_owned(),
            })?;
        let (level, priority) = match rhs.split_once('@') {
            Some((l, p)) => (
                l,
                p.trim()
                    .parse::<i32>()
                    .map_err(|_| RuleSpecError::Priority {
                        spec: spec.to_owned(),
                        priority: p.to_owned(),
                    })?,
            ),
            None => (rhs, 0),
        };
        let level: Level = level.parse().map_err(|_| RuleSpecError::Level {
            spec: spec.to_owned(),
            level: level.to_owned(),
        })?;
        let (pattern_type, pattern) = match lhs.split_once(':') {
            Some((t, p)) if ["glob", "dir", "directory", "file"].contains(&t) => {
                (t.parse::<PatternType>().unwrap_or_default(), p)
            }
            _ => (PatternType::Glob, lhs),
        };
        if pattern.trim().is_empty() {
            return Err(RuleSpecError::EmptyPattern {
                spec: spec.to_owned(),
            });
        }
        Ok(PermissionRule::new(pattern, pattern_type, level, priority))
    }

    /// The rule as a spec [`PermissionRule::parse_spec`] reads back (content conditions,
    /// which the syntax lacks, aside).
    pub fn to_spec(&self) -> String {
        format!(
            "{}:{}={}@{}",
            self.pattern_type, self.pattern, self.permission, self.priority
        )
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn specs_parse_as_documented() {
        assert_eq!(
            PermissionRule::parse_spec("/docs/**=write@10").unwrap(),
            PermissionRule::glob("/docs/**", Level::Write, 10)
        );
        assert_eq!(
            PermissionRule::parse_spec("dir:/build=none@-5").unwrap(),
            PermissionRule::new("/build", PatternType::Directory, Level::None, -5)
        );
        // The last '=' separates: the pattern keeps its own.
        assert_eq!(
            PermissionRule::parse_spec("file:/a=b=view").unwrap(),
            PermissionRule::new("/a=b", PatternType::File, Level::View, 0)
        );
        // An unknown prefix is part of a glob.
        assert_eq!(
            PermissionRule::parse_spec("http://x=read").unwrap().pattern,
            "http://x"
        );
        for bad in ["/x", "/x=admin", "/x=read@high", "=read", "file:=read"] {
            let e = PermissionRule::parse_spec(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }

    proptest! {
        /// Whatever the input: no panic; a parsed rule prints as a spec that parses back to it.
        #[test]
        fn specs_round_trip(spec in ".{0,40}") {
            if let Ok(r) = PermissionRule::parse_spec(&spec) {
                prop_assert_eq!(PermissionRule::parse_spec(&r.to_spec()), Ok(r));
            }
        }
    }
}
