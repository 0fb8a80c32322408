//! Key material is hidden by content, not by name: a `*.pem` holding a private key is absent,
//! a CA bundle under the same name is an ordinary file (issue 15).

use agentfense_core::presets;

use super::util::{mount_with, require_fuse, write};

const CERT: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ\n-----END CERTIFICATE-----\n";
const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";

fn tree(lower: &std::path::Path) {
    write(lower, ".venv/lib/certifi/cacert.pem", &CERT.repeat(3));
    write(lower, "certs/server.pem", &format!("{CERT}{KEY}"));
    write(lower, "certs/ca.crt", CERT);
    write(lower, "certs/tls.crt", KEY);
    write(lower, "src/credentials.py", "def load(): ...\n");
    write(lower, "deploy/id_rsa", KEY);
    write(lower, "deploy/id_rsa.pub", "ssh-ed25519 AAAA u@h\n");
}

#[test]
fn private_keys_are_absent_and_public_certificates_are_files() {
    require_fuse!("private_keys_are_absent_and_public_certificates_are_files");
    let m = mount_with(presets::get("development").unwrap().rules(), tree, |_| {});
    assert_eq!(m.ok("ls certs"), "ca.crt\n");
    assert_eq!(m.ok("cat .venv/lib/certifi/cacert.pem"), CERT.repeat(3));
    assert_eq!(m.ok("cat src/credentials.py"), "def load(): ...\n");
    assert_eq!(m.ok("ls deploy"), "id_rsa.pub\n");
    for hidden in ["certs/server.pem", "certs/tls.crt", "deploy/id_rsa"] {
        assert_eq!(
            m.py(&format!("open({hidden:?}).read()")),
            "ENOENT",
            "{hidden}"
        );
        assert_eq!(m.py(&format!("os.stat({hidden:?})")), "ENOENT", "{hidden}");
    }
    // Overwriting a hidden key is refused like writing any hidden path.
    assert_eq!(m.py("open('certs/server.pem', 'w')"), "EACCES");

    // The agent writes a public bundle (as ensurepip does): an ordinary file, published.
    m.ok("mkdir -p new && cat .venv/lib/certifi/cacert.pem > new/cacert.pem");
    assert_eq!(m.ok("cat new/cacert.pem"), CERT.repeat(3));
    // A key it writes is judged the same way: it leaves the view, and stays unpublished.
    m.ok(&format!("printf '%s' '{KEY}' > new/mine.pem"));
    assert_eq!(m.py("os.stat('new/mine.pem')"), "ENOENT");
    let report = m.h().publish().unwrap();
    assert!(
        report.written.iter().any(|p| p.ends_with("new/cacert.pem")),
        "{report:?}"
    );
    assert!(!m.lower().join("new/mine.pem").exists(), "{report:?}");
    assert_eq!(
        std::fs::read_to_string(m.lower().join("new/cacert.pem")).unwrap(),
        CERT.repeat(3)
    );
}
