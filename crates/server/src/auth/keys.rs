//! API keys and sandbox tokens: generation, the wire format and the keyed hash they are
//! stored as.
//!
//! A key is `afk_<id>_<secret>` (a sandbox token `aft_<id>_<secret>`): `id` is 12 hex digits
//! naming the row (`key_<id>` / `tok_<id>` in listings and audit events), `secret` 64 hex digits
//! (256 random bits). Only HMAC-SHA256(server secret, whole key) is stored; the server secret
//! is 32 random bytes in `<data_dir>/auth.secret` (mode 0600), so a copy of the database alone
//! verifies nothing.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Prefix of API keys.
pub const KEY_PREFIX: &str = "afk_";
/// Prefix of sandbox tokens.
pub const TOKEN_PREFIX: &str = "aft_";

const ID_HEX: usize = 12;
const SECRET_HEX: usize = 64;

/// What a credential string is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A tenant's API key.
    Key,
    /// A token bound to one sandbox.
    SandboxToken,
}

impl KeyKind {
    fn prefix(self) -> &'static str {
        match self {
            KeyKind::Key => KEY_PREFIX,
            KeyKind::SandboxToken => TOKEN_PREFIX,
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            KeyKind::Key => "key_",
            KeyKind::SandboxToken => "tok_",
        }
    }
}

/// A freshly generated credential: the string handed out once, and its row id.
#[derive(Debug)]
pub struct NewKey {
    /// The whole credential (shown once, never stored).
    pub secret: String,
    /// Its public id.
    pub id: String,
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Generates a new credential of `kind`.
pub fn generate(kind: KeyKind) -> Result<NewKey, getrandom::Error> {
    let mut id = [0u8; ID_HEX / 2];
    let mut secret = [0u8; SECRET_HEX / 2];
    getrandom::fill(&mut id)?;
    getrandom::fill(&mut secret)?;
    let id = hex(&id);
    Ok(NewKey {
        secret: format!("{}{id}_{}", kind.prefix(), hex(&secret)),
        id: format!("{}{id}", kind.id_prefix()),
    })
}

/// The row id a presented credential claims, if it has the right shape (the secret is checked
/// against the stored hash, never here).
pub fn parse_id(presented: &str) -> Option<String> {
    let (kind, rest) = if let Some(r) = presented.strip_prefix(KEY_PREFIX) {
        (KeyKind::Key, r)
    } else {
        (KeyKind::SandboxToken, presented.strip_prefix(TOKEN_PREFIX)?)
    };
    let (id, secret) = rest.split_once('_')?;
    let hexish = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexish(id, ID_HEX) && hexish(secret, SECRET_HEX))
        .then(|| format!("{}{}", kind.id_prefix(), id.to_ascii_lowercase()))
}

/// The server-side secret keying the stored hashes.
#[derive(Clone)]
pub struct ServerSecret([u8; 32]);

impl std::fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerSecret(..)")
    }
}

/// The server secret could not be read or made.
#[derive(Debug, thiserror::Error)]
#[error("authentication secret {path}: {detail}")]
pub struct SecretError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub detail: String,
}

impl ServerSecret {
    /// The secret file under a data directory.
    pub fn path_in(data_dir: &Path) -> PathBuf {
        data_dir.join("auth.secret")
    }

    /// Reads the secret, creating it (mode 0600, exclusively, so two processes racing agree on
    /// one) when there is none.
    pub fn load_or_create(path: &Path) -> Result<ServerSecret, SecretError> {
        let err = |detail: String| SecretError {
            path: path.to_owned(),
            detail,
        };
        for _ in 0..2 {
            match std::fs::read(path) {
                Ok(bytes) => {
                    let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                        err(format!(
                            "holds {} bytes, not 32; restore it from backup (keys made with \
                             another secret cannot be verified)",
                            bytes.len()
                        ))
                    })?;
                    return Ok(ServerSecret(arr));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(e.to_string())),
            }
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| err(e.to_string()))?;
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| err(e.to_string()))?;
            f.write_all(&secret)
                .and_then(|()| f.sync_all())
                .map_err(|e| err(e.to_string()))?;
            drop(f);
            // hard_link fails if another process made the file first: then read theirs.
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            if linked.is_ok() {
                return Ok(ServerSecret(secret));
            }
        }
        Err(err("could not be created".into()))
    }

    /// A fixed secret, for tests.
    pub fn fixed(bytes: [u8; 32]) -> ServerSecret {
        ServerSecret(bytes)
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this cannot fail.
        <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }

    /// The stored form of a credential.
    pub fn hash(&self, presented: &str) -> Vec<u8> {
        let mut m = self.mac();
        m.update(presented.as_bytes());
        m.finalize().into_bytes().to_vec()
    }

    /// Whether `presented` is the credential whose stored form is `stored` (constant time).
    pub fn verify(&self, presented: &str, stored: &[u8]) -> bool {
        let mut m = self.mac();
        m.update(presented.as_bytes());
        m.verify_slice(stored).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_malformed_ones_name_nothing() {
        let k = generate(KeyKind::Key).unwrap();
        assert!(k.secret.starts_with("afk_") && k.secret.len() == 4 + 12 + 1 + 64);
        assert_eq!(parse_id(&k.secret).as_deref(), Some(k.id.as_str()));
        let t = generate(KeyKind::SandboxToken).unwrap();
        assert!(t.id.starts_with("tok_"));
        assert_eq!(parse_id(&t.secret).as_deref(), Some(t.id.as_str()));
        for bad in [
            "",
            "afk_",
            "afk_zz",
            "Bearer x",
            &k.secret[..k.secret.len() - 1],
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
        let s = ServerSecret::fixed([7; 32]);
        let h = s.hash(&k.secret);
        assert!(s.verify(&k.secret, &h));
        assert!(!s.verify(&t.secret, &h));
        assert!(!ServerSecret::fixed([8; 32]).verify(&k.secret, &h));
    }

    #[test]
    fn the_secret_file_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = ServerSecret::path_in(dir.path());
        let a = ServerSecret::load_or_create(&p).unwrap();
        let b = ServerSecret::load_or_create(&p).unwrap();
        assert_eq!(a.0, b.0);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&p, b"short").unwrap();
        let e = ServerSecret::load_or_create(&p).unwrap_err().to_string();
        assert!(e.contains("not 32"), "{e}");
    }
}
