//! Policy options shared by every command: `--preset`, `--policy FILE`, repeatable `--rule`.

use std::path::PathBuf;

use agentfense_core::{PermissionRule, Policy, presets};
use anyhow::Context;
use clap::Args;

/// How the rules of a command are assembled: the preset's rules first, then the rules of
/// `--policy`, then each `--rule` in order (order breaks ties, see `docs/permissions.md`).
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// Built-in preset to start from (`agentfense presets` lists them); `none` starts from no
    /// rules (everything hidden).
    #[arg(long, value_name = "NAME", default_value = "agent-safe")]
    pub preset: String,

    /// YAML or JSON file with a list of rules: `[{pattern, type?, permission, priority?}]`.
    #[arg(long = "policy", value_name = "FILE")]
    pub policy_file: Option<PathBuf>,

    /// Extra rule `[TYPE:]PATTERN=LEVEL[@PRIORITY]`, e.g. `/docs/**=write@10` or
    /// `dir:/build=none@50`. TYPE is glob (default), dir or file. Repeatable.
    #[arg(long = "rule", value_name = "RULE")]
    pub rules: Vec<String>,

    /// Take the mandatory floor (rules above all of these: real secret material hidden)
    /// from this server config's `policy.mandatory` instead of the built-in default.
    #[arg(
        long = "server-config",
        value_name = "FILE",
        conflicts_with = "no_floor"
    )]
    pub server_config: Option<PathBuf>,

    /// Apply no mandatory floor: keys, `.env` files and credentials are then visible unless
    /// the rules hide them.
    #[arg(long)]
    pub no_floor: bool,
}

impl PolicyArgs {
    /// The rules in engine input order.
    pub fn rules(&self) -> anyhow::Result<Vec<PermissionRule>> {
        let mut rules = if self.preset == "none" {
            Vec::new()
        } else {
            presets::get(&self.preset)
                .with_context(|| {
                    format!(
                        "unknown preset {:?}; choose one of: none, {}",
                        self.preset,
                        presets::names().join(", ")
                    )
                })?
                .rules()
        };
        if let Some(path) = &self.policy_file {
            rules.extend(load_policy_file(path)?);
        }
        for spec in &self.rules {
            rules.push(parse_rule(spec)?);
        }
        Ok(rules)
    }

    /// The mandatory floor: the built-in default, a server config's, or none (`--no-floor`,
    /// said on stderr).
    pub fn floor(&self) -> anyhow::Result<Vec<PermissionRule>> {
        if self.no_floor {
            eprintln!(
                "agentfense: warning: --no-floor: private keys, .env files and cloud credentials are visible unless the rules hide them"
            );
            return Ok(Vec::new());
        }
        match &self.server_config {
            Some(path) => Ok(agentfense_server::config::Config::load(path)
                .with_context(|| format!("cannot read the floor from {}", path.display()))?
                .policy
                .mandatory),
            None => Ok(presets::default_floor()),
        }
    }

    /// The compiled policy: the rules under the mandatory floor.
    pub fn policy(&self) -> anyhow::Result<Policy> {
        let rules = self.rules()?;
        Policy::compile_with_floor(rules, self.floor()?).map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            anyhow::anyhow!("{e}{cause}")
        })
    }
}

/// Parses `[TYPE:]PATTERN=LEVEL[@PRIORITY]` (the syntax lives in the core crate, with
/// [`PermissionRule::parse_spec`]).
pub fn parse_rule(spec: &str) -> anyhow::Result<PermissionRule> {
    Ok(PermissionRule::parse_spec(spec)?)
}

/// Loads a YAML or JSON list of rules (JSON is valid YAML, so one parser reads both).
pub fn load_policy_file(path: &std::path::Path) -> anyhow::Result<Vec<PermissionRule>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    yaml_serde::from_str::<Vec<PermissionRule>>(&text).with_context(|| {
        format!(
            "policy file {} is not a list of rules {{pattern, type?, permission, priority?}}",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentfense_core::{Level, PatternType};
    use pretty_assertions::assert_eq;

    #[test]
    fn assembles_preset_file_and_rules_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.yaml");
        std::fs::write(
            &f,
            "- pattern: /docs\n  type: directory\n  permission: write\n  priority: 5\n",
        )
        .unwrap();
        let args = PolicyArgs {
            preset: "read-only".into(),
            policy_file: Some(f),
            rules: vec!["/x=none@9".into()],
            server_config: None,
            no_floor: false,
        };
        assert_eq!(
            args.rules().unwrap(),
            vec![
                PermissionRule::glob("**/*", Level::Read, 0),
                PermissionRule::new("/docs", PatternType::Directory, Level::Write, 5),
                PermissionRule::glob("/x", Level::None, 9),
            ]
        );
        let bad = PolicyArgs {
            preset: "nope".into(),
            policy_file: None,
            rules: vec![],
            server_config: None,
            no_floor: false,
        };
        assert!(bad.rules().unwrap_err().to_string().contains("agent-safe"));
        let bad_pattern = PolicyArgs {
            preset: "none".into(),
            policy_file: None,
            rules: vec!["**.md=read".into()],
            server_config: None,
            no_floor: false,
        };
        let msg = bad_pattern.policy().unwrap_err().to_string();
        assert!(
            msg.contains("**.md") && msg.contains("whole path segment"),
            "{msg}"
        );
    }
}
