//! Settings labels (`agentfense.*`): which exist, their values, the checks at create.

use super::*;

/// Label that asks for networking (honoured only when `runtime.allow_network` is true).
pub const LABEL_NETWORK: &str = "agentfense.network";
/// Label that keeps writes private until an explicit publish (`manual`), instead of
/// publishing after every command (`auto`, the default).
pub const LABEL_PUBLISH: &str = "agentfense.publish";
/// Label that picks how the sandbox's filesystem serves opened files: `no-open` (the default,
/// best for source trees) or `passthrough` (native read speed for large files, one round trip
/// per open); see [`IoMode`].
pub const LABEL_IO: &str = "agentfense.io";

/// Label: the sandbox's disk quota (`agentfense.disk_bytes=2G`): what its writes may take,
/// over `runtime.default_resources.disk_bytes` and at most `runtime.max_resources.disk_bytes`.
pub const LABEL_DISK_BYTES: &str = "agentfense.disk_bytes";

/// Label: where the workspace also appears inside the sandbox, an absolute path (e.g. the
/// project's path on the developer's machine, so that absolute paths in venvs and build
/// files hold); commands start there. `/workspace` stays.
pub const LABEL_WORKSPACE_PATH: &str = "agentfense.workspace_path";

/// Label: `agentfense.checkpoint=auto` takes a checkpoint of the sandbox's changes before each
/// command (labelled `auto: <command>`), so that any command can be undone; `off` (the
/// default) takes none.
pub const LABEL_CHECKPOINT: &str = "agentfense.checkpoint";

/// Checks the labels that configure a sandbox ([`LABEL_NETWORK`], [`LABEL_PUBLISH`],
/// [`LABEL_IO`]) at create, so that a bad value is INVALID_ARGUMENT then rather than a failed
/// start later. Other labels are the user's own and pass through.
pub(super) fn check_labels(
    labels: &BTreeMap<String, String>,
    allow_network: bool,
) -> Result<(), ServiceError> {
    match labels.get(LABEL_NETWORK).map(String::as_str) {
        None | Some("none") | Some("disabled") => {}
        Some("enabled") | Some("host") if allow_network => {}
        Some("enabled") | Some("host") => {
            return Err(ServiceError::FailedPrecondition(format!(
                "label {LABEL_NETWORK} asks for networking, which this server does not allow \
                 (set runtime.allow_network: true)"
            )));
        }
        Some(other) => {
            return Err(ServiceError::InvalidArgument(format!(
                "label {LABEL_NETWORK}={other:?}: expected enabled or none"
            )));
        }
    }
    match labels.get(LABEL_PUBLISH).map(String::as_str) {
        None | Some("auto") | Some("manual") => {}
        Some(other) => {
            return Err(ServiceError::InvalidArgument(format!(
                "label {LABEL_PUBLISH}={other:?}: expected auto or manual"
            )));
        }
    }
    match labels.get(LABEL_CHECKPOINT).map(String::as_str) {
        None | Some("auto") | Some("off") => {}
        Some(other) => {
            return Err(ServiceError::InvalidArgument(format!(
                "label {LABEL_CHECKPOINT}={other:?}: expected auto or off"
            )));
        }
    }
    if let Some(v) = labels.get(LABEL_IO) {
        v.parse::<IoMode>()
            .map_err(|e| ServiceError::InvalidArgument(format!("label {LABEL_IO}: {e}")))?;
    }
    disk_label(labels)?;
    if let Some(v) = labels.get(LABEL_WORKSPACE_PATH) {
        agentfense_runtime::check_workspace_path(v).map_err(|e| {
            ServiceError::InvalidArgument(format!("label {LABEL_WORKSPACE_PATH}: {e}"))
        })?;
    }
    // The `agentfense.` prefix is ours: a misspelt knob must not be ignored silently.
    let known = [
        LABEL_NETWORK,
        LABEL_PUBLISH,
        LABEL_IO,
        LABEL_DISK_BYTES,
        LABEL_WORKSPACE_PATH,
        LABEL_CHECKPOINT,
        super::super::egress::LABEL_EGRESS,
    ];
    if let Some(k) = labels
        .keys()
        .find(|k| k.starts_with("agentfense.") && !known.contains(&k.as_str()))
    {
        return Err(ServiceError::InvalidArgument(format!(
            "unknown label {k:?}: labels starting with \"agentfense.\" are settings; known: {}",
            known.join(", ")
        )));
    }
    Ok(())
}

