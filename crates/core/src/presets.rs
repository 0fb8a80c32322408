//! Built-in permission presets, shared by the server and the CLI, and the default mandatory
//! floor.
//!
//! Same intent as the original SDK's presets, but written for the corrected glob semantics
//! (`**` = zero or more whole segments), so that `**/secrets/**` and `**/.git/**` really hide
//! top-level and deep directories, and without hiding ordinary files:
//! * names that hold only secrets are hidden by name ([`FLOOR_PATTERNS`]);
//! * names that hold public material as often as secrets (`*.pem`, `*.crt`: CA bundles such
//!   as certifi's `cacert.pem`, which every venv has) are hidden only when the file holds a
//!   private key ([`KEY_MATERIAL_PATTERNS`], a [`Content::PrivateKey`] condition);
//! * source files named like secrets (`credentials.py`) stay visible: only data formats named
//!   `credentials.*` are hidden.
//!
//! `agent-safe` and `development` hide what the floor hides plus every `.env*` file and every
//! `secrets/` directory ([`SECRET_PATTERNS`]), so they keep hiding secrets on a server whose
//! floor is turned off.

use crate::{CASE_INSENSITIVE, Content, Level, PermissionRule};

/// Priority of the secret-hiding rules: above anything a preset grants.
pub const SECRET_PRIORITY: i32 = 100;

/// The default mandatory floor (server config `policy.mandatory`, `agentfense run`): real
/// secret material, hidden (`none`) in every sandbox whatever its rules ask. Names only, picked
/// so that no ordinary file matches: no `*.pem` by name (see [`KEY_MATERIAL_PATTERNS`]) and no
/// `credentials*` (source files such as `credentials.py`).
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
    // GnuPG and password stores.
    "**/.gnupg/**",
    "**/.password-store/**",
    // Cloud credentials.
    "**/.aws/**",
    "**/.gcp/**",
    "**/.azure/**",
    "**/.config/gcloud/**",
    "**/application_default_credentials.json",
    // Credentials stored as data (never source code such as `credentials.py`).
    "**/credentials.json",
    "**/credentials.yaml",
    "**/credentials.yml",
    "**/credentials.toml",
    "**/credentials.ini",
    "**/credentials.xml",
    "**/credentials.db",
    // Tokens of tools.
    "**/.netrc",
    "**/.npmrc",
    "**/.pypirc",
    "**/.git-credentials",
    "**/.docker/config.json",
    "**/.kube/config",
    "**/.vault-token",
    "**/.config/gh/hosts.yml",
    "**/.terraform.d/credentials.tfrc.json",
    "**/.cargo/credentials",
];

/// Files hidden only when they hold a private key ([`Content::PrivateKey`]): certificates
/// and CA bundles under these names are public, a private key (alone or next to its
/// certificate) is not. A cloud service-account key file holds its key as a PEM block too.
pub const KEY_MATERIAL_PATTERNS: &[&str] = &[
    "**/*.pem",
    "**/*.crt",
    "**/*.cer",
    "**/*service*account*.json",
    // Copies and variants of SSH keys (`id_rsa.bak`, `deploy_id_ed25519`); `*.pub` files
    // hold no private key and stay visible.
    "**/*id_rsa*",
    "**/*id_dsa*",
    "**/*id_ecdsa*",
    "**/*id_ed25519*",
];

/// Hidden by `agent-safe` and `development` besides the floor's patterns.
pub const SECRET_PATTERNS: &[&str] = &["**/.env*", "**/secrets/**"];

