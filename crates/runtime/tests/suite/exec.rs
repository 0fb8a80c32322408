//! Exec specific to bwrap: running without cgroups. (The shared behaviour is in the
//! conformance suite.)

use std::time::Duration;

use agentfense_runtime::conformance::{
    Options, count_host_processes, eventually, without_waiting_for,
};
use agentfense_runtime::{Runtime, RuntimeError};
use pretty_assertions::assert_eq;

use super::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_without_cgroups() {
    if skip("works_without_cgroups") {
        return;
    }
    let fx = start_with(Options::default(), false).await;
    assert_eq!(fx.sh("echo hi").await.stdout, "hi\n");
    // Without cgroups the timeout kills the command's process group.
    let mut r = req("sleep 105 & wait");
    r.timeout = Some(Duration::from_millis(500));
    assert!(matches!(
        without_waiting_for("sleep 105", fx.rt.exec(&fx.id, r)).await,
        Err(RuntimeError::Timeout { .. })
    ));
    eventually("sleep 105 killed", || {
        count_host_processes("sleep 105") == 0
    })
    .await;
    // Limits cannot be enforced without cgroups: creating such a sandbox fails closed.
    let err = fx
        .rt
        .create(
            "limited",
            agentfense_runtime::SandboxSpec {
                image: None,
                workspace: fx.workspace.clone(),
                limits: agentfense_runtime::ResourceLimits {
                    pids_limit: Some(10),
                    ..Default::default()
                },
                network: Default::default(),
                tmp_size: None,
                workspace_path: None,
                home: None,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, RuntimeError::CgroupsUnavailable { .. }),
        "{err:?}"
    );
    fx.destroy().await;
}
