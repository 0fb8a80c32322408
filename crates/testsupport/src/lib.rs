//! What every test suite of this workspace shares: the one rule for a test that cannot run
//! here, and probes for what privileged tests need.
//!
//! The rule: a test whose prerequisite is missing says so loudly (`SKIPPED <test>: <reason>`
//! on stderr) and returns without asserting anything; under CI (`CI` set) it fails instead,
//! because CI must run every test. A skipped test never passes silently.

pub mod postgres;

use std::path::{Path, PathBuf};

/// `true` when the test may run (`missing` is `None`); otherwise prints `SKIPPED` and returns
/// `false`, or panics under CI.
pub fn require(test: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(reason) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: prerequisite missing under CI: {reason}"
            );
            eprintln!("SKIPPED {test}: {reason}");
            false
        }
    }
}

/// The opposite of [`require`]: `true` means skip.
pub fn skip_unless_ci(test: &str, missing: Option<String>) -> bool {
    !require(test, missing)
}

/// Everything `checks` report missing, joined, or `None`.
pub fn all(checks: &[Option<String>]) -> Option<String> {
    let missing: Vec<&str> = checks.iter().flatten().map(String::as_str).collect();
    (!missing.is_empty()).then(|| format!("needs {}", missing.join(", ")))
}

/// Root (FUSE mounts, namespaces, cgroups).
pub fn root() -> Option<String> {
    (!rustix::process::geteuid().is_root()).then(|| "root".to_owned())
}

/// `/dev/fuse`, openable.
pub fn fuse() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .err()
        .map(|e| format!("/dev/fuse (apt-get install fuse3): {e}"))
}

/// `program` found on `PATH`, as the server resolves `runtime.bwrap_path`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// bubblewrap on `PATH`.
pub fn bwrap() -> Option<String> {
    which("bwrap")
        .is_none()
        .then(|| "bubblewrap on PATH (apt-get install bubblewrap)".to_owned())
}

/// Root, FUSE and bubblewrap: what a real sandbox needs.
pub fn privileged() -> Option<String> {
    all(&[root(), fuse(), bwrap()])
}

/// A Python that imports every module of `modules`.
pub fn python_modules(python: &str, modules: &[&str]) -> Option<String> {
    let out = std::process::Command::new(python)
        .args(["-c", &format!("import {}", modules.join(", "))])
        .output();
    match out {
        Err(e) => Some(format!("cannot run {python}: {e}")),
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "{python} with {}: {}",
            modules.join(", "),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
    }
}

/// A file that must exist (a socket, a device).
pub fn exists(path: &Path, what: &str) -> Option<String> {
    (!path.exists()).then(|| format!("{what} at {}", path.display()))
}

/// A private CA (`ca.pem`, `ca.key`), a server certificate for localhost/127.0.0.1
/// (`srv.pem`, `srv.key`) and a client certificate whose common name is `client_cn`
/// (`cli.pem`, `cli.key`), made in `dir` with the openssl CLI.
pub fn pki(dir: &Path, client_cn: &str) {
    let sh = |script: &str| {
        let out = std::process::Command::new("sh")
            .args(["-ec", script])
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run sh: {e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-ca \
        -keyout ca.key -out ca.pem 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > srv.ext
        openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout srv.key -out srv.csr 2>/dev/null
        openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile srv.ext -out srv.pem 2>/dev/null
        printf 'extendedKeyUsage=clientAuth\\n' > cli.ext");
    sh(&format!(
        "openssl req -newkey rsa:2048 -nodes -subj /CN={client_cn} -keyout cli.key -out cli.csr 2>/dev/null
         openssl x509 -req -in cli.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
             -extfile cli.ext -out cli.pem 2>/dev/null"
    ));
}

/// The openssl CLI (for [`pki`]).
pub fn openssl() -> Option<String> {
    which("openssl")
        .is_none()
        .then(|| "the openssl CLI (apt-get install openssl)".to_owned())
}
