//! Conversions between wire types ([`crate::v1`], `pbjson_types`) and core/std types.
//!
//! Inbound conversions (wire -> core) are checked: they are the edge where client input is
//! validated, so every failure is a [`ConvertError`] naming the offending field (with the rule
//! index for rule lists), meant to be answered with `INVALID_ARGUMENT`. Outbound conversions
//! (core -> wire) are infallible except for durations, whose wire range is bounded.
//!
//! Enum policy, stricter than the original server (which mapped unknown values to defaults):
//! * `PERMISSION_UNSPECIFIED` and unknown permission numbers are rejected, never read as `none`.
//! * `PATTERN_TYPE_UNSPECIFIED` means glob (the SDK always sends GLOB explicitly anyway);
//!   unknown pattern-type numbers are rejected.

use std::time::{Duration, SystemTime};

use agentfense_core::{Level, PatternType, PermissionRule};

use crate::v1;

/// Largest `google.protobuf.Duration::seconds` magnitude (10,000 years), per `duration.proto`.
pub const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

/// Largest `google.protobuf.Duration::nanos` magnitude.
const MAX_DURATION_NANOS: i32 = 999_999_999;

/// A wire value that has no valid core meaning. Each variant names the field as a path into
/// the request, e.g. `permissions[2].permission` or `timeout`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// `PERMISSION_UNSPECIFIED` (0) was sent where a level is required.
    #[error(
        "{field}: PERMISSION_UNSPECIFIED is not allowed; use PERMISSION_NONE, _VIEW, _READ or _WRITE"
    )]
    UnspecifiedPermission {
        /// Path of the offending field.
        field: String,
    },

    /// An enum field holds a number that the enum does not define.
    #[error("{field}: {value} is not a known {enum_name} value")]
    UnknownEnumValue {
        /// Path of the offending field.
        field: String,
        /// Fully qualified protobuf enum name, e.g. `sandbox.v1.Permission`.
        enum_name: &'static str,
        /// The number that was sent.
        value: i32,
    },

    /// A duration that must not be negative is.
    #[error("{field}: duration must not be negative (seconds={seconds}, nanos={nanos})")]
    NegativeDuration {
        /// Path of the offending field.
        field: String,
        /// `Duration::seconds` as sent.
        seconds: i64,
        /// `Duration::nanos` as sent.
        nanos: i32,
    },

    /// A `google.protobuf.Duration` outside its documented range, or with `seconds` and `nanos`
    /// of opposite signs.
    #[error(
        "{field}: invalid google.protobuf.Duration (seconds={seconds}, nanos={nanos}): seconds \
         must be within ±{MAX_DURATION_SECONDS}, nanos within ±{MAX_DURATION_NANOS}, same sign"
    )]
    InvalidDuration {
        /// Path of the offending field.
        field: String,
        /// `Duration::seconds` as sent.
        seconds: i64,
        /// `Duration::nanos` as sent.
        nanos: i32,
    },

    /// A `std::time::Duration` too long for `google.protobuf.Duration`.
    #[error("{field}: {duration:?} exceeds the google.protobuf.Duration range")]
    DurationOutOfRange {
        /// Path of the offending field.
        field: String,
        /// The duration that did not fit.
        duration: Duration,
    },
}

impl ConvertError {
    /// Path of the offending field, e.g. `permissions[2].permission`.
    pub fn field(&self) -> &str {
        match self {
            ConvertError::UnspecifiedPermission { field }
            | ConvertError::UnknownEnumValue { field, .. }
            | ConvertError::NegativeDuration { field, .. }
            | ConvertError::InvalidDuration { field, .. }
            | ConvertError::DurationOutOfRange { field, .. } => field,
        }
    }
}

/// Every conversion error is the client's fault: it becomes `INVALID_ARGUMENT` with the
/// message above (never `INTERNAL`).
impl From<ConvertError> for tonic::Status {
    fn from(err: ConvertError) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}

/// Joins a field path prefix and a leaf name (`""` + `x` = `x`, `a[1]` + `x` = `a[1].x`).
fn field_path(prefix: &str, leaf: &str) -> String {
    if prefix.is_empty() {
        leaf.to_owned()
    } else {
        format!("{prefix}.{leaf}")
    }
}

