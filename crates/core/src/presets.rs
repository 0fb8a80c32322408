//! Built-in permission presets, shared by the server and the CLI.
//!
//! Same intent as the original SDK's presets, but written for the corrected glob semantics
//! (`**` = zero or more whole segments), so that `**/secrets/**` and `**/.git/**` really hide
//! top-level and deep directories. `agent-safe` and `development` hide the same set of
//! credential files ([`SECRET_PATTERNS`]).

use crate::{Level, PermissionRule};

/// Priority of the secret-hiding rules: above anything a preset grants.
pub const SECRET_PRIORITY: i32 = 100;

/// Patterns of files and directories that hold credentials; `none` in `agent-safe` and
/// `development`.
pub const SECRET_PATTERNS: &[&str] = &[
    "**/.env*",
    "**/secrets/**",
    "**/*.key",
    "**/*.pem",
    "**/*.p12",
    "**/*.pfx",
    "**/credentials*",
    "**/id_rsa*",
    "**/id_ed25519*",
    "**/id_ecdsa*",
    "**/id_dsa*",
    "**/.aws/**",
    "**/.gcp/**",
    "**/.azure/**",
    "**/.netrc",
    "**/.npmrc",
    "**/.pypirc",
];

/// The default mandatory floor (server config `policy.mandatory`, `agentfense run`): real
/// secret material, hidden (`none`) in every sandbox whatever its rules ask. Names only, picked
/// so that no ordinary file matches: no `*.pem` (CA bundles such as certifi's `cacert.pem` are
/// public) and no `credentials*` (source files such as `credentials.py`).
pub const FLOOR_PATTERNS: &[&str] = &[
    // Environment files with secrets.
    "**/.env",
    "**/.env.*",
    // SSH: the directory and private keys wherever they lie (not `*.pub`).
    "**/.ssh/**",
    "**/id_rsa",
    "**/id_dsa",
    "**/id_ecdsa",
    "**/id_ecdsa_sk",
    "**/id_ed25519",
    "**/id_ed25519_sk",
    "**/*.ppk",
    // Private key and keystore files.
    "**/*.key",
    "**/*.p12",
    "**/*.pfx",
    "**/*.jks",
    "**/*.keystore",
    // Cloud credentials.
    "**/.aws/**",
    "**/.gcp/**",
    "**/.azure/**",
    "**/.config/gcloud/**",
    "**/application_default_credentials.json",
    // Tokens of tools.
    "**/.netrc",
    "**/.npmrc",
    "**/.pypirc",
    "**/.git-credentials",
    "**/.docker/config.json",
    "**/.kube/config",
];

/// The default mandatory floor's rules (see [`FLOOR_PATTERNS`]).
pub fn default_floor() -> Vec<PermissionRule> {
    FLOOR_PATTERNS
        .iter()
        .map(|p| PermissionRule::glob(*p, Level::None, 0))
        .collect()
}

/// A named, built-in rule set.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    /// The name used by `--preset` and the API.
    pub name: &'static str,
    /// One line for help texts.
    pub description: &'static str,
    build: fn() -> Vec<PermissionRule>,
}

impl Preset {
    /// The preset's rules, in the order they are given to the engine.
    pub fn rules(&self) -> Vec<PermissionRule> {
        (self.build)()
    }
}

fn everything(level: Level) -> Vec<PermissionRule> {
    vec![PermissionRule::glob("**/*", level, 0)]
}

fn secrets_hidden() -> impl Iterator<Item = PermissionRule> {
    SECRET_PATTERNS
        .iter()
        .map(|p| PermissionRule::glob(*p, Level::None, SECRET_PRIORITY))
}

/// Every built-in preset.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "agent-safe",
        description: "read everything, write /output and /tmp, hide secrets and .git",
        build: || {
            let mut r = everything(Level::Read);
            r.push(PermissionRule::glob("/output/**", Level::Write, 10));
            r.push(PermissionRule::glob("/tmp/**", Level::Write, 10));
            r.extend(secrets_hidden());
            r.push(PermissionRule::glob("**/.git/**", Level::None, 50));
            r
        },
    },
    Preset {
        name: "development",
        description: "read and write everything except secrets",
        build: || {
            let mut r = everything(Level::Write);
            r.extend(secrets_hidden());
            r
        },
    },
    Preset {
        name: "full-access",
        description: "read and write everything",
        build: || everything(Level::Write),
    },
    Preset {
        name: "read-only",
        description: "read everything, write nothing",
        build: || everything(Level::Read),
    },
    Preset {
        name: "view-only",
        description: "list and stat everything, read no content",
        build: || everything(Level::View),
    },
];

