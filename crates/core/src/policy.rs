//! The permission engine: rules compiled once, then evaluated per path.
//!
//! ## Semantics
//!
//! 1. **Order.** Rules are sorted once, stably: higher `priority` first; then pattern type
//!    (`file` > `directory` > `glob`); then the original AgentFense's specificity score of the
//!    raw pattern ([`specificity`]); then input order. The first rule in that order that matches
//!    a path is that path's *own* rule; no match means `none`.
//! 2. **Explicit `none` on a directory hides its subtree.** A path below a directory whose own
//!    rule is an explicit `none` rule `N` is visible only if its own rule ranks before `N` (an
//!    exception the policy author placed above the denial). Otherwise it is `none`, with basis
//!    [`Basis::HiddenByAncestor`].
//! 3. **Traversal.** A directory that would be `none` (no rule, an explicit `none`, or hidden by
//!    an ancestor) is shown as `view` ([`Basis::Traversal`]) when some path strictly below it
//!    could be visible under rule 2: that is, some rule of level `>= view` that ranks before
//!    every `none` rule hiding it can match a path below it, and is not shadowed there by a
//!    higher-ranked `none` rule that matches *every* path below it. This is decided from the
//!    patterns alone, not from the files on disk, so the answer is the same for every tree.
//!    Its only imprecision is in favour of showing a directory: for pathological rule sets
//!    where several `none` rules *together* shadow a grant, an empty directory may be listed;
//!    no file content or file name that the rules hide is ever shown.
//! 4. The root is always reachable: at least `view`.
//!
//! Files never get traversal: a `none` file stays invisible whatever could match "below" it.

use serde::{Deserialize, Serialize};

use crate::content::Content;
use crate::pattern::{Pattern, PatternError, State};
use crate::{Level, PatternType, SandboxPath};

/// One access rule, as written by users and sent on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionRule {
    /// Path pattern; see [`PatternType`].
    pub pattern: String,
    /// How `pattern` is interpreted. Defaults to glob.
    #[serde(default, rename = "type")]
    pub pattern_type: PatternType,
    /// The level granted to matching paths.
    pub permission: Level,
    /// Higher wins. Defaults to 0.
    #[serde(default)]
    pub priority: i32,
    /// Only on `none` rules: the rule applies to a regular file only when its content
    /// satisfies this condition (see [`Content`]). Not on the wire: policy files, presets
    /// and the server's floor use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
}

impl PermissionRule {
    /// A glob rule.
    pub fn glob(pattern: impl Into<String>, permission: Level, priority: i32) -> Self {
        PermissionRule {
            pattern: pattern.into(),
            pattern_type: PatternType::Glob,
            permission,
            priority,
            content: None,
        }
    }

    /// This rule, applying only to files whose content satisfies `content`.
    pub fn when_content(mut self, content: Content) -> Self {
        self.content = Some(content);
        self
    }

    /// A rule of any type.
    pub fn new(
        pattern: impl Into<String>,
        pattern_type: PatternType,
        permission: Level,
        priority: i32,
    ) -> Self {
        PermissionRule {
            pattern: pattern.into(),
            pattern_type,
            permission,
            priority,
            content: None,
        }
    }
}

/// A rule set that could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A pattern is malformed.
    #[error("invalid pattern {pattern:?} in rule {index}")]
    InvalidPattern {
        /// Position of the rule in the input list (0-based).
        index: usize,
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        #[source]
        source: PatternError,
    },
    /// A content condition on a rule that grants something (conditions can only hide).
    #[error("rule {index} ({pattern:?}): a content condition only works on a `none` rule, not on `{level}`")]
    GrantingContentCondition {
        /// Position of the rule in the input list (0-based).
        index: usize,
        /// The pattern as given.
        pattern: String,
        /// The level it tried to grant.
        level: Level,
    },
    /// More rules than the engine accepts.
    #[error("{count} rules given; at most {max} are accepted")]
    TooManyRules {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// Identifies a rule by its position in the input list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleRef {
    /// 0-based position in the list given to [`Policy::compile`].
    pub index: usize,
}

