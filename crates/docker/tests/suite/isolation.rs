//! What a command sees: the workspace, its user, the root filesystem, the network.

use std::os::unix::fs::MetadataExt;

use agentfense_runtime::Runtime;
use pretty_assertions::assert_eq;

use super::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_is_shared_with_the_host() {
    let Some(_g) = guard("workspace_is_shared_with_the_host").await else {
        return;
    };
    let fx = Fixture::start().await;
    std::fs::write(fx.ws.path().join("from-host.txt"), "hello from the host\n").unwrap();
    let r = fx
        .sh("cat /workspace/from-host.txt; echo made > made.txt; ls")
        .await;
    assert_eq!(r.stdout, "hello from the host\nfrom-host.txt\nmade.txt\n");
    let made = fx.ws.path().join("made.txt");
    assert_eq!(std::fs::read_to_string(&made).unwrap(), "made\n");
    // Written as the sandbox user, not root.
    let m = std::fs::metadata(&made).unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 1000));
    // A host file the sandbox user may not read stays unreadable.
    let secret = fx.ws.path().join("secret");
    std::fs::write(&secret, "s").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let r = fx.sh("cat secret").await;
    assert_ne!(r.exit_code, 0);
    assert!(r.stderr.contains("Permission denied"), "{r:?}");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_unprivileged() {
    let Some(_g) = guard("commands_run_unprivileged").await else {
        return;
    };
    let fx = Fixture::start().await;
    let r = fx
        .sh("id -u; id -g; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs):' /proc/self/status")
        .await;
    assert_eq!(
        r.stdout,
        "1000\n1000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nNoNewPrivs:\t1\n"
    );
    assert_eq!(fx.rt.sandbox_user(&fx.id).await.unwrap(), "1000:1000");
    let r = fx.sh("cat /etc/shadow").await;
    assert_ne!(r.exit_code, 0);
    // mount and unshare are refused (no capabilities; docker's seccomp profile).
    let r = fx
        .sh("mount -t tmpfs none /mnt 2>&1; unshare -r true 2>&1; echo end")
        .await;
    assert!(r.stdout.ends_with("end\n"), "{r:?}");
    assert_eq!(fx.sh("ls /mnt | wc -l").await.stdout, "0\n");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_filesystem_is_read_only() {
    let Some(_g) = guard("root_filesystem_is_read_only").await else {
        return;
    };
    let fx = Fixture::start().await;
    for path in ["/etc/x", "/usr/x", "/x", "/var/x"] {
        let r = fx.sh(&format!("touch {path}")).await;
        assert_ne!(r.exit_code, 0, "{path}");
        assert!(r.stderr.contains("Read-only file system"), "{path}: {r:?}");
    }
    // /tmp, HOME and /workspace are writable; HOME belongs to the sandbox user.
    let r = fx
        .sh("touch /tmp/a && touch \"$HOME/b\" && touch /workspace/c && stat -c '%U %a' \"$HOME\" && echo ok")
        .await;
    assert_eq!(r.stdout, "sandbox 700\nok\n", "{r:?}");
    // /tmp persists between commands of one run.
    assert_eq!(fx.sh("ls /tmp/a").await.stdout, "/tmp/a\n");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_by_default() {
    let Some(_g) = guard("no_network_by_default").await else {
        return;
    };
    // A listener on the host's loopback must be unreachable from inside.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fx = Fixture::start().await;
    let r = fx
        .sh("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
        .await;
    assert_eq!(r.stdout, "lo\n");
    let r = fx
        .sh(&format!(
            "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), timeout=2)' 2>&1; echo rc=$?"
        ))
        .await;
    assert!(
        r.stdout.contains("Connection refused") && r.stdout.ends_with("rc=1\n"),
        "{r:?}"
    );
    let r = fx
        .sh("python3 -c 'import socket; socket.create_connection((\"10.255.255.1\", 80), timeout=2)' 2>&1; echo rc=$?")
        .await;
    assert!(
        r.stdout.contains("unreachable") && r.stdout.ends_with("rc=1\n"),
        "{r:?}"
    );
    drop(listener);
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