/// The disk quota a sandbox's labels ask for ([`LABEL_DISK_BYTES`]): bytes, or a size with a
/// binary unit (`512M`, `10G`).
pub(super) fn disk_label(labels: &BTreeMap<String, String>) -> Result<Option<u64>, ServiceError> {
    labels
        .get(LABEL_DISK_BYTES)
        .map(|v| match agentfense_core::parse_size(v) {
            Ok(0) => Err(format!(
                "{v:?}: a quota of 0 bytes (leave the label out for the server's default)"
            )),
            r => r,
        })
        .transpose()
        .map_err(|e| ServiceError::InvalidArgument(format!("label {LABEL_DISK_BYTES}: {e}")))
}

/// The I/O mode a sandbox's labels ask for ([`LABEL_IO`], checked at create).
pub(super) fn io_mode(labels: &BTreeMap<String, String>) -> IoMode {
    labels
        .get(LABEL_IO)
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    pub(super) fn unknown_settings_labels_are_refused() {
        for bad in ["agentfense.io-mode", "agentfense.IO", "agentfense."] {
            match check_labels(&labels(&[(bad, "passthrough")]), false) {
                Err(ServiceError::InvalidArgument(msg)) => {
                    assert!(msg.contains(bad) && msg.contains(LABEL_IO), "{msg}")
                }
                other => panic!("{bad}: expected InvalidArgument, got {other:?}"),
            }
        }
        // Other labels are the user's own.
        check_labels(&labels(&[("team", "x"), ("agentfense-like", "y")]), false).unwrap();
    }

    #[test]
    fn workspace_path_label_must_be_a_usable_absolute_path() {
        check_labels(
            &labels(&[(LABEL_WORKSPACE_PATH, "/home/me/project")]),
            false,
        )
        .unwrap();
        for bad in [
            "relative",
            "/",
            "/usr/src/p",
            "/home/me/../x",
            "/workspace/p",
        ] {
            match check_labels(&labels(&[(LABEL_WORKSPACE_PATH, bad)]), false) {
                Err(ServiceError::InvalidArgument(msg)) => {
                    assert!(msg.contains(LABEL_WORKSPACE_PATH), "{msg}")
                }
                other => panic!("{bad}: expected InvalidArgument, got {other:?}"),
            }
        }
    }

    #[test]
    pub(super) fn io_label_picks_the_mode_and_rejects_unknown_values() {
        assert_eq!(io_mode(&labels(&[])), IoMode::NoOpen);
        for (value, mode) in [
            ("no-open", IoMode::NoOpen),
            ("passthrough", IoMode::Passthrough),
        ] {
            let l = labels(&[(LABEL_IO, value), ("team", "x")]);
            check_labels(&l, false).unwrap();
            assert_eq!(io_mode(&l), mode);
        }
        for bad in ["fast", "", "Passthrough", "no_open"] {
            match check_labels(&labels(&[(LABEL_IO, bad)]), false) {
                Err(ServiceError::InvalidArgument(msg)) => assert!(
                    msg.contains(LABEL_IO)
                        && msg.contains("no-open")
                        && msg.contains("passthrough"),
                    "the error names the label and the allowed values: {msg}"
                ),
                other => panic!("{LABEL_IO}={bad:?}: expected InvalidArgument, got {other:?}"),
            }
        }
    }

    #[test]
    pub(super) fn network_and_publish_labels_are_checked() {
        check_labels(&labels(&[(LABEL_PUBLISH, "manual")]), false).unwrap();
        check_labels(&labels(&[(LABEL_NETWORK, "enabled")]), true).unwrap();
        assert!(matches!(
            check_labels(&labels(&[(LABEL_NETWORK, "enabled")]), false),
            Err(ServiceError::FailedPrecondition(_))
        ));
        assert!(matches!(
            check_labels(&labels(&[(LABEL_NETWORK, "wifi")]), true),
            Err(ServiceError::InvalidArgument(_))
        ));
        assert!(matches!(
            check_labels(&labels(&[(LABEL_PUBLISH, "later")]), false),
            Err(ServiceError::InvalidArgument(_))
        ));
    }
}
