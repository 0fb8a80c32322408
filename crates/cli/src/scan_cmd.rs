//! `agentfense scan`: find files that look like secrets before uploading a project, and say
//! which of them the chosen policy would expose to an agent.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::LazyLock;

use agentfense_core::{Level, NodeKind, Policy, SandboxPath};
use anyhow::Context;
use clap::Args;
use regex::Regex;
use serde::Serialize;

use crate::PolicyArgs;
use crate::host_tree::HostTree;

/// Options of `agentfense scan`.
#[derive(Debug, Args)]
pub struct ScanArgs {
    /// The project directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Policy options.
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Largest file whose content is inspected.
const MAX_CONTENT: u64 = 1 << 20;

/// One suspicious file.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// Sandbox path, e.g. `/config/.env.prod`.
    pub path: String,
    /// Why it looks like a secret.
    pub reasons: Vec<String>,
    /// Its level under the policy.
    pub level: Level,
    /// Whether an agent could read it (level >= read).
    pub exposed: bool,
}

struct NameRule {
    re: Regex,
    what: &'static str,
}

#[allow(clippy::expect_used)] // the patterns are constants, checked by the tests
fn re(s: &str) -> Regex {
    Regex::new(s).expect("constant regex")
}

static NAME_RULES: LazyLock<Vec<NameRule>> = LazyLock::new(|| {
    [
        (r"^\.env($|[.\-_])|^\.envrc$", "environment file"),
        (
            // Not `.pem`/`.crt`: those are as often public (CA bundles); a private key in
            // one is found by its content.
            r"\.(key|p12|pfx|jks|keystore|ppk|asc|gpg)$",
            "key or certificate file",
        ),
        (
            r"^id_(rsa|dsa|ecdsa|ed25519)(?:$|[^.]|\.[^p])",
            "SSH private key",
        ),
        (
            r"^credentials(\..*)?$|credentials\.json$|^\.git-credentials$",
            "credentials file",
        ),
        (
            r"^\.(netrc|npmrc|pypirc|pgpass|dockercfg)$",
            "credential config",
        ),
        (
            r"^(service[-_]?account.*|.*-sa-key)\.json$",
            "cloud service-account key",
        ),
        (r"^(secrets?)\.(ya?ml|json|toml|env|txt)$", "secrets file"),
        (r"^kubeconfig$", "cluster credentials"),
    ]
    .into_iter()
    // Every spelling: `.ENV`, `ID_RSA`, `Credentials.json` are the same secrets.
    .map(|(p, what)| NameRule {
        re: re(&format!("(?i){p}")),
        what,
    })
    .collect()
});

/// Directories whose every file is credential material.
const SECRET_DIRS: &[&str] = &[
    ".aws", ".gcp", ".azure", ".ssh", ".gnupg", "secrets", ".docker",
];

static CONTENT_RULES: LazyLock<Vec<NameRule>> = LazyLock::new(|| {
    [
        (
            r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----\r?\n[A-Za-z0-9+/=:\-\r\n ]{40,}",
            "private key block",
        ),
        (r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", "AWS access key id"),
        (r"\bgh[pousr]_[A-Za-z0-9]{36,}\b", "GitHub token"),
        (r"\bgithub_pat_[A-Za-z0-9_]{60,}\b", "GitHub token"),
        (r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b", "Slack token"),
        (r"\bAIza[0-9A-Za-z_\-]{35}\b", "Google API key"),
        (r"\b[sr]k_live_[0-9a-zA-Z]{24,}\b", "Stripe live key"),
        (r#""private_key"\s*:\s*"-----BEGIN"#, "service-account private key"),
        (r"\bglpat-[A-Za-z0-9_\-]{20,}\b", "GitLab token"),
        (r"\bsk-[A-Za-z0-9]{20,}T3BlbkFJ[A-Za-z0-9]{20,}\b", "OpenAI key"),
    ]
    .into_iter()
    .map(|(p, what)| NameRule { re: re(p), what })
    .collect()
});

/// `password = "..."` and friends, whose value is long and random-looking.
static ASSIGNMENT: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r#"(?i)\b[a-z0-9_]*(?:password|passwd|secret|token|api_?key|access_?key|private_?key|client_?secret)[a-z0-9_]*\b\s*[:=]\s*["']?([A-Za-z0-9+/_\-.]{20,})["']?"#,
    )
});

