//! The engine's unit and property tests.
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
        serde_json::from_str::<PermissionRule>(r#"{"pattern":"/x","permission":"read","prio":1}"#)
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
    assert_eq!(p.describe(r), "policy.mandatory: (?i)**/id_rsa");
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
    assert_eq!(
        p.describe(key.rule().unwrap()),
        "policy.mandatory: (?i)**/*.pem"
    );
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
