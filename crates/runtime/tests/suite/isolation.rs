//! Isolation: environment, network, processes, file system, privileges, hardening.

use std::collections::BTreeSet;

use agentfense_runtime::{NetworkMode, Runtime};
use pretty_assertions::assert_eq;

use super::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_is_clean() {
    if skip("environment_is_clean") {
        return;
    }
    let fx = Fixture::start().await;
    let mut r = req("env");
    r.env.insert("FOO".into(), "1".into());
    let out = fx.rt.exec(&fx.id, r).await.unwrap().stdout;
    let names: BTreeSet<&str> = out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    // What sh itself adds (PWD) is fine; nothing of the test process may appear.
    let allowed: BTreeSet<&str> = ["PATH", "HOME", "LANG", "TERM", "USER", "FOO", "PWD"].into();
    assert!(names.is_subset(&allowed), "unexpected variables: {names:?}");
    let host_only: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| !allowed.contains(k.as_str()))
        .collect();
    assert!(
        !host_only.is_empty(),
        "the test process has variables of its own"
    );
    for k in &host_only {
        assert!(!names.contains(k.as_str()), "{k} leaked into the sandbox");
    }
    assert!(out.contains("HOME=/tmp/home\n") && out.contains("USER=sandbox\n"));
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_by_default() {
    if skip("no_network_by_default") {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fx = Fixture::start().await;
    let r = fx
        .sh("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
        .await;
    assert_eq!(r.stdout, "lo\n");
    let probe = format!("bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' && echo connected");
    let r = fx.sh(&probe).await;
    assert_ne!(r.exit_code, 0, "{r:?}");
    assert!(!r.stdout.contains("connected"));
    fx.destroy().await;

    // Positive control: with networking enabled the same probe reaches the host listener.
    let fx = Fixture::with(Opts {
        network: NetworkMode::Host,
        ..Opts::default()
    })
    .await;
    let r = fx.sh(&probe).await;
    assert_eq!(r.stdout, "connected\n", "{r:?}");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_sandbox_processes_are_visible() {
    if skip("only_sandbox_processes_are_visible") {
        return;
    }
    let fx = Fixture::start().await;
    let r = fx.sh("ps -e -o pid=,user=,comm=").await;
    let lines: Vec<Vec<String>> = r
        .stdout
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert_eq!(lines[0], vec!["1", "root", "init"], "{}", r.stdout);
    let comms: Vec<&str> = lines[1..].iter().map(|l| l[2].as_str()).collect();
    assert_eq!(comms, vec!["sh", "ps"], "{}", r.stdout);
    assert!(lines[1..].iter().all(|l| l[1] == "sandbox"));
    assert_eq!(fx.sh("hostname").await.stdout, "sandbox\n");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_system_view_and_write_restrictions() {
    if skip("file_system_view_and_write_restrictions") {
        return;
    }
    let fx = Fixture::start().await;
    for cmd in [
        "ls /proc/1/fd",
        "cat /proc/1/environ",
        "cat /etc/shadow",
        "ls /root",
        "ls /sys/class/net",
        "touch /usr/x",
        "touch /etc/x",
        "touch /x",
        "touch /run/agentfense/x",
        "touch /dev/x",
        "echo h > /proc/sys/kernel/hostname",
        // Allowed by file permissions (the process owns it), denied by Landlock.
        "echo renamed > /proc/self/comm",
    ] {
        let r = fx.sh(cmd).await;
        assert_ne!(r.exit_code, 0, "{cmd} succeeded: {r:?}");
    }
    let r = fx
        .sh("echo w > /workspace/w && echo t > /tmp/t && echo h > $HOME/h && cat /workspace/w /tmp/t $HOME/h")
        .await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "w\nt\nh\n"), "{r:?}");
    assert_eq!(
        std::fs::read_to_string(fx.ws.path().join("w")).unwrap(),
        "w\n"
    );
    // Enough of /etc for everyday tools.
    let r = fx
        .sh("whoami && python3 -c 'print(6*7)' && cd /tmp && git init -q r && git -C r status --short && echo git-ok && ls /etc/ssl/certs | head -c1 | wc -c")
        .await;
    assert_eq!(r.stdout, "sandbox\n42\ngit-ok\n1\n", "{r:?}");
    // Node, when the host has it.
    let r = fx
        .sh("command -v node >/dev/null || { echo 2; exit 0; }; node -e 'console.log(1+1)'")
        .await;
    assert_eq!(r.stdout, "2\n", "{r:?}");
    // A compiler, when the host has one.
    let r = fx
        .sh("command -v cc >/dev/null || { echo 3; exit 0; }; cd /tmp && printf 'int main(void){return 3;}' > a.c && cc a.c -o a && ./a; echo $?")
        .await;
    assert_eq!(r.stdout, "3\n", "{r:?}");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileges_and_dangerous_syscalls_are_denied() {
    if skip("privileges_and_dangerous_syscalls_are_denied") {
        return;
    }
    let fx = Fixture::start().await;
    let info = fx.rt.info(&fx.id).await.unwrap();
    assert_eq!(info.landlock, "fully_enforced");
    assert!(info.running && info.host_pids.len() >= 2, "{info:?}");
    let r = fx
        .sh("id -u; grep -E '^(CapPrm|CapEff|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status")
        .await;
    assert_eq!(
        r.stdout,
        "1000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n"
    );
    // The init (PID 1, root) keeps only the capabilities it needs.
    let r = fx.sh("grep -E '^Cap(Eff|Bnd):' /proc/1/status").await;
    assert_eq!(
        r.stdout,
        "CapEff:\t00000000000000eb\nCapBnd:\t00000000000000eb\n"
    );
    for cmd in [
        "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m",
        "unshare -U true",
        "unshare -r true",
        "unshare -n true",
        "dmesg",
        "python3 -c 'import ctypes,sys; sys.exit(0 if ctypes.CDLL(None).ptrace(0,0,0,0)==0 else 1)'",
        "python3 -c 'import ctypes,sys; sys.exit(0 if ctypes.CDLL(None).syscall(272, 0x10000000)==0 else 1)'",
    ] {
        let r = fx.sh(cmd).await;
        assert_ne!(r.exit_code, 0, "{cmd} succeeded: {r:?}");
    }
    fx.destroy().await;
}
