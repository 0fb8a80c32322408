//! What a command sees: the workspace, its user, the root filesystem, the network.

use std::os::unix::fs::MetadataExt;

use pretty_assertions::assert_eq;

use super::{Options, Target, assert_all_fail};
use crate::types::NetworkMode;

/// Host and sandbox share the workspace; the sandbox writes as uid 1000 and cannot read what
/// that user may not.
pub async fn workspace_is_shared_with_the_host(t: &Target) {
    let fx = t.start().await;
    std::fs::write(fx.workspace.join("from-host.txt"), "hello from the host\n").unwrap();
    let r = fx
        .sh("cat /workspace/from-host.txt; echo made > made.txt; ls")
        .await;
    assert_eq!(r.stdout, "hello from the host\nfrom-host.txt\nmade.txt\n");
    let made = fx.workspace.join("made.txt");
    assert_eq!(std::fs::read_to_string(&made).unwrap(), "made\n");
    // Written as the sandbox user, not root.
    let m = std::fs::metadata(&made).unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 1000));
    // A host file the sandbox user may not read stays unreadable.
    let secret = fx.workspace.join("secret");
    std::fs::write(&secret, "s").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let r = fx.sh("cat secret").await;
    assert_ne!(r.exit_code, 0);
    assert!(r.stderr.contains("Permission denied"), "{r:?}");
    fx.destroy().await;
}

/// Only /workspace, /tmp and HOME are writable; /tmp persists between commands.
pub async fn root_filesystem_is_read_only(t: &Target) {
    let fx = t.start().await;
    for path in ["/etc/x", "/usr/x", "/x", "/var/x"] {
        let r = fx.sh(&format!("touch {path}")).await;
        assert_ne!(r.exit_code, 0, "{path}: {r:?}");
        if t.read_only_root_is_erofs {
            assert!(r.stderr.contains("Read-only file system"), "{path}: {r:?}");
        }
    }
    assert_all_fail(
        &fx,
        &[
            "cat /etc/shadow",
            "ls /root",
            "touch /dev/x",
            "echo h > /proc/sys/kernel/hostname",
        ],
    )
    .await;
    // /tmp, HOME and /workspace are writable; HOME belongs to the sandbox user.
    let r = fx
        .sh("echo w > /workspace/w && echo t > /tmp/t && echo h > \"$HOME/h\" && cat /workspace/w /tmp/t \"$HOME/h\" && stat -c '%U %a' \"$HOME\"")
        .await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str()),
        (0, "w\nt\nh\nsandbox 700\n"),
        "{r:?}"
    );
    assert_eq!(
        std::fs::read_to_string(fx.workspace.join("w")).unwrap(),
        "w\n"
    );
    // /tmp persists between commands of one run.
    assert_eq!(fx.sh("ls /tmp/t").await.stdout, "/tmp/t\n");
    fx.destroy().await;
}

/// Commands run as uid/gid 1000 without capabilities, with `no_new_privs` and a seccomp
/// filter; mounting and new namespaces are refused.
pub async fn commands_run_unprivileged(t: &Target) {
    let fx = t.start().await;
    let r = fx
        .sh("id -u; id -g; grep -E '^(CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status")
        .await;
    assert_eq!(
        r.stdout,
        format!(
            "1000\n1000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t{:016x}\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n",
            t.command_bounding_set
        )
    );
    // The syscall probes below use ctypes: without it they would fail for the wrong reason.
    let r = fx.sh("python3 -c 'import ctypes'").await;
    assert_eq!(r.exit_code, 0, "python3 with ctypes is needed here: {r:?}");
    assert_all_fail(
        &fx,
        &[
            "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m",
            "unshare -U true",
            "unshare -r true",
            "unshare -n true",
            "dmesg",
            "python3 -c 'import ctypes,sys; sys.exit(0 if ctypes.CDLL(None).syscall(272, 0x10000000)==0 else 1)'",
            // io_uring_setup(8, params): refused (a ring would be an fd >= 0).
            "python3 -c 'import ctypes,sys; p = ctypes.create_string_buffer(120); sys.exit(0 if ctypes.CDLL(None).syscall(425, 8, p) >= 0 else 1)'",
            // ptrace(PTRACE_TRACEME) succeeds unless filtered.
            "python3 -c 'import ctypes,sys; sys.exit(0 if ctypes.CDLL(None).ptrace(0,0,0,0)==0 else 1)'",
            // pidfd_getfd and kcmp with bad arguments: EBADF / ESRCH unless filtered (EPERM).
            "python3 -c 'import ctypes,sys; c = ctypes.CDLL(None, use_errno=True); c.syscall(438, -1, 0, 0); sys.exit(0 if ctypes.get_errno() != 1 else 1)'",
            "python3 -c 'import ctypes,sys; c = ctypes.CDLL(None, use_errno=True); c.syscall(312, 999999999, 999999999, 0, 0, 0); sys.exit(0 if ctypes.get_errno() != 1 else 1)'",
        ],
    )
    .await;
    assert_eq!(fx.sh("ls /tmp/m | wc -l").await.stdout, "0\n");
    // clone3 (whose namespace flags a filter cannot see) answers ENOSYS, so libc falls back
    // to the filtered clone.
    let r = fx
        .sh("python3 -c 'import ctypes; c = ctypes.CDLL(None, use_errno=True); print(c.syscall(435, 0, 0), ctypes.get_errno())'")
        .await;
    assert_eq!(r.stdout, "-1 38\n", "{r:?}");
    fx.destroy().await;
}

/// A command starts with stdin, stdout and stderr only: nothing of the runtime, the server or
/// the sandbox's init is inherited (finding 3 of issue 13: fd 10 and a writable server pipe).
pub async fn commands_inherit_only_stdio(t: &Target) {
    let fx = t.start().await;
    let r = fx.sh("ls /proc/$$/fd; true").await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "0\n1\n2\n"), "{r:?}");
    fx.destroy().await;
}

/// Without networking only `lo` exists and the host is unreachable; with it (positive
/// control) the same probe reaches a host listener.
pub async fn no_network_by_default(t: &Target) {
    // A listener on the host's loopback must be unreachable from inside.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fx = t.start().await;
    let r = fx
        .sh("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
        .await;
    assert_eq!(r.stdout, "lo\n");
    let probe = format!("bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' && echo connected");
    let r = fx.sh(&probe).await;
    assert_ne!(r.exit_code, 0, "{r:?}");
    assert!(!r.stdout.contains("connected"));
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
    fx.destroy().await;

    // Positive control: with networking enabled the same probe reaches the host listener.
    let fx = t
        .start_with(Options {
            network: NetworkMode::Host,
            ..Options::default()
        })
        .await;
    let r = fx.sh(&probe).await;
    assert_eq!(r.stdout, "connected\n", "{r:?}");
    fx.destroy().await;
    drop(listener);
}
