//! Content conditions: rules that hide a file only when what it holds is secret.
//!
//! A name says too little for some files: `*.pem` holds public CA bundles (pip's
//! `certifi/cacert.pem`, every venv has one) as often as private keys. A `none` rule with a
//! [`Content`] condition applies to a regular file only when the file's content satisfies
//! it; directories, symlinks and other files never match it. The filesystem reads the file
//! to decide (and caches the verdict per file version); anything that cannot read it assumes
//! the condition holds, which fails closed.

use serde::{Deserialize, Serialize};

/// What a file must hold for a content-conditioned rule to apply to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Content {
    /// Private key material: a PEM armored private key of any kind (`-----BEGIN RSA PRIVATE
    /// KEY-----`, `EC`, `DSA`, `OPENSSH`, `ENCRYPTED`, PKCS#8 `PRIVATE KEY`), a PGP private key
    /// block, or a PuTTY key file. Certificates, public keys and CA bundles do not match; a
    /// file holding a certificate *and* a key does.
    PrivateKey,
}

/// Files larger than this are not read: the condition is taken to hold (fail closed). A CA
/// bundle is ~300 KiB.
pub const MAX_SCANNED: u64 = 16 << 20;

impl Content {
    /// The name used in policy files (`content: private-key`).
    pub fn as_str(self) -> &'static str {
        match self {
            Content::PrivateKey => "private-key",
        }
    }

    /// A few words for explanations: "files holding a private key".
    pub fn describe(self) -> &'static str {
        match self {
            Content::PrivateKey => "files holding a private key",
        }
    }

    /// Whether a file whose whole content is `data` satisfies the condition.
    pub fn holds(self, data: &[u8]) -> bool {
        match self {
            Content::PrivateKey => holds_private_key(data),
        }
    }
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn holds_private_key(data: &[u8]) -> bool {
    if data.starts_with(b"PuTTY-User-Key-File-") {
        return true;
    }
    const BEGIN: &[u8] = b"-----BEGIN ";
    let mut rest = data;
    while let Some(i) = find(rest, BEGIN) {
        let after = &rest[i + BEGIN.len()..];
        // The armor label ends at the next "-----" on the same line.
        let line_end = after
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .unwrap_or(after.len());
        let line = &after[..line_end];
        if let Some(end) = find(line, b"-----") {
            let label = &line[..end];
            if label.ends_with(b"PRIVATE KEY") || label.ends_with(b"PRIVATE KEY BLOCK") {
                return true;
            }
        }
        rest = after;
    }
    false
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn private_keys_match_and_public_material_does_not() {
        let k = Content::PrivateKey;
        for key in [
            "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\nMIIE\n",
            "-----BEGIN EC PRIVATE KEY-----\nMHc\n",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIF\n",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n",
            "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQc\n",
            "PuTTY-User-Key-File-3: ssh-ed25519\n",
            // A certificate with its key (haproxy, nginx bundles).
            "-----BEGIN CERTIFICATE-----\nMIID\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nMII\n",
            "\r\n-----BEGIN DSA PRIVATE KEY-----\r\nMII\r\n",
        ] {
            assert!(k.holds(key.as_bytes()), "{key}");
        }
        for public in [
            "",
            "-----BEGIN CERTIFICATE-----\nMIID\n-----END CERTIFICATE-----\n",
            "-----BEGIN PUBLIC KEY-----\nMIIB\n",
            "-----BEGIN RSA PUBLIC KEY-----\nMIIB\n",
            "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQI\n",
            "-----BEGIN CERTIFICATE REQUEST-----\nMII\n",
            "ssh-ed25519 AAAAC3Nz user@host\n",
            // Code that merely mentions the armor, split across lines, is not a key.
            "label = '-----BEGIN '\nlabel += 'PRIVATE KEY-----'\n",
            "-----BEGIN X509 CRL-----\n",
        ] {
            assert!(!k.holds(public.as_bytes()), "{public}");
        }
    }

    proptest! {
        /// A key block is found wherever it sits, whatever surrounds it.
        #[test]
        fn a_key_block_is_found_anywhere(prefix in ".{0,200}", suffix in ".{0,200}") {
            let data = format!("{prefix}\n-----BEGIN PRIVATE KEY-----\nMII\n{suffix}");
            prop_assert!(Content::PrivateKey.holds(data.as_bytes()));
        }

        /// Arbitrary bytes never panic.
        #[test]
        fn arbitrary_bytes_are_judged_without_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Content::PrivateKey.holds(&data);
        }
    }
}
