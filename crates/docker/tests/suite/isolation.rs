//! Isolation specific to Docker: the configured user, mounts propagating into the workspace.
//! (The shared behaviour is in the conformance suite.)

use agentfense_runtime::Runtime;
use pretty_assertions::assert_eq;

use super::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_user_is_reported() {
    let Some(_g) = guard("sandbox_user_is_reported").await else {
        return;
    };
    let fx = start().await;
    assert_eq!(fx.rt.sandbox_user(&fx.id).await.unwrap(), "1000:1000");
    fx.destroy().await;
}

/// Unmounts on drop (the test mounts on the host).
struct Mounted(Vec<std::path::PathBuf>);

impl Drop for Mounted {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(p)
                .status();
        }
    }
}

fn mount(args: &[&str]) {
    let st = std::process::Command::new("mount")
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "mount {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_made_after_start_propagate_into_the_workspace() {
    let Some(_g) = guard("mounts_made_after_start_propagate_into_the_workspace").await else {
        return;
    };
    // Like the server's mount directory: a shared mount holding the sandbox's workspace, where a
    // (FUSE) mount may appear or be replaced while the container runs.
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap().to_owned();
    mount(&["--bind", &r, &r]);
    let mut guard = Mounted(vec![root.path().to_path_buf()]);
    mount(&["--make-rshared", &r]);
    let ws = root.path().join("ws");
    std::fs::create_dir_all(ws.join("late")).unwrap();
    std::os::unix::fs::chown(&ws, Some(1000), Some(1000)).unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let rt = agentfense_docker::DockerRuntime::connect(config(), tx)
        .await
        .unwrap();
    let id = format!("p{}", rand_suffix());
    rt.create(
        &id,
        agentfense_runtime::SandboxSpec {
            image: None,
            workspace: ws.clone(),
            limits: Default::default(),
            network: Default::default(),
            tmp_size: None,
            workspace_path: None,
            home: None,
        },
    )
    .await
    .unwrap();
    rt.start(&id).await.unwrap();
    let late = ws.join("late");
    mount(&[
        "-t",
        "tmpfs",
        "-o",
        "mode=0755",
        "late",
        late.to_str().unwrap(),
    ]);
    guard.0.push(late.clone());
    std::fs::write(late.join("file"), "mounted later\n").unwrap();
    let r = rt.exec(&id, req("cat /workspace/late/file")).await.unwrap();
    assert_eq!(r.stdout, "mounted later\n", "{r:?}");
    rt.destroy(&id).await.unwrap();
    drop(guard);
}