// ---------------------------------------------------------------------------------------------
// Permission <-> Level

impl From<Level> for v1::Permission {
    fn from(level: Level) -> Self {
        match level {
            Level::None => v1::Permission::None,
            Level::View => v1::Permission::View,
            Level::Read => v1::Permission::Read,
            Level::Write => v1::Permission::Write,
        }
    }
}

impl TryFrom<v1::Permission> for Level {
    type Error = ConvertError;

    /// Fails only for `PERMISSION_UNSPECIFIED`; the field is reported as `permission`.
    fn try_from(permission: v1::Permission) -> Result<Self, Self::Error> {
        level_from_wire(permission.into(), "permission")
    }
}

/// Reads a wire `Permission` number (as stored by prost) into a [`Level`].
///
/// `field` is the path reported on error. `PERMISSION_UNSPECIFIED` and numbers the enum does not
/// define are errors: a rule with no level must not silently become `none` or anything else.
pub fn level_from_wire(value: i32, field: &str) -> Result<Level, ConvertError> {
    match v1::Permission::try_from(value) {
        Ok(v1::Permission::None) => Ok(Level::None),
        Ok(v1::Permission::View) => Ok(Level::View),
        Ok(v1::Permission::Read) => Ok(Level::Read),
        Ok(v1::Permission::Write) => Ok(Level::Write),
        Ok(v1::Permission::Unspecified) => Err(ConvertError::UnspecifiedPermission {
            field: field.to_owned(),
        }),
        Err(_) => Err(ConvertError::UnknownEnumValue {
            field: field.to_owned(),
            enum_name: "sandbox.v1.Permission",
            value,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// PatternType

impl From<PatternType> for v1::PatternType {
    fn from(pattern_type: PatternType) -> Self {
        match pattern_type {
            PatternType::Glob => v1::PatternType::Glob,
            PatternType::Directory => v1::PatternType::Directory,
            PatternType::File => v1::PatternType::File,
        }
    }
}

impl From<v1::PatternType> for PatternType {
    /// `PATTERN_TYPE_UNSPECIFIED` means glob.
    fn from(pattern_type: v1::PatternType) -> Self {
        match pattern_type {
            v1::PatternType::Unspecified | v1::PatternType::Glob => PatternType::Glob,
            v1::PatternType::Directory => PatternType::Directory,
            v1::PatternType::File => PatternType::File,
        }
    }
}

/// Reads a wire `PatternType` number into a [`PatternType`]: `PATTERN_TYPE_UNSPECIFIED` is glob,
/// a number the enum does not define is an error reported at `field`.
pub fn pattern_type_from_wire(value: i32, field: &str) -> Result<PatternType, ConvertError> {
    v1::PatternType::try_from(value)
        .map(PatternType::from)
        .map_err(|_| ConvertError::UnknownEnumValue {
            field: field.to_owned(),
            enum_name: "sandbox.v1.PatternType",
            value,
        })
}

// ---------------------------------------------------------------------------------------------
// PermissionRule

/// Converts one wire rule. `prefix` is the rule's own path (e.g. `permissions[2]`, or `""`),
/// used to name the failing field. The pattern is passed through unchanged: it is normalised
/// and validated when the rules are compiled into a policy.
pub fn rule_from_wire(
    rule: &v1::PermissionRule,
    prefix: &str,
) -> Result<PermissionRule, ConvertError> {
    Ok(PermissionRule {
        pattern: rule.pattern.clone(),
        pattern_type: pattern_type_from_wire(rule.r#type, &field_path(prefix, "type"))?,
        permission: level_from_wire(rule.permission, &field_path(prefix, "permission"))?,
        priority: rule.priority,
        content: None,
    })
}

/// Converts a request's rule list (`CreateSandboxRequest.permissions`), keeping the order.
/// Errors name the rule as `permissions[i]`; the first invalid rule wins.
pub fn rules_from_wire(rules: &[v1::PermissionRule]) -> Result<Vec<PermissionRule>, ConvertError> {
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| rule_from_wire(rule, &format!("permissions[{i}]")))
        .collect()
}

impl TryFrom<&v1::PermissionRule> for PermissionRule {
    type Error = ConvertError;

    /// Like [`rule_from_wire`] with no prefix (fields are reported as `type`, `permission`).
    fn try_from(rule: &v1::PermissionRule) -> Result<Self, Self::Error> {
        rule_from_wire(rule, "")
    }
}

impl From<&PermissionRule> for v1::PermissionRule {
    /// Echoes a rule back to clients (`Sandbox.permissions`), with an explicit pattern type.
    /// The wire has no content conditions: a content-conditioned `none` rule (only the
    /// server's floor has them) shows as a plain `none` rule, the stricter reading.
    fn from(rule: &PermissionRule) -> Self {
        v1::PermissionRule {
            pattern: rule.pattern.clone(),
            r#type: v1::PatternType::from(rule.pattern_type).into(),
            permission: v1::Permission::from(rule.permission).into(),
            priority: rule.priority,
        }
    }
}

/// Converts core rules to their wire form, keeping the order.
pub fn rules_to_wire(rules: &[PermissionRule]) -> Vec<v1::PermissionRule> {
    rules.iter().map(v1::PermissionRule::from).collect()
}

// ---------------------------------------------------------------------------------------------
// Duration and Timestamp

/// Converts a wire `google.protobuf.Duration` into a non-negative [`Duration`].
///
/// Rejects values outside the documented range, mixed signs, and negative durations (every
/// duration in this protocol is a timeout, a lifetime or an elapsed time).
pub fn duration_from_wire(
    d: &pbjson_types::Duration,
    field: &str,
) -> Result<Duration, ConvertError> {
    let (seconds, nanos) = (d.seconds, d.nanos);
    // `unsigned_abs`: `i64::MIN.abs()` would overflow.
    let in_range = seconds.unsigned_abs() <= MAX_DURATION_SECONDS.unsigned_abs()
        && nanos.unsigned_abs() <= MAX_DURATION_NANOS.unsigned_abs();
    let same_sign = (seconds >= 0 && nanos >= 0) || (seconds <= 0 && nanos <= 0);
    if !in_range || !same_sign {
        return Err(ConvertError::InvalidDuration {
            field: field.to_owned(),
            seconds,
            nanos,
        });
    }
    match (u64::try_from(seconds), u32::try_from(nanos)) {
        (Ok(secs), Ok(nanos)) => Ok(Duration::new(secs, nanos)),
        _ => Err(ConvertError::NegativeDuration {
            field: field.to_owned(),
            seconds,
            nanos,
        }),
    }
}

/// Converts a [`Duration`] into a wire `google.protobuf.Duration`; fails (reporting `field`) if it
/// exceeds the wire range of 315,576,000,000 seconds.
pub fn duration_to_wire(d: Duration, field: &str) -> Result<pbjson_types::Duration, ConvertError> {
    let out_of_range = || ConvertError::DurationOutOfRange {
        field: field.to_owned(),
        duration: d,
    };
    let seconds = i64::try_from(d.as_secs()).map_err(|_| out_of_range())?;
    if seconds > MAX_DURATION_SECONDS {
        return Err(out_of_range());
    }
    let nanos = i32::try_from(d.subsec_nanos()).map_err(|_| out_of_range())?;
    Ok(pbjson_types::Duration { seconds, nanos })
}

/// Converts a [`SystemTime`] into a wire `google.protobuf.Timestamp` (seconds since the Unix
/// epoch plus non-negative nanos; times before the epoch have negative seconds).
pub fn timestamp_from_system_time(t: SystemTime) -> pbjson_types::Timestamp {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => pbjson_types::Timestamp {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos() as i32,
        },
        // Before 1970: seconds round down, nanos stay in 0..1e9 (the protobuf convention).
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => pbjson_types::Timestamp {
                    seconds: -secs,
                    nanos: 0,
                },
                n => pbjson_types::Timestamp {
                    seconds: -secs - 1,
                    nanos: (1_000_000_000 - n) as i32,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use pretty_assertions::assert_eq;

    use super::*;

    fn wire_rule(pattern: &str, r#type: i32, permission: i32, priority: i32) -> v1::PermissionRule {
        v1::PermissionRule {
            pattern: pattern.to_owned(),
            r#type,
            permission,
            priority,
        }
    }

    #[test]
    fn level_maps_to_wire_numbers_and_back() {
        let table = [
            (Level::None, v1::Permission::None, 1),
            (Level::View, v1::Permission::View, 2),
            (Level::Read, v1::Permission::Read, 3),
            (Level::Write, v1::Permission::Write, 4),
        ];
        for (level, wire, number) in table {
            assert_eq!(v1::Permission::from(level), wire);
            assert_eq!(i32::from(wire), number);
            assert_eq!(level_from_wire(number, "p"), Ok(level));
            assert_eq!(Level::try_from(wire), Ok(level));
        }
    }

    #[test]
    fn unspecified_permission_is_rejected_with_a_helpful_message() {
        let err = level_from_wire(0, "permissions[2].permission").unwrap_err();
        assert_eq!(
            err,
            ConvertError::UnspecifiedPermission {
                field: "permissions[2].permission".to_owned()
            }
        );
        assert_eq!(
            err.to_string(),
            "permissions[2].permission: PERMISSION_UNSPECIFIED is not allowed; \
             use PERMISSION_NONE, _VIEW, _READ or _WRITE"
        );
        assert_eq!(
            Level::try_from(v1::Permission::Unspecified)
                .unwrap_err()
                .field(),
            "permission"
        );
    }

    #[test]
    fn unknown_permission_number_is_rejected() {
        for value in [5, -1, i32::MAX] {
            let err = level_from_wire(value, "x.permission").unwrap_err();
            assert_eq!(
                err,
                ConvertError::UnknownEnumValue {
                    field: "x.permission".to_owned(),
                    enum_name: "sandbox.v1.Permission",
                    value
                }
            );
        }
        assert_eq!(
            level_from_wire(7, "permission").unwrap_err().to_string(),
            "permission: 7 is not a known sandbox.v1.Permission value"
        );
    }

    #[test]
    fn pattern_type_maps_both_ways_and_unspecified_is_glob() {
        let table = [
            (PatternType::Glob, v1::PatternType::Glob, 1),
            (PatternType::Directory, v1::PatternType::Directory, 2),
            (PatternType::File, v1::PatternType::File, 3),
        ];
        for (core, wire, number) in table {
            assert_eq!(v1::PatternType::from(core), wire);
            assert_eq!(i32::from(wire), number);
            assert_eq!(PatternType::from(wire), core);
            assert_eq!(pattern_type_from_wire(number, "t"), Ok(core));
        }
        assert_eq!(
            PatternType::from(v1::PatternType::Unspecified),
            PatternType::Glob
        );
        assert_eq!(pattern_type_from_wire(0, "t"), Ok(PatternType::Glob));
    }

    #[test]
    fn unknown_pattern_type_number_is_rejected() {
        assert_eq!(
            pattern_type_from_wire(4, "permissions[0].type"),
            Err(ConvertError::UnknownEnumValue {
                field: "permissions[0].type".to_owned(),
                enum_name: "sandbox.v1.PatternType",
                value: 4
            })
        );
    }

    #[test]
    fn rules_convert_in_order() {
        let wire = vec![
            wire_rule("**/.env*", 1, 1, 100),
            wire_rule("/secrets", 2, 2, 0),
            wire_rule("/src/main.py", 3, 3, -5),
            wire_rule("**", 0, 4, 0),
        ];
        assert_eq!(
            rules_from_wire(&wire).unwrap(),
            vec![
                PermissionRule::new("**/.env*", PatternType::Glob, Level::None, 100),
                PermissionRule::new("/secrets", PatternType::Directory, Level::View, 0),
                PermissionRule::new("/src/main.py", PatternType::File, Level::Read, -5),
                PermissionRule::new("**", PatternType::Glob, Level::Write, 0),
            ]
        );
        assert_eq!(rules_from_wire(&[]).unwrap(), vec![]);
    }

    #[test]
    fn rule_errors_name_the_index_and_field() {
        let wire = vec![
            wire_rule("a", 1, 3, 0),
            wire_rule("b", 1, 3, 0),
            wire_rule("c", 1, 0, 0),
            wire_rule("d", 9, 0, 0),
        ];
        let err = rules_from_wire(&wire).unwrap_err();
        assert_eq!(err.field(), "permissions[2].permission");
        assert_eq!(
            err.to_string(),
            "permissions[2].permission: PERMISSION_UNSPECIFIED is not allowed; \
             use PERMISSION_NONE, _VIEW, _READ or _WRITE"
        );

        let err = rules_from_wire(&wire[3..]).unwrap_err();
        assert_eq!(err.field(), "permissions[0].type");

        let err = PermissionRule::try_from(&wire_rule("x", 1, 99, 0)).unwrap_err();
        assert_eq!(err.field(), "permission");
    }

    #[test]
    fn rules_round_trip_core_to_wire_to_core() {
        let core = vec![
            PermissionRule::new("/docs/", PatternType::Directory, Level::Read, 3),
            PermissionRule::new("*.md", PatternType::Glob, Level::View, 0),
            PermissionRule::new("/a/b", PatternType::File, Level::Write, i32::MIN),
            PermissionRule::new("**/x", PatternType::Glob, Level::None, i32::MAX),
        ];
        let wire = rules_to_wire(&core);
        assert_eq!(wire[0], wire_rule("/docs/", 2, 3, 3));
        assert_eq!(wire[3], wire_rule("**/x", 1, 1, i32::MAX));
        assert_eq!(rules_from_wire(&wire).unwrap(), core);
    }

    #[test]
    fn durations_convert_both_ways() {
        let table = [
            (0, 0, Duration::ZERO),
            (60, 0, Duration::from_secs(60)),
            (1, 500_000_000, Duration::from_millis(1500)),
            (0, 999_999_999, Duration::new(0, 999_999_999)),
            (
                MAX_DURATION_SECONDS,
                999_999_999,
                Duration::new(315_576_000_000, 999_999_999),
            ),
        ];
        for (seconds, nanos, std) in table {
            let wire = pbjson_types::Duration { seconds, nanos };
            assert_eq!(duration_from_wire(&wire, "timeout"), Ok(std));
            assert_eq!(duration_to_wire(std, "timeout"), Ok(wire));
        }
    }

    #[test]
    fn negative_durations_are_rejected() {
        for (seconds, nanos) in [(-1, 0), (0, -1), (-5, -500)] {
            assert_eq!(
                duration_from_wire(&pbjson_types::Duration { seconds, nanos }, "expires_in"),
                Err(ConvertError::NegativeDuration {
                    field: "expires_in".to_owned(),
                    seconds,
                    nanos
                })
            );
        }
    }

    #[test]
    fn malformed_wire_durations_are_rejected() {
        for (seconds, nanos) in [
            (MAX_DURATION_SECONDS + 1, 0),
            (-MAX_DURATION_SECONDS - 1, 0),
            (i64::MAX, 0),
            (i64::MIN, 0),
            (0, 1_000_000_000),
            (0, i32::MIN),
            (1, -1),
            (-1, 1),
        ] {
            let err = duration_from_wire(&pbjson_types::Duration { seconds, nanos }, "timeout")
                .unwrap_err();
            assert_eq!(
                err,
                ConvertError::InvalidDuration {
                    field: "timeout".to_owned(),
                    seconds,
                    nanos
                },
                "seconds={seconds} nanos={nanos}"
            );
        }
    }

    #[test]
    fn too_long_std_durations_are_rejected() {
        for d in [
            Duration::from_secs(MAX_DURATION_SECONDS as u64 + 1),
            Duration::MAX,
        ] {
            assert_eq!(
                duration_to_wire(d, "duration"),
                Err(ConvertError::DurationOutOfRange {
                    field: "duration".to_owned(),
                    duration: d
                })
            );
        }
    }

    #[test]
    fn system_time_becomes_a_unix_timestamp() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(
            timestamp_from_system_time(t),
            pbjson_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789
            }
        );
        assert_eq!(
            timestamp_from_system_time(UNIX_EPOCH - Duration::from_millis(1500)),
            pbjson_types::Timestamp {
                seconds: -2,
                nanos: 500_000_000
            }
        );
    }

    #[test]
    fn convert_errors_become_invalid_argument() {
        let status = tonic::Status::from(ConvertError::UnspecifiedPermission {
            field: "permissions[0].permission".to_owned(),
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("permissions[0].permission: "));
    }
}