/// Shannon entropy in bits per character.
fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = f64::from(*c) / n;
            -p * p.log2()
        })
        .sum()
}

/// Why `name` (a file name) / `content` looks like a secret; empty if it does not.
pub fn classify(rel: &Path, content: Option<&str>) -> Vec<String> {
    let mut reasons = Vec::new();
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for r in NAME_RULES.iter() {
        if r.re.is_match(&name) {
            reasons.push(format!("name: {}", r.what));
            break;
        }
    }
    if let Some(dir) = rel
        .parent()
        .into_iter()
        .flat_map(|p| p.components())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .find(|c| SECRET_DIRS.contains(&c.to_lowercase().as_str()))
    {
        reasons.push(format!("in a {dir}/ directory"));
    }
    if let Some(text) = content {
        for r in CONTENT_RULES.iter() {
            if r.re.is_match(text) {
                reasons.push(format!("content: {}", r.what));
            }
        }
        for cap in ASSIGNMENT.captures_iter(text) {
            let v = cap.get(1).map_or("", |m| m.as_str());
            // Long, mixed and random-looking: not a placeholder like "changeme" or an
            // identifier like "my_database_password_field".
            let mixed =
                v.bytes().any(|b| b.is_ascii_digit()) && v.bytes().any(|b| b.is_ascii_alphabetic());
            if mixed && entropy(v) > 3.5 {
                reasons.push("content: high-entropy credential assignment".into());
                break;
            }
        }
    }
    reasons
}