/// Whether the evaluated path is a directory; only directories can be traversed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeKind {
    /// A directory.
    Dir,
    /// Anything else (regular file, symlink, device, ...).
    File,
}

/// Why a path got its level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Basis {
    /// The sandbox root, always at least `view`; `rule` is its own rule if one matched.
    Root {
        /// The root's own rule, if any.
        rule: Option<RuleRef>,
    },
    /// The path's own rule decided.
    Rule(RuleRef),
    /// No rule matched: `none` (fail closed).
    NoMatch,
    /// An explicit `none` rule on an ancestor hides this path (its own rule ranks lower).
    HiddenByAncestor {
        /// The `none` rule matching the ancestor.
        rule: RuleRef,
        /// Depth of that ancestor (1 = a top-level directory).
        depth: usize,
    },
    /// A hidden directory shown as `view` because this rule can grant something below it.
    Traversal {
        /// The rule that can grant a path below the directory.
        via: RuleRef,
    },
}

/// The outcome of evaluating one path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Decision {
    /// The effective level.
    pub level: Level,
    /// Why.
    pub basis: Basis,
}

impl Decision {
    /// The rule most responsible for the decision, if any.
    pub fn rule(&self) -> Option<RuleRef> {
        match self.basis {
            Basis::Root { rule } => rule,
            Basis::Rule(r) => Some(r),
            Basis::NoMatch => None,
            Basis::HiddenByAncestor { rule, .. } => Some(rule),
            Basis::Traversal { via } => Some(via),
        }
    }
}

#[derive(Debug, Clone)]
struct Compiled {
    pattern: Pattern,
    level: Level,
    input: RuleRef,
    content: Option<Content>,
}

/// A compiled, ordered rule set. Cheap to share (`Arc<Policy>`); evaluation never allocates
/// more than one small state vector.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The client's rules, then the floor's.
    rules: Vec<PermissionRule>,
    ordered: Vec<Compiled>,
    /// Index in `rules` of the first floor rule.
    floor_start: usize,
    /// Whether any rule has a content condition.
    has_content: bool,
}

/// Evaluation state for one path, extended one component at a time with
/// [`Policy::cursor_child`]. A filesystem keeps one per inode so that a lookup costs one step
/// per rule instead of a walk from the root. Only valid with the policy that made it.
#[derive(Debug, Clone)]
pub struct Cursor {
    states: Vec<State>,
    depth: usize,
    /// Rank of this path's own rule.
    own: Option<usize>,
    /// Best-ranked explicit `none` rule on a proper ancestor (rank, depth).
    blocker: Option<(usize, usize)>,
}

impl Cursor {
    /// Number of components of the path this cursor stands for.
    pub fn depth(&self) -> usize {
        self.depth
    }
}

/// Most rules one policy may hold.
pub const MAX_RULES: usize = 4096;

/// The original AgentFense's specificity score, computed on the raw (un-normalised) pattern:
/// +100 if it starts with `/`; +50 if it does not start with `**`; plus the byte index of the
/// first `**` when that index is > 0; +200 if it contains no `*`.
pub fn specificity(raw: &str) -> i64 {
    let mut score = 0;
    if raw.starts_with('/') {
        score += 100;
    }
    if !raw.starts_with("**") {
        score += 50;
    }
    if let Some(i) = raw.find("**")
        && i > 0
    {
        score += i as i64;
    }
    if !raw.contains('*') {
        score += 200;
    }
    score
}

impl Policy {
    /// Compiles and orders `rules`. Every pattern is checked; the first malformed one is
    /// reported with its index.
    pub fn compile(rules: Vec<PermissionRule>) -> Result<Policy, PolicyError> {
        Policy::compile_with_floor(rules, Vec::new())
    }

