//! Identifiers: `cb_`, `sb_` and `sess_` followed by 16 lowercase hex digits (the original's
//! shapes, which users and docs see). IDs name directories on disk, so an ID from a request is
//! parsed into its newtype at the edge and nothing else is ever joined onto a path.

use std::fmt;

/// An ID from a request that does not have the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value:?} is not a valid id (expected {prefix} followed by 16 hex digits)")]
pub struct IdError {
    /// The request field, e.g. `sandbox_id`.
    pub field: &'static str,
    /// The value given.
    pub value: String,
    /// The expected prefix.
    pub prefix: &'static str,
}

fn random_hex16() -> String {
    let mut bytes = [0u8; 8];
    // The OS RNG does not fail on Linux once booted; if it ever did, a time-and-counter based
    // fallback still gives unique (if guessable) ids, which is all an id needs to be.
    if getrandom::fill(&mut bytes).is_err() {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(40)).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn valid(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|hex| {
        hex.len() == 16
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

macro_rules! id_type {
    ($name:ident, $prefix:literal, $field:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The prefix of every id of this kind.
            pub const PREFIX: &'static str = $prefix;

            /// A new random id.
            pub fn generate() -> Self {
                $name(format!("{}{}", $prefix, random_hex16()))
            }

            /// Validates an id from a request field.
            pub fn parse(value: &str) -> Result<Self, IdError> {
                if valid(value, $prefix) {
                    Ok($name(value.to_owned()))
                } else {
                    Err(IdError {
                        field: $field,
                        value: value.to_owned(),
                        prefix: $prefix,
                    })
                }
            }

            /// The id as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    CodebaseId,
    "cb_",
    "codebase_id",
    "A codebase id, `cb_<16 hex>`."
);
id_type!(
    SandboxId,
    "sb_",
    "sandbox_id",
    "A sandbox id, `sb_<16 hex>`."
);
id_type!(
    SessionId,
    "sess_",
    "session_id",
    "A session id, `sess_<16 hex>`."
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_differ() {
        let a = SandboxId::generate();
        let b = SandboxId::generate();
        assert_ne!(a, b);
        assert_eq!(SandboxId::parse(a.as_str()).unwrap(), a);
        assert!(a.as_str().starts_with("sb_") && a.as_str().len() == 19);
        assert!(CodebaseId::generate().as_str().starts_with("cb_"));
        assert!(SessionId::generate().as_str().starts_with("sess_"));
    }

    #[test]
    fn malformed_ids_are_rejected_with_the_field() {
        for bad in [
            "",
            "sb_",
            "sb_0123456789abcdeF",
            "sb_../../etc/pas",
            "cb_0123456789abcdef",
            "sb_0123456789abcdef0",
        ] {
            let e = SandboxId::parse(bad).unwrap_err();
            assert_eq!(e.field, "sandbox_id", "{bad}");
        }
        assert!(SandboxId::parse("sb_0123456789abcdef").is_ok());
        let msg = CodebaseId::parse("x/y").unwrap_err().to_string();
        assert!(msg.contains("codebase_id") && msg.contains("cb_"), "{msg}");
    }
}