fn read_text(path: &Path) -> Option<String> {
    let f = std::fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    f.take(MAX_CONTENT).read_to_end(&mut buf).ok()?;
    // Binary files are judged by name only.
    if buf.contains(&0) {
        return None;
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Scans `dir` (without following symlinks; `.git` internals are skipped except its config).
pub fn scan(dir: &Path, policy: &Policy) -> anyhow::Result<Vec<Finding>> {
    use std::os::unix::fs::MetadataExt;
    let tree = HostTree::default();
    let mut out = Vec::new();
    // Files with several names, by (device, inode): a hidden secret is readable under another
    // name that is not hidden.
    let mut linked: std::collections::HashMap<(u64, u64), Vec<(SandboxPath, Level)>> =
        std::collections::HashMap::new();
    let level_of = |child: &Path, sp: &SandboxPath| {
        policy
            .decide_in(&tree, &dir.join(child), &policy.cursor(sp), NodeKind::File)
            .level
    };
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let host = dir.join(&rel);
        let rd =
            std::fs::read_dir(&host).with_context(|| format!("cannot list {}", host.display()))?;
        for e in rd {
            let e = e.with_context(|| format!("cannot list {}", host.display()))?;
            let ft = e.file_type()?;
            let child = rel.join(e.file_name());
            if ft.is_dir() {
                let skip_git_objects =
                    rel.file_name().is_some_and(|n| n == ".git") && e.file_name() != "config";
                if !skip_git_objects {
                    stack.push(child);
                }
                continue;
            }
            if !ft.is_file() {
                continue;
            }
            if rel.components().any(|c| c.as_os_str() == ".git")
                && child.file_name().is_some_and(|n| n != "config")
            {
                continue;
            }
            if let Ok(m) = e.metadata()
                && m.nlink() > 1
            {
                let sp = SandboxPath::parse(&child.to_string_lossy())?;
                let level = level_of(&child, &sp);
                linked
                    .entry((m.dev(), m.ino()))
                    .or_default()
                    .push((sp, level));
            }
            let content = if e.metadata().map(|m| m.len()).unwrap_or(u64::MAX) <= MAX_CONTENT {
                read_text(&dir.join(&child))
            } else {
                None
            };
            let reasons = classify(&child, content.as_deref());
            if reasons.is_empty() {
                continue;
            }
            let sp = SandboxPath::parse(&child.to_string_lossy())?;
            // As the mount decides: content conditions judged on the file.
            let level = level_of(&child, &sp);
            out.push(Finding {
                path: sp.to_string(),
                reasons,
                level,
                exposed: level >= Level::Read,
            });
        }
    }
    for names in linked.values() {
        let Some((hidden, _)) = names.iter().find(|(_, l)| *l == Level::None) else {
            continue;
        };
        for (sp, level) in names.iter().filter(|(_, l)| *l >= Level::Read) {
            let reason = format!("a hard link to hidden {hidden}: the same file, readable here");
            match out.iter_mut().find(|f| f.path == sp.as_str()) {
                Some(f) => f.reasons.push(reason),
                None => out.push(Finding {
                    path: sp.to_string(),
                    reasons: vec![reason],
                    level: *level,
                    exposed: true,
                }),
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

pub(crate) fn run(args: ScanArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let policy = args.policy.policy()?;
    anyhow::ensure!(
        args.dir.is_dir(),
        "{} is not a directory",
        args.dir.display()
    );
    let findings = scan(&args.dir, &policy)?;
    let exposed = findings.iter().filter(|f| f.exposed).count();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&findings)?)?;
    } else {
        for f in &findings {
            let verdict = if f.exposed {
                "EXPOSED"
            } else if f.level == Level::View {
                "name visible"
            } else {
                "hidden"
            };
            writeln!(
                out,
                "{:<12} {:<5}  {}  ({})",
                verdict,
                f.level,
                crate::terminal::escape(&f.path),
                f.reasons.join("; ")
            )?;
        }
        writeln!(
            out,
            "{} file(s) look like secrets; {exposed} would be readable by the agent under preset {:?}{}",
            findings.len(),
            args.policy.preset,
            if exposed > 0 {
                ": hide them with a rule (e.g. --rule 'PATH=none@200') or move them out"
            } else {
                ""
            }
        )?;
    }
    Ok(if exposed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reasons(path: &str, content: Option<&str>) -> Vec<String> {
        classify(Path::new(path), content)
    }

    #[test]
    fn names() {
        for p in [
            ".env",
            "config/.env.prod",
            "tls.key",
            "home/.ssh/id_rsa",
            "id_ed25519",
            "credentials.json",
            ".aws/credentials",
            ".netrc",
            "sa/service-account-prod.json",
            "secrets.yaml",
            ".ENV",
            "PRIVATE.KEY",
            "ID_RSA",
            "Credentials.json",
            ".Env.local",
            "Secrets/db.txt",
        ] {
            assert!(!reasons(p, None).is_empty(), "{p}");
        }
        for p in [
            "src/main.rs",
            "id_rsa.pub",
            "README.md",
            "environment.yml",
            "keyboard.rs",
            "monkey.py",
            "certifi/cacert.pem",
        ] {
            assert_eq!(reasons(p, None), Vec::<String>::new(), "{p}");
        }
    }

    #[test]
    fn contents() {
        let key = format!(
            "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n",
            "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"
        );
        assert!(
            reasons("notes.txt", Some(&key))
                .iter()
                .any(|r| r.contains("private key"))
        );
        let aws = format!("aws_access_key_id = {}{}\n", "AKIA", "Z7Q2M4XK8PLR5TNW");
        assert!(
            reasons("deploy.cfg", Some(&aws))
                .iter()
                .any(|r| r.contains("AWS"))
        );
        let assign = "DB_PASSWORD=\"q8Zr3vT1xP0wLm5Ks9Bf2Yh7\"";
        assert!(!reasons("app.cfg", Some(assign)).is_empty());
        // Placeholders, prose and code are not secrets.
        for benign in [
            "password = \"changeme\"",
            "let token_count = tokens.len();",
            "api_key: ${API_KEY}",
            "The header -----BEGIN PRIVATE KEY----- starts a PEM block.",
            "secret_field_name_for_the_database_password",
        ] {
            assert_eq!(
                reasons("x.txt", Some(benign)),
                Vec::<String>::new(),
                "{benign}"
            );
        }
    }
}