/// Every secret-hiding rule at `priority`: the floor's names, the key-material patterns
/// with their content condition, and `extra` names. All of them match case-insensitively
/// (`.ENV`, `ID_RSA`, `Secrets/` are the same secrets).
fn secret_rules(extra: &[&'static str], priority: i32) -> Vec<PermissionRule> {
    let ci = |p: &str| format!("{CASE_INSENSITIVE}{p}");
    let names = extra.iter().chain(FLOOR_PATTERNS);
    let mut rules: Vec<PermissionRule> = names
        .map(|p| PermissionRule::glob(ci(p), Level::None, priority))
        .collect();
    rules.extend(KEY_MATERIAL_PATTERNS.iter().map(|p| {
        PermissionRule::glob(ci(p), Level::None, priority).when_content(Content::PrivateKey)
    }));
    rules
}

/// The default mandatory floor's rules (see [`FLOOR_PATTERNS`] and
/// [`KEY_MATERIAL_PATTERNS`]).
pub fn default_floor() -> Vec<PermissionRule> {
    secret_rules(&[], 0)
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

fn secrets_hidden() -> Vec<PermissionRule> {
    secret_rules(SECRET_PATTERNS, SECRET_PRIORITY)
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
    /// Files whose name contains `private` hold a private key; no other file does.
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
            ("/certs/server.pem",          F, "read",  "write", "write", "read", "view"),
            ("/certs/private.pem",         F, "none",  "none",  "write", "read", "view"),
            ("/tls/private.crt",           F, "none",  "none",  "write", "read", "view"),
            ("/.venv/lib/certifi/cacert.pem", F, "read", "write", "write", "read", "view"),
            ("/gcp/service-account.json",  F, "read",  "write", "write", "read", "view"),
            ("/gcp/private-service-account.json", F, "none", "none", "write", "read", "view"),
            ("/src/credentials.py",        F, "read",  "write", "write", "read", "view"),
            ("/keys/id_rsa.pub",           F, "read",  "write", "write", "read", "view"),
            ("/keys/id_rsa.private.bak",   F, "none",  "none",  "write", "read", "view"),
            // Every spelling of a secret is the secret.
            ("/.ENV",                      F, "none",  "none",  "write", "read", "view"),
            ("/config/.Env.local",         F, "none",  "none",  "write", "read", "view"),
            ("/PRIVATE.KEY",               F, "none",  "none",  "write", "read", "view"),
            ("/deploy/ID_RSA",             F, "none",  "none",  "write", "read", "view"),
            ("/Secrets/db.txt",            F, "none",  "none",  "write", "read", "view"),
            ("/Credentials.json",          F, "none",  "none",  "write", "read", "view"),
            ("/certs/cert-private.PEM",    F, "none",  "none",  "write", "read", "view"),
            ("/home/.SSH/config",          F, "none",  "none",  "write", "read", "view"),
            ("/keys/id_ed25519_private",   F, "none",  "none",  "write", "read", "view"),
            ("/home/.gnupg/pubring.kbx",   F, "none",  "none",  "write", "read", "view"),
            ("/home/.config/gh/hosts.yml", F, "none",  "none",  "write", "read", "view"),
            ("/certs/client.p12",          F, "none",  "none",  "write", "read", "view"),
            ("/certs/client.pfx",          F, "none",  "none",  "write", "read", "view"),
            ("/credentials.json",          F, "none",  "none",  "write", "read", "view"),
            ("/deploy/credentials",        D, "read",  "write", "write", "read", "view"),
            ("/deploy/credentials.yml",    F, "none",  "none",  "write", "read", "view"),
            ("/home/.ssh/id_rsa",          F, "none",  "none",  "write", "read", "view"),
            ("/home/.ssh/id_rsa.pub",      F, "none",  "none",  "write", "read", "view"),
            ("/id_ed25519",                F, "none",  "none",  "write", "read", "view"),
            ("/keys/id_ecdsa",             F, "none",  "none",  "write", "read", "view"),
            ("/home/.ssh/known_hosts",     F, "none",  "none",  "write", "read", "view"),
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
            let mut holds = |_| path.contains("private");
            for (i, want) in [a, b, c, d, e].iter().enumerate() {
                let cur = policies[i].cursor(&sp);
                let got = policies[i].decide_with(&cur, *kind, &mut holds).level;
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