    /// Compiles `rules` under a mandatory `floor` (the server's `policy.mandatory`): every
    /// floor rule ranks above every rule of `rules`, whatever their priorities, so no client
    /// rule can lift it. [`RuleRef`]s count the floor's rules after `rules`' (see
    /// [`Policy::is_floor`]).
    pub fn compile_with_floor(
        mut rules: Vec<PermissionRule>,
        floor: Vec<PermissionRule>,
    ) -> Result<Policy, PolicyError> {
        if rules.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules {
                count: rules.len(),
                max: MAX_RULES,
            });
        }
        let floor_start = rules.len();
        rules.extend(floor);
        if let Some((index, r)) = rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.content.is_some() && r.permission != Level::None)
        {
            return Err(PolicyError::GrantingContentCondition {
                index,
                pattern: r.pattern.clone(),
                level: r.permission,
            });
        }
        let mut ordered = rules
            .iter()
            .enumerate()
            .map(|(index, r)| {
                Pattern::compile(&r.pattern, r.pattern_type)
                    .map(|pattern| Compiled {
                        pattern,
                        level: r.permission,
                        input: RuleRef { index },
                        content: r.content,
                    })
                    .map_err(|source| PolicyError::InvalidPattern {
                        index,
                        pattern: r.pattern.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // `sort_by_key` is stable: full ties keep input order (the original's unstable sort
        // reordered them beyond 12 rules).
        ordered.sort_by_key(|c| {
            let r = &rules[c.input.index];
            (
                c.input.index < floor_start,
                std::cmp::Reverse(r.priority),
                std::cmp::Reverse(r.pattern_type.rank()),
                std::cmp::Reverse(specificity(&r.pattern)),
            )
        });
        let has_content = ordered.iter().any(|c| c.content.is_some());
        Ok(Policy {
            rules,
            ordered,
            floor_start,
            has_content,
        })
    }

    /// The rules as given: the client's, then the floor's.
    pub fn rules(&self) -> &[PermissionRule] {
        &self.rules
    }

    /// The client's rules (without the floor).
    pub fn client_rules(&self) -> &[PermissionRule] {
        &self.rules[..self.floor_start]
    }

    /// The mandatory floor's rules.
    pub fn floor(&self) -> &[PermissionRule] {
        &self.rules[self.floor_start..]
    }

    /// Whether `r` is a rule of the mandatory floor.
    pub fn is_floor(&self, r: RuleRef) -> bool {
        r.index >= self.floor_start
    }

    /// The rule behind `r` as audit events and explanations name it: its pattern, prefixed
    /// with `policy.mandatory: ` for a floor rule.
    pub fn describe(&self, r: RuleRef) -> String {
        let pattern = &self.rules[r.index].pattern;
        if self.is_floor(r) {
            format!("policy.mandatory: {pattern}")
        } else {
            pattern.clone()
        }
    }

    /// The rule behind a [`RuleRef`].
    pub fn rule(&self, r: RuleRef) -> &PermissionRule {
        &self.rules[r.index]
    }

    /// The rules in decision order (first match wins).
    pub fn ordered(&self) -> impl Iterator<Item = (RuleRef, &PermissionRule)> {
        self.ordered
            .iter()
            .map(|c| (c.input, &self.rules[c.input.index]))
    }

    /// The cursor for the root.
    pub fn cursor_root(&self) -> Cursor {
        let states: Vec<State> = self.ordered.iter().map(|c| c.pattern.start()).collect();
        let own = self.first_accepting(&states);
        Cursor {
            states,
            depth: 0,
            own,
            blocker: None,
        }
    }

    /// The cursor for `parent`'s child called `name` (one path component).
    pub fn cursor_child(&self, parent: &Cursor, name: &str) -> Cursor {
        let states: Vec<State> = self
            .ordered
            .iter()
            .zip(&parent.states)
            .map(|(c, st)| c.pattern.step(*st, name))
            .collect();
        let own = self.first_accepting(&states);
        // The root's own rule never hides anything: the root is always reachable.
        let parent_none = match parent.own {
            Some(rank) if parent.depth > 0 && self.ordered[rank].level == Level::None => {
                Some((rank, parent.depth))
            }
            _ => None,
        };
        let blocker = match (parent.blocker, parent_none) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        Cursor {
            states,
            depth: parent.depth + 1,
            own,
            blocker,
        }
    }

    /// The cursor for `path`.
    pub fn cursor(&self, path: &SandboxPath) -> Cursor {
        path.components()
            .fold(self.cursor_root(), |c, name| self.cursor_child(&c, name))
    }

    /// The decision for the path a cursor stands for.
    ///
    /// Content-conditioned rules are taken to apply (their files are hidden): only
    /// [`Policy::decide_in`], which can read files, lifts them.
    pub fn decide(&self, cur: &Cursor, kind: NodeKind) -> Decision {
        self.decide_with(cur, kind, &mut |_| true)
    }

    /// [`Policy::decide`], asking `holds` whether the file satisfies a content condition
    /// (called only for files that a content-conditioned rule matches). Directories shown
    /// for traversal stay shown: [`Policy::decide_in`] also checks the tree below.
    pub fn decide_with(
        &self,
        cur: &Cursor,
        kind: NodeKind,
        holds: &mut dyn FnMut(Content) -> bool,
    ) -> Decision {
        if kind == NodeKind::File
            && cur.depth > 0
            && let Some(d) = self.content_rule(cur, holds)
        {
            return d;
        }
        self.decide_inner(cur, kind == NodeKind::Dir)
    }

    /// The first content-conditioned rule that ranks before the path's own rule (and before
    /// every `none` hiding it anyway), matches the path, and whose condition holds.
    fn content_rule(
        &self,
        cur: &Cursor,
        holds: &mut dyn FnMut(Content) -> bool,
    ) -> Option<Decision> {
        if !self.has_content {
            return None;
        }
        let limit = cur
            .own
            .unwrap_or(usize::MAX)
            .min(cur.blocker.map_or(usize::MAX, |b| b.0))
            .min(self.ordered.len());
        self.ordered[..limit]
            .iter()
            .zip(&cur.states)
            .filter(|(c, st)| c.content.is_some() && c.pattern.accepts(**st))
            .find(|(c, _)| c.content.is_some_and(&mut *holds))
            .map(|(c, _)| Decision {
                level: Level::None,
                basis: Basis::Rule(c.input),
            })
    }

    /// The decision a directory has without traversal (rule 3): what it is when nothing
    /// below it is visible. Used by [`Policy::decide_in`].
    pub(crate) fn decide_untraversed(&self, cur: &Cursor) -> Decision {
        self.decide_inner(cur, false)
    }

    fn decide_inner(&self, cur: &Cursor, traversable: bool) -> Decision {
        let own = cur.own.map(|rank| (rank, &self.ordered[rank]));
        if cur.depth == 0 {
            let level = own.map_or(Level::None, |(_, c)| c.level).max(Level::View);
            return Decision {
                level,
                basis: Basis::Root {
                    rule: own.map(|(_, c)| c.input),
                },
            };
        }
        let blocker_rank = cur.blocker.map_or(usize::MAX, |b| b.0);
        if let Some((rank, c)) = own
            && c.level.is_visible()
            && rank < blocker_rank
        {
            return Decision {
                level: c.level,
                basis: Basis::Rule(c.input),
            };
        }
        if traversable && let Some(via) = self.traversal(cur, own, blocker_rank)
        {
            return Decision {
                level: Level::View,
                basis: Basis::Traversal { via },
            };
        }
        let basis = match (own, cur.blocker) {
            // Own rule grants something, but an ancestor's `none` outranks it.
            (Some((_, c)), Some((rank, depth))) if c.level.is_visible() => {
                Basis::HiddenByAncestor {
                    rule: self.ordered[rank].input,
                    depth,
                }
            }
            (Some((_, c)), _) => Basis::Rule(c.input),
            (None, Some((rank, depth))) => Basis::HiddenByAncestor {
                rule: self.ordered[rank].input,
                depth,
            },
            (None, None) => Basis::NoMatch,
        };
        Decision {
            level: Level::None,
            basis,
        }
    }

    /// Evaluates one path (see the module docs for the exact rule).
    pub fn evaluate(&self, path: &SandboxPath, kind: NodeKind) -> Decision {
        self.decide(&self.cursor(path), kind)
    }

    /// Convenience: the effective level of `path`.
    pub fn level(&self, path: &SandboxPath, kind: NodeKind) -> Level {
        self.evaluate(path, kind).level
    }

    /// The rank of the first rule matching a path, content-conditioned rules aside (they
    /// are weighed for files only, by [`Policy::decide_with`]).
    fn first_accepting(&self, states: &[State]) -> Option<usize> {
        self.ordered
            .iter()
            .zip(states)
            .position(|(c, st)| c.content.is_none() && c.pattern.accepts(*st))
    }

    /// The rule that makes a hidden directory traversable, if any (rule 3 of the module docs).
    fn traversal(
        &self,
        cur: &Cursor,
        own: Option<(usize, &Compiled)>,
        blocker_rank: usize,
    ) -> Option<RuleRef> {
        // A grant below must outrank every `none` that hides this directory: the ancestors'
        // and, when this directory's own rule is `none`, that one too.
        let own_none = match own {
            Some((rank, c)) if c.level == Level::None => rank,
            _ => usize::MAX,
        };
        let limit = blocker_rank.min(own_none).min(self.ordered.len());
        for (rank, (c, st)) in self.ordered[..limit].iter().zip(&cur.states).enumerate() {
            if c.content.is_some() {
                // Hides some files, never a whole subtree.
                continue;
            }
            if c.level == Level::None {
                // A `none` that covers the whole subtree shadows every lower-ranked grant.
                if c.pattern.matches_all_below(*st) {
                    return None;
                }
            } else if c.pattern.can_match_below(*st) {
                debug_assert!(rank < limit);
                return Some(c.input);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;
    use proptest::prelude::*;

    fn policy(rules: &[(&str, PatternType, Level, i32)]) -> Policy {
        Policy::compile(
            rules
                .iter()
                .map(|(p, t, l, pr)| PermissionRule::new(*p, *t, *l, *pr))
                .collect(),
        )
        .unwrap()
    }

    fn lvl(p: &Policy, path: &str, kind: NodeKind) -> Level {
        p.level(&SandboxPath::parse(path).unwrap(), kind)
    }

    use Level::{None as NoneL, Read, View, Write};
    use NodeKind::{Dir, File as F};
    use PatternType::{Directory, File as FileT, Glob};

    #[test]
    fn specificity_matches_the_original() {
        for (pat, score) in [
            ("**/*", 0),
            ("**/.env*", 0),
            ("**", 0),
            ("*.md", 50),
            ("TKT-001*", 50),
            ("src/**", 54),
            ("/src/**/*.py", 155),
            ("/output/**", 158),
            ("/secrets/**", 159),
            ("docs", 250),
            ("/config.yaml", 350),
            ("/docs/", 350),
        ] {
            assert_eq!(specificity(pat), score, "{pat}");
        }
    }

    #[test]
    fn no_rules_is_none_except_root() {
        let p = policy(&[]);
        assert_eq!(lvl(&p, "/a", F), NoneL);
        assert_eq!(lvl(&p, "/a", Dir), NoneL);
        let root = p.evaluate(&SandboxPath::root(), Dir);
        assert_eq!(
            root,
            Decision {
                level: View,
                basis: Basis::Root { rule: Option::None }
            }
        );
    }

    #[test]
    fn priority_then_type_then_specificity_then_input_order() {
        // file@100 none beats dir@10 write beats glob@1 read.
        let p = policy(&[
            ("**/*", Glob, Read, 1),
            ("/docs", Directory, Write, 10),
            ("/docs/secret.txt", FileT, NoneL, 100),
        ]);
        assert_eq!(lvl(&p, "/docs/secret.txt", F), NoneL);
        assert_eq!(lvl(&p, "/docs/a.txt", F), Write);
        assert_eq!(lvl(&p, "/x.txt", F), Read);

        // Same priority: file beats directory beats glob.
        let p = policy(&[
            ("/a/**", Glob, Read, 0),
            ("/a", Directory, View, 0),
            ("/a/b", FileT, Write, 0),
        ]);
        assert_eq!(lvl(&p, "/a/b", F), Write);
        assert_eq!(lvl(&p, "/a/c", F), View);

        // Same priority and type: the more specific pattern wins.
        let p = policy(&[("**/*", Glob, Read, 0), ("/out/**", Glob, Write, 0)]);
        assert_eq!(lvl(&p, "/out/x", F), Write);

        // Full tie: input order (stable even with many rules).
        let mut rules: Vec<PermissionRule> = (0..20)
            .map(|i| PermissionRule::glob(format!("/f{i}"), View, 0))
            .collect();
        rules.push(PermissionRule::glob("/f*", Write, 0));
        rules.push(PermissionRule::glob("/f*", Read, 0));
        let p = Policy::compile(rules).unwrap();
        assert_eq!(lvl(&p, "/fx", F), Write);
        let d = p.evaluate(&SandboxPath::parse("/fx").unwrap(), F);
        assert_eq!(d.rule(), Some(RuleRef { index: 20 }));
    }

    #[test]
    fn decision_names_the_rule() {
        let p = policy(&[("**/*", Glob, Read, 0), ("**/.env*", Glob, NoneL, 100)]);
        let d = p.evaluate(&SandboxPath::parse("/a/.env").unwrap(), F);
        assert_eq!(
            d,
            Decision {
                level: NoneL,
                basis: Basis::Rule(RuleRef { index: 1 })
            }
        );
        assert_eq!(p.rule(d.rule().unwrap()).pattern, "**/.env*");
    }

    #[test]
    fn traversal_reaches_deep_grants() {
        // The original's bug: `**/*.py` alone hid every .py below the top level.
        let p = policy(&[("**/*.py", Glob, Read, 0)]);
        assert_eq!(lvl(&p, "/src", Dir), View);
        assert_eq!(lvl(&p, "/src/lib", Dir), View);
        assert_eq!(lvl(&p, "/src/lib/a.py", F), Read);
        assert_eq!(lvl(&p, "/src/lib/a.txt", F), NoneL);
        // Files are never traversed.
        assert_eq!(lvl(&p, "/README", F), NoneL);
        let d = p.evaluate(&SandboxPath::parse("/src").unwrap(), Dir);
        assert_eq!(
            d.basis,
            Basis::Traversal {
                via: RuleRef { index: 0 }
            }
        );

        // A single file rule opens exactly its ancestors.
        let p = policy(&[("/docs/readme.md", FileT, Read, 0)]);
        assert_eq!(lvl(&p, "/docs", Dir), View);
        assert_eq!(lvl(&p, "/docs/readme.md", F), Read);
        assert_eq!(lvl(&p, "/docs/other.md", F), NoneL);
        assert_eq!(lvl(&p, "/src", Dir), NoneL);
        // Top-level-only globs open nothing below.
        let p = policy(&[("*.md", Glob, Read, 0)]);
        assert_eq!(lvl(&p, "/docs", Dir), NoneL);
    }

    #[test]
    fn explicit_none_hides_subtree_unless_outranked() {
        let p = policy(&[
            ("**/*", Glob, Read, 0),
            ("**/credentials*", Glob, NoneL, 100),
        ]);
        // A directory named like a secret hides its contents, even though `**/*` matches them.
        assert_eq!(lvl(&p, "/credentials", Dir), NoneL);
        assert_eq!(lvl(&p, "/credentials/prod.json", F), NoneL);
        let d = p.evaluate(&SandboxPath::parse("/credentials/prod.json").unwrap(), F);
        assert_eq!(
            d.basis,
            Basis::HiddenByAncestor {
                rule: RuleRef { index: 1 },
                depth: 1
            }
        );
        // An exception ranked above the denial re-opens exactly that path.
        let p = policy(&[
            ("**/*", Glob, Read, 0),
            ("/secrets/**", Glob, NoneL, 100),
            ("/secrets/public.txt", FileT, Read, 200),
        ]);
        assert_eq!(lvl(&p, "/secrets", Dir), View);
        assert_eq!(lvl(&p, "/secrets/public.txt", F), Read);
        assert_eq!(lvl(&p, "/secrets/private.txt", F), NoneL);
        assert_eq!(lvl(&p, "/secrets/sub", Dir), NoneL);
    }

    #[test]
    fn covering_none_blocks_traversal() {
        let p = policy(&[("**/*.py", Glob, Read, 0), ("**/.git/**", Glob, NoneL, 50)]);
        assert_eq!(lvl(&p, "/.git", Dir), NoneL);
        assert_eq!(lvl(&p, "/a/.git/hooks", Dir), NoneL);
        assert_eq!(lvl(&p, "/a/.git/hooks/x.py", F), NoneL);
        assert_eq!(lvl(&p, "/a", Dir), View);
    }

    #[test]
    fn root_is_always_reachable() {
        let p = policy(&[("**", Glob, NoneL, 0)]);
        assert_eq!(lvl(&p, "/", Dir), View);
        assert_eq!(lvl(&p, "/a", Dir), NoneL);
        let p = policy(&[("**", Glob, Write, 0)]);
        assert_eq!(lvl(&p, "/", Dir), Write);
        // A `none` on the root itself does not hide the tree below.
        let p = policy(&[("/", FileT, NoneL, 100), ("/a", FileT, Read, 0)]);
        assert_eq!(lvl(&p, "/a", F), Read);
    }

    #[test]
    fn invalid_pattern_names_index_and_pattern() {
        let err = Policy::compile(vec![
            PermissionRule::glob("**/*", Read, 0),
            PermissionRule::glob("/a[", Read, 0),
        ])
        .unwrap_err();
        assert!(matches!(err, PolicyError::InvalidPattern { index: 1, .. }));
        assert!(err.to_string().contains("\"/a[\""), "{err}");
    }

    #[test]
    fn rules_deserialize_with_defaults() {
        let r: PermissionRule =
            serde_json::from_str(r#"{"pattern":"/docs/**","permission":"write"}"#).unwrap();
        assert_eq!(r, PermissionRule::glob("/docs/**", Write, 0));
        assert!(serde_json::from_str::<PermissionRule>(r#"{"pattern":"/x"}"#).is_err());
        assert!(
            serde_json::from_str::<PermissionRule>(
                r#"{"pattern":"/x","permission":"read","prio":1}"#
            )
            .is_err()
        );
    }

    // ---- Properties over a small universe of paths ----------------------------------------

    fn rule_strategy() -> impl Strategy<Value = PermissionRule> {
        let pat = proptest::collection::vec(
            prop_oneof![Just("**"), Just("*"), Just("a"), Just("b"), Just("s")],
            1..4,
        )
        .prop_map(|v| v.join("/"));
        (
            pat,
            prop_oneof![Just(Glob), Just(Directory), Just(FileT)],
            prop_oneof![Just(NoneL), Just(View), Just(Read), Just(Write)],
            0i32..3,
        )
            .prop_map(|(p, t, l, pr)| PermissionRule::new(p, t, l, pr))
    }

    /// Every path of depth 1..=3 over {a, b, s}.
    fn universe() -> Vec<SandboxPath> {
        let names = ["a", "b", "s"];
        let mut out = vec![];
        let mut frontier = vec![SandboxPath::root()];
        for _ in 0..3 {
            let mut next = vec![];
            for p in &frontier {
                for n in names {
                    let c = p.join(n).unwrap();
                    out.push(c.clone());
                    next.push(c);
                }
            }
            frontier = next;
        }
        out
    }

    proptest! {
        /// Reachability is consistent: a visible path's ancestors are all visible
        /// directories, so the filesystem can always walk to what the rules grant.
        #[test]
        fn visible_paths_have_visible_ancestors(rules in proptest::collection::vec(rule_strategy(), 0..6)) {
            let p = Policy::compile(rules).unwrap();
            for path in universe() {
                for kind in [F, Dir] {
                    if p.level(&path, kind).is_visible() {
                        let mut a = path.parent();
                        while let Some(anc) = a {
                            prop_assert!(p.level(&anc, Dir).is_visible(),
                                "{path} visible but ancestor {anc} hidden");
                            a = anc.parent();
                        }
                    }
                }
            }
        }

        /// A path's own rule is respected unless an explicit `none` on an ancestor outranks it;
        /// a path no rule matches is never readable.
        #[test]
        fn levels_come_from_rules(rules in proptest::collection::vec(rule_strategy(), 0..6)) {
            let p = Policy::compile(rules).unwrap();
            for path in universe() {
                let d = p.evaluate(&path, F);
                match d.basis {
                    Basis::Rule(r) => prop_assert_eq!(p.rule(r).permission, d.level),
                    Basis::NoMatch | Basis::HiddenByAncestor { .. } => prop_assert_eq!(d.level, NoneL),
                    Basis::Traversal { .. } => prop_assert!(false, "files are never traversed"),
                    Basis::Root { .. } => prop_assert!(false, "not the root"),
                }
                let dd = p.evaluate(&path, Dir);
                if let Basis::Traversal { .. } = dd.basis { prop_assert_eq!(dd.level, View) }
                // Traversal only ever raises `none` to `view`.
                prop_assert!(dd.level == d.level || (d.level == NoneL && dd.level == View));
            }
        }

        /// Cursor-based evaluation equals evaluation from scratch.
        #[test]
        fn cursor_agrees_with_evaluate(rules in proptest::collection::vec(rule_strategy(), 0..6)) {
            let p = Policy::compile(rules).unwrap();
            for path in universe() {
                let parent = p.cursor(&path.parent().unwrap());
                let c = p.cursor_child(&parent, path.file_name().unwrap());
                prop_assert_eq!(p.decide(&c, Dir), p.evaluate(&path, Dir));
            }
        }
    }

    #[test]
    fn the_floor_outranks_every_client_rule() {
        use crate::Level::{None as Hidden, Read, Write};
        let client = vec![
            PermissionRule::glob("**/*", Read, 0),
            // A client trying to lift the floor with a higher priority and a more specific rule.
            PermissionRule::new("deploy/id_rsa", PatternType::File, Write, i32::MAX),
        ];
        let p = Policy::compile_with_floor(client, crate::presets::default_floor()).unwrap();
        let key = SandboxPath::parse("/deploy/id_rsa").unwrap();
        let d = p.evaluate(&key, NodeKind::File);
        assert_eq!(d.level, Hidden);
        let r = d.rule().unwrap();
        assert!(p.is_floor(r));
        assert_eq!(p.describe(r), "policy.mandatory: **/id_rsa");
        assert_eq!(p.client_rules().len(), 2);
        let src = SandboxPath::parse("/src/credentials.py").unwrap();
        assert_eq!(p.evaluate(&src, NodeKind::File).level, Read);
        // A `.pem` is hidden only when it holds a private key; without reading it, the
        // engine assumes it does (fail closed).
        let bundle = p.cursor(&SandboxPath::parse("/.venv/lib/certifi/cacert.pem").unwrap());
        assert_eq!(p.decide(&bundle, NodeKind::File).level, Hidden);
        let public = p.decide_with(&bundle, NodeKind::File, &mut |_| false);
        assert_eq!(public.level, Read);
        let key = p.decide_with(&bundle, NodeKind::File, &mut |_| true);
        assert_eq!(key.level, Hidden);
        assert_eq!(p.describe(key.rule().unwrap()), "policy.mandatory: **/*.pem");
        // Directories never match a content condition.
        assert_eq!(p.decide(&bundle, NodeKind::Dir).level, Read);
    }

    #[test]
    fn content_conditions_only_hide() {
        let r = PermissionRule::glob("**/*.pem", Level::Read, 0).when_content(Content::PrivateKey);
        let e = Policy::compile(vec![r]).unwrap_err();
        assert!(e.to_string().contains("only works on a `none` rule"), "{e}");
        // As YAML/JSON: `content: private-key`.
        let r: PermissionRule = serde_json::from_str(
            r#"{"pattern": "**/*.pem", "permission": "none", "content": "private-key"}"#,
        )
        .unwrap();
        assert_eq!(r.content, Some(Content::PrivateKey));
    }
}
