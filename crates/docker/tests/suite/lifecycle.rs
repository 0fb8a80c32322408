//! Lifecycle: stop then start, destroy removes the container, labels and orphan cleanup,
//! missing images, state errors.

use agentfense_docker::{
    DockerConfig, DockerRuntime, LABEL_INSTANCE, LABEL_MANAGED, LABEL_SANDBOX_ID,
};
use agentfense_runtime::{ErrorKind, NetworkMode, Runtime, RuntimeError, SandboxSpec};
use pretty_assertions::assert_eq;
use tokio::sync::mpsc;

use super::common::*;

fn spec(ws: &std::path::Path) -> SandboxSpec {
    SandboxSpec {
        image: None,
        workspace: ws.to_path_buf(),
        limits: Default::default(),
        network: NetworkMode::None,
        tmp_size: None,
        workspace_path: None,
        home: None,
    }
}

/// The container behind the sandbox: labelled, removed by stop (so that start again creates
/// it anew) and by destroy. (Stop, start and destroy as such are in the conformance suite.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_then_start_and_destroy() {
    let Some(_g) = guard("stop_then_start_and_destroy").await else {
        return;
    };
    let fx = start().await;
    let name = format!("agentfense-{}", fx.id);
    let info = fx.rt.client().inspect_container(&name, None).await.unwrap();
    let labels = info.config.unwrap().labels.unwrap();
    assert_eq!(labels.get(LABEL_MANAGED).map(String::as_str), Some("true"));
    assert_eq!(labels.get(LABEL_SANDBOX_ID), Some(&fx.id));
    assert_eq!(labels.get(LABEL_INSTANCE), Some(&fx.rt.config().instance));
    fx.rt.stop(&fx.id).await.unwrap();
    assert!(!container_exists(&fx.rt, &name).await);
    // The original failed here with a name conflict.
    fx.rt.start(&fx.id).await.unwrap();
    assert!(container_exists(&fx.rt, &name).await);
    let rt = fx.rt.clone();
    fx.destroy().await;
    assert!(!container_exists(&rt, &name).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_cleaned_up_and_leftovers_replaced() {
    let Some(_g) = guard("orphans_are_cleaned_up_and_leftovers_replaced").await else {
        return;
    };
    let ws = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(ws.path(), Some(1000), Some(1000)).unwrap();
    let (tx, _rx) = mpsc::channel(8);
    // A "crashed server": its runtime goes away without destroying its sandboxes.
    let old = DockerRuntime::connect(config(), tx.clone()).await.unwrap();
    let (a, b) = (format!("o{}", rand_suffix()), format!("o{}", rand_suffix()));
    for id in [&a, &b] {
        old.create(id, spec(ws.path())).await.unwrap();
        old.start(id).await.unwrap();
    }
    drop(old);
    let rt = DockerRuntime::connect(config(), tx).await.unwrap();
    // The restarted server still knows `a`: starting it replaces the leftover container.
    rt.create(&a, spec(ws.path())).await.unwrap();
    rt.start(&a).await.unwrap();
    assert_eq!(
        rt.exec(&a, req("echo back")).await.unwrap().stdout,
        "back\n"
    );
    let removed = rt.cleanup_orphans(&[]).await.unwrap();
    assert!(removed.contains(&b), "{removed:?}");
    assert!(
        !removed.contains(&a),
        "running sandboxes are kept: {removed:?}"
    );
    assert!(!container_exists(&rt, &format!("agentfense-{b}")).await);
    assert!(container_exists(&rt, &format!("agentfense-{a}")).await);
    rt.destroy(&a).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_is_a_clear_failed_precondition() {
    let Some(_g) = guard("missing_image_is_a_clear_failed_precondition").await else {
        return;
    };
    let ws = tempfile::tempdir().unwrap();
    let (tx, _rx) = mpsc::channel(8);
    let rt = DockerRuntime::connect(config(), tx).await.unwrap();
    let id = format!("m{}", rand_suffix());
    let err = rt
        .create_with_image(&id, spec(ws.path()), Some("agentfense-no-such-image:1"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err:?}");
    assert!(
        err.to_string().contains("agentfense-no-such-image:1"),
        "{err}"
    );
    // Same for a default image that is missing.
    let (tx, _rx) = mpsc::channel(8);
    let rt = DockerRuntime::connect(
        DockerConfig {
            default_image: "agentfense-no-such-image:2".into(),
            ..config()
        },
        tx,
    )
    .await
    .unwrap();
    let err = rt.create(&id, spec(ws.path())).await.unwrap_err();
    assert!(
        err.to_string().contains("agentfense-no-such-image:2"),
        "{err}"
    );
    // Networking is refused unless the server enables it.
    let err = rt
        .create(
            &id,
            SandboxSpec {
                image: None,
                network: NetworkMode::Host,
                ..spec(ws.path())
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_behind_our_back_can_be_started_again() {
    let Some(_g) = guard("a_container_killed_behind_our_back_can_be_started_again").await else {
        return;
    };
    let fx = start().await;
    let id = fx.rt.container_id(&fx.id).await.unwrap();
    fx.rt
        .client()
        .kill_container(&id, None::<bollard::query_parameters::KillContainerOptions>)
        .await
        .unwrap();
    let err = fx.rt.exec(&fx.id, req("true")).await.unwrap_err();
    assert!(matches!(err, RuntimeError::NotRunning { .. }), "{err:?}");
    fx.rt.start(&fx.id).await.unwrap();
    assert_eq!(fx.sh("echo again").await.stdout, "again\n");
    fx.destroy().await;
}
