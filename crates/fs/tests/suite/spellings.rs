//! Hidden means hidden under every spelling the agent can type (issue 24): secret names in
//! other cases, and names stored in another Unicode normalization form than the rule's.

use agentfense_core::{Level, PermissionRule, presets};

use super::util::{mount_with, require_fuse, write};

const KEY: &str = "-----BEGIN PRIVATE KEY-----\nLEAK\n-----END PRIVATE KEY-----\n";

#[test]
fn secrets_in_other_cases_are_hidden() {
    require_fuse!("secrets_in_other_cases_are_hidden");
    let m = mount_with(
        presets::get("agent-safe").unwrap().rules(),
        |lower| {
            for p in [
                ".ENV",
                "config/.Env.local",
                "PRIVATE.KEY",
                "deploy/ID_RSA",
                "Secrets/db.txt",
                "Credentials.json",
                "home/.SSH/config",
            ] {
                write(lower, p, "LEAK\n");
            }
            write(lower, "cert.PEM", KEY);
            write(lower, "README.md", "readme\n");
        },
        |_| {},
    );
    let (_, out, err) = m.sh("find . -type f | sort; cat .ENV PRIVATE.KEY deploy/ID_RSA cert.PEM");
    assert!(!out.contains("LEAK") && !err.contains("LEAK"), "{out}{err}");
    assert_eq!(
        m.ok("find . -type f | sort"),
        "./README.md\n",
        "only the readme is a file the agent can see"
    );
    for p in [
        ".ENV",
        "config/.Env.local",
        "Secrets/db.txt",
        "cert.PEM",
        "home/.SSH",
    ] {
        assert_eq!(m.py(&format!("os.stat({p:?})")), "ENOENT", "{p}");
    }
}

#[test]
fn rules_match_names_in_either_normalization_form() {
    require_fuse!("rules_match_names_in_either_normalization_form");
    // The directory is stored decomposed (e + U+0301); the rule is written composed.
    let m = mount_with(
        vec![
            PermissionRule::glob("**/*", Level::Read, 0),
            PermissionRule::glob("/nfd/s\u{e9}crets/**", Level::None, 10),
        ],
        |lower| write(lower, "nfd/se\u{301}crets/pw.txt", "LEAK\n"),
        |_| {},
    );
    let (_, out, err) = m.sh("cat nfd/*/pw.txt; ls -R");
    assert!(!out.contains("LEAK") && !err.contains("LEAK"), "{out}{err}");
    assert_eq!(m.ok("ls nfd"), "");
}