/// The preset called `name`, if there is one.
pub fn get(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// The names of every preset, sorted.
pub fn names() -> Vec<&'static str> {
    let mut n: Vec<_> = PRESETS.iter().map(|p| p.name).collect();
    n.sort_unstable();
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeKind, Policy, SandboxPath};
    use pretty_assertions::assert_eq;

    /// Paths and, per preset, the expected level:
    /// (path, kind, agent-safe, development, full-access, read-only, view-only).
    #[rustfmt::skip]
    const TABLE: &[(&str, NodeKind, &str, &str, &str, &str, &str)] = {
        use NodeKind::{Dir as D, File as F};
        &[
            ("/",                          D, "view",  "view",  "view",  "view", "view"),
            ("/.env",                      F, "none",  "none",  "write", "read", "view"),
            ("/.env.local",                F, "none",  "none",  "write", "read", "view"),
            ("/a/b/.env.local",            F, "none",  "none",  "write", "read", "view"),
            ("/config/.env.prod",          F, "none",  "none",  "write", "read", "view"),
            ("/.env",                      D, "none",  "none",  "write", "read", "view"),
            ("/.env/lib/site.py",          F, "none",  "none",  "write", "read", "view"),
            ("/secrets",                   D, "none",  "none",  "write", "read", "view"),
            ("/secrets/db.txt",            F, "none",  "none",  "write", "read", "view"),
            ("/app/secrets/db.txt",        F, "none",  "none",  "write", "read", "view"),
            ("/app/secrets/x/y.txt",       F, "none",  "none",  "write", "read", "view"),
            ("/app/secretsx/y.txt",        F, "read",  "write", "write", "read", "view"),
            ("/id.key",                    F, "none",  "none",  "write", "read", "view"),
            ("/certs/server.pem",          F, "none",  "none",  "write", "read", "view"),
            ("/certs/client.p12",          F, "none",  "none",  "write", "read", "view"),
            ("/certs/client.pfx",          F, "none",  "none",  "write", "read", "view"),
            ("/credentials.json",          F, "none",  "none",  "write", "read", "view"),
            ("/deploy/credentials",        D, "none",  "none",  "write", "read", "view"),
            ("/deploy/credentials/gcp.json", F, "none", "none", "write", "read", "view"),
            ("/home/.ssh/id_rsa",          F, "none",  "none",  "write", "read", "view"),
            ("/home/.ssh/id_rsa.pub",      F, "none",  "none",  "write", "read", "view"),
            ("/id_ed25519",                F, "none",  "none",  "write", "read", "view"),
            ("/keys/id_ecdsa",             F, "none",  "none",  "write", "read", "view"),
            ("/home/.ssh/known_hosts",     F, "read",  "write", "write", "read", "view"),
            ("/.aws",                      D, "none",  "none",  "write", "read", "view"),
            ("/.aws/credentials",          F, "none",  "none",  "write", "read", "view"),
            ("/home/u/.aws/config",        F, "none",  "none",  "write", "read", "view"),
            ("/.gcp/key.json",             F, "none",  "none",  "write", "read", "view"),
            ("/.azure/token",              F, "none",  "none",  "write", "read", "view"),
            ("/.netrc",                    F, "none",  "none",  "write", "read", "view"),
            ("/web/.npmrc",                F, "none",  "none",  "write", "read", "view"),
            ("/.pypirc",                   F, "none",  "none",  "write", "read", "view"),
            ("/.git",                      D, "none",  "write", "write", "read", "view"),
            ("/.git/config",               F, "none",  "write", "write", "read", "view"),
            ("/.git/refs/heads/main",      F, "none",  "write", "write", "read", "view"),
            ("/vendor/lib/.git/HEAD",      F, "none",  "write", "write", "read", "view"),
            ("/.gitignore",                F, "read",  "write", "write", "read", "view"),
            ("/src",                       D, "read",  "write", "write", "read", "view"),
            ("/src/main.py",               F, "read",  "write", "write", "read", "view"),
            ("/src/lib/util.rs",           F, "read",  "write", "write", "read", "view"),
            ("/README.md",                 F, "read",  "write", "write", "read", "view"),
            ("/output",                    D, "write", "write", "write", "read", "view"),
            ("/output/r.txt",              F, "write", "write", "write", "read", "view"),
            ("/output/deep/x",             F, "write", "write", "write", "read", "view"),
            ("/output/.env",               F, "none",  "none",  "write", "read", "view"),
            ("/tmp",                       D, "write", "write", "write", "read", "view"),
            ("/tmp/x",                     F, "write", "write", "write", "read", "view"),
            ("/src/output/x",              F, "read",  "write", "write", "read", "view"),
            ("/environment.yml",           F, "read",  "write", "write", "read", "view"),
        ]
    };

    #[test]
    fn preset_table() {
        let names = [
            "agent-safe",
            "development",
            "full-access",
            "read-only",
            "view-only",
        ];
        let policies: Vec<Policy> = names
            .iter()
            .map(|n| Policy::compile(get(n).unwrap().rules()).unwrap())
            .collect();
        let mut mismatches = vec![];
        for (path, kind, a, b, c, d, e) in TABLE {
            let sp = SandboxPath::parse(path).unwrap();
            for (i, want) in [a, b, c, d, e].iter().enumerate() {
                let got = policies[i].level(&sp, *kind);
                if got.as_str() != **want {
                    mismatches.push(format!(
                        "{} {path} ({kind:?}): want {want}, got {got}",
                        names[i]
                    ));
                }
            }
        }
        assert_eq!(mismatches, Vec::<String>::new());
        assert!(TABLE.len() >= 40);
    }

    #[test]
    fn names_are_sorted_and_resolvable() {
        assert_eq!(
            names(),
            [
                "agent-safe",
                "development",
                "full-access",
                "read-only",
                "view-only"
            ]
        );
        assert!(get("nope").is_none());
        for p in PRESETS {
            Policy::compile(p.rules()).unwrap();
        }
    }
}
