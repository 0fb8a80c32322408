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
use crate::pattern::{Name, Pattern, PatternError, State, split_flags};
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
    #[error(
        "rule {index} ({pattern:?}): a content condition only works on a `none` rule, not on `{level}`"
    )]
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
    /// Whether any pattern is case-insensitive (names are lower-cased only then).
    has_fold: bool,
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
    /// Rank of the first content-conditioned rule matching this path, if any.
    content: Option<usize>,
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
    // Flags (`(?i)`) are not part of the pattern's shape.
    let raw = split_flags(raw).0;
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
        let has_fold = ordered.iter().any(|c| c.pattern.folds());
        Ok(Policy {
            rules,
            ordered,
            floor_start,
            has_content,
            has_fold,
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

    /// One line saying why a decision was made, naming the rule (`policy explain`, and the
    /// MCP server's denials).
    pub fn explain(&self, d: &Decision) -> String {
        let rule = |r: RuleRef| {
            let pr = self.rule(r);
            let only = pr
                .content
                .map(|c| format!(", only {}", c.describe()))
                .unwrap_or_default();
            if self.is_floor(r) {
                // Above every rule of the sandbox, whatever their priorities.
                return format!(
                    "mandatory floor rule {:?} ({} {}{only}, policy.mandatory)",
                    pr.pattern, pr.pattern_type, pr.permission
                );
            }
            format!(
                "rule #{} {:?} ({} {}{only}, priority {})",
                r.index, pr.pattern, pr.pattern_type, pr.permission, pr.priority
            )
        };
        match d.basis {
            Basis::Root { rule: Some(r) } => {
                format!("sandbox root (always reachable); {}", rule(r))
            }
            Basis::Root { rule: None } => "sandbox root (always reachable)".to_owned(),
            Basis::Rule(r) => rule(r),
            Basis::NoMatch => "no rule matches (default none)".to_owned(),
            Basis::HiddenByAncestor { rule: r, depth } => {
                format!(
                    "hidden: its level-{depth} ancestor is denied by {}",
                    rule(r)
                )
            }
            Basis::Traversal { via } => {
                format!(
                    "traversable directory, shown while something below it is visible: \
                     granted by {}",
                    rule(via)
                )
            }
        }
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
            content: self.first_content(&states),
            states,
            depth: 0,
            own,
            blocker: None,
        }
    }

    /// The cursor for `parent`'s child called `name` (one path component).
    pub fn cursor_child(&self, parent: &Cursor, name: &str) -> Cursor {
        let name = Name::new(name, self.has_fold);
        let states: Vec<State> = self
            .ordered
            .iter()
            .zip(&parent.states)
            .map(|(c, st)| c.pattern.step_name(*st, &name))
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
            content: self.first_content(&states),
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
        let first = cur.content?;
        let limit = cur
            .own
            .unwrap_or(usize::MAX)
            .min(cur.blocker.map_or(usize::MAX, |b| b.0))
            .min(self.ordered.len());
        if first >= limit {
            return None;
        }
        self.ordered[first..limit]
            .iter()
            .zip(&cur.states[first..])
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
        if traversable && let Some(via) = self.traversal(cur, own, blocker_rank) {
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

    /// The rank of the first content-conditioned rule matching a path.
    fn first_content(&self, states: &[State]) -> Option<usize> {
        if !self.has_content {
            return None;
        }
        self.ordered
            .iter()
            .zip(states)
            .position(|(c, st)| c.content.is_some() && c.pattern.accepts(*st))
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
mod tests;
