//! Isolation specific to bwrap: our init as PID 1, the file system view, Landlock, the init's
//! capabilities. (The shared behaviour is in the conformance suite.)

use pretty_assertions::assert_eq;

use agentfense_runtime::Runtime;

use agentfense_runtime::conformance::{DENIED, Refused, assert_all_refused};

use super::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_sandbox_processes_are_visible() {
    if skip("only_sandbox_processes_are_visible") {
        return;
    }
    let fx = start().await;
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
    let fx = start().await;
    assert_all_refused(
        &fx,
        &[
            ("ls /proc/1/fd", DENIED),
            ("cat /proc/1/environ", DENIED),
            ("ls /sys/class/net", Refused::Saying(&["No such file"])),
            (
                "touch /run/agentfense/x",
                Refused::Saying(&["Read-only file system", "Permission denied"]),
            ),
            // Allowed by file permissions (the process owns it), denied by Landlock.
            ("echo renamed > /proc/self/comm", DENIED),
        ],
    )
    .await;
    // Enough of /etc for everyday tools.
    let r = fx
        .sh("whoami && python3 -c 'print(6*7)' && cd /tmp && git init -q r && git -C r status --short && echo git-ok && ls /etc/ssl/certs | head -c1 | wc -c")
        .await;
    assert_eq!(r.stdout, "sandbox\n42\ngit-ok\n1\n", "{r:?}");
    // Node and a compiler, when the host has them (said loudly when it does not: a missing
    // tool must not look like a pass).
    for (tool, cmd, want) in [
        ("node", "node -e 'console.log(1+1)'", "2\n"),
        (
            "cc",
            "cd /tmp && printf 'int main(void){return 3;}' > a.c && cc a.c -o a && ./a; echo $?",
            "3\n",
        ),
    ] {
        if fx.sh(&format!("command -v {tool}")).await.exit_code != 0 {
            eprintln!(
                "SKIPPED the {tool} check of file_system_view_and_write_restrictions: no {tool} on this host"
            );
            continue;
        }
        let r = fx.sh(cmd).await;
        assert_eq!(r.stdout, want, "{tool}: {r:?}");
    }
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn landlock_and_init_capabilities() {
    if skip("landlock_and_init_capabilities") {
        return;
    }
    let fx = start().await;
    let info = fx.rt.info(&fx.id).await.unwrap();
    assert_eq!(info.landlock, "fully_enforced");
    assert!(info.running && info.host_pids.len() >= 2, "{info:?}");
    // The init (PID 1, root) keeps only the capabilities it needs.
    let r = fx.sh("grep -E '^Cap(Eff|Bnd):' /proc/1/status").await;
    assert_eq!(
        r.stdout,
        "CapEff:\t00000000000000e0\nCapBnd:\t00000000000000e0\n"
    );
    fx.destroy().await;
}

/// The host uid (`Uid:` of `/proc/<pid>/status`, all four equal) of host process `pid`.
fn host_uid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(ids.iter().all(|&i| i == ids[0]), "{ids:?}");
    ids[0]
}

/// Runs `sleep 300` in `fx` and returns the host pid of that `sleep` (and its stream, which
/// keeps it running).
async fn sleeping(fx: &Fixture) -> (u32, agentfense_runtime::ExecStream) {
    let stream = fx
        .rt
        .exec_stream(&fx.id, req("exec sleep 300"))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let pids = fx.rt.info(&fx.id).await.unwrap().host_pids;
        let found = pids.into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c == "sleep\n")
        });
        if let Some(pid) = found {
            return (pid, stream);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no sleep process appeared"
        );
        tokio::task::yield_now().await;
    }
}

/// Whether host user `uid` can list `/proc/<pid>/root/workspace` (a sandbox's files, through
/// the `allow_other` mount) or signal `pid`.
fn host_user_reaches(uid: u32, pid: u32) -> (bool, bool) {
    let as_user = |cmd: &str| {
        std::process::Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                "sh".into(),
                "-c".into(),
                cmd.into(),
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .expect("setpriv (util-linux) is needed")
            .success()
    };
    (
        as_user(&format!("ls /proc/{pid}/root/workspace")),
        as_user(&format!("kill -0 {pid}")),
    )
}

/// The attack of finding 8 (issue 13): every sandbox's user was host uid 1000, in the host's
/// user namespace, with the init as host root. Whoever owns uid 1000 on the host (and every
/// other sandbox) could signal sandbox processes and read their workspace through
/// `/proc/<pid>/root`; per-uid kernel limits were shared. Now each sandbox has a user
/// namespace mapped onto a block of host ids of its own, far from any account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_have_host_ids_of_their_own() {
    if skip("sandboxes_have_host_ids_of_their_own") {
        return;
    }
    let (a, b) = (start().await, start().await);
    std::fs::write(a.workspace.join("secret"), "a's work\n").unwrap();
    let (pid_a, stream_a) = sleeping(&a).await;
    let (pid_b, stream_b) = sleeping(&b).await;
    let (uid_a, uid_b) = (host_uid(pid_a), host_uid(pid_b));
    assert_ne!(uid_a, 1000);
    assert_ne!(uid_a, uid_b, "two sandboxes share host uid {uid_a}");
    for uid in [uid_a, uid_b] {
        assert!(uid >= agentfense_runtime::userns::DEFAULT_BASE, "{uid}");
    }
    assert_eq!(Some((uid_a, uid_a)), a.rt.sandbox_owner(&a.id));
    // The old shared uid, and the other sandbox's user, reach nothing of sandbox a.
    assert_eq!(host_user_reaches(1000, pid_a), (false, false));
    assert_eq!(host_user_reaches(uid_b, pid_a), (false, false));
    // (The probe itself works: the process's own host uid may signal it.)
    assert!(host_user_reaches(uid_a, pid_a).1);

    // The init: root only in the sandbox's own user namespace, an unprivileged uid on the host.
    let init = a.rt.info(&a.id).await.unwrap().host_pids[1];
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
    assert_ne!(ns(&init.to_string()), ns("self"));
    assert_eq!(host_uid(init), uid_a - 1000);
    // bwrap itself (outside the sandbox, as the block's first uid) sees a root of its own with
    // no other host mount: holding, say, another sandbox's FUSE mount would make that mount's
    // unmount wait for this sandbox to end.
    let bwrap = a.rt.info(&a.id).await.unwrap().host_pids[0];
    assert_eq!(host_uid(bwrap), uid_a - 1000);
    let mounts = std::fs::read_to_string(format!("/proc/{bwrap}/mountinfo")).unwrap();
    let points: Vec<&str> = mounts.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    assert!(points.contains(&"/run/agentfense/workspace"), "{mounts}");
    for host_only in ["/sys", "/root", "/home", "/var/lib/docker"] {
        assert!(
            !points.contains(&host_only),
            "bwrap holds {host_only}: {mounts}"
        );
    }
    // Inside, the map shows the block, not the host's identity map `0 0 4294967295`.
    let r = a.sh("cat /proc/1/uid_map /proc/self/gid_map").await;
    let want = format!("0 {} 65536\n", uid_a - 1000);
    let got: Vec<String> = r
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") + "\n")
        .collect();
    assert_eq!(got, vec![want.clone(), want], "{r:?}");
    // The workspace, given to the sandbox user's host uid, is the sandbox user's inside; a
    // file of host root's is nobody's (host root is not mapped at all).
    assert_eq!(
        a.sh("stat -c '%U %u' /workspace /workspace/secret; id -un")
            .await
            .stdout,
        "sandbox 1000\nnobody 65534\nsandbox\n"
    );
    drop((stream_a, stream_b));
    a.destroy().await;
    b.destroy().await;
}

async fn session(fx: &Fixture) -> String {
    fx.rt
        .session_create(&fx.id, Default::default())
        .await
        .unwrap()
}

async fn call(fx: &Fixture, s: &str, cmd: &str) -> agentfense_runtime::ExecResult {
    fx.rt
        .session_exec(&fx.id, s, cmd, Some(std::time::Duration::from_secs(20)))
        .await
        .unwrap_or_else(|e| panic!("{cmd:?}: {e:?}"))
}

/// The attack of finding 1 (issue 13): a session command plants links named like the next
/// calls' files, pointing where only root may write, in every directory under `/run` it can
/// write (the init used to write, chmod and chown the call files there as host root, following
/// them: `/dev/null` became the sandbox user's, mode 600, on the host). Nothing under `/run` is
/// writable, no link is followed, and the calls stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_channel_ignores_planted_links() {
    if skip("session_channel_ignores_planted_links") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let null_before = std::fs::metadata("/dev/null").unwrap();
    let fx = start().await;
    let s = session(&fx).await;
    let plant = r#"n=0
for d in $(find /run /dev -type d -writable 2>/dev/null); do
  case $d in /dev/shm*|/dev/pts*) continue;; esac
  n=$((n+1))
  for k in c o e s; do for i in 1 2 3 4 5 6 7 8; do
    ln -s /run/evil-$k$i "$d/$k$i" 2>/dev/null
    ln -s /dev/null "$d/$k-$i" 2>/dev/null
  done; done
done
echo "writable: $n $(find /run -writable 2>/dev/null | wc -l)""#;
    let r = call(&fx, &s, plant).await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str()),
        (0, "writable: 0 0\n"),
        "{r:?}"
    );
    for i in 2..5 {
        let r = call(
            &fx,
            &s,
            &format!("echo call{i}; echo err{i} >&2; (exit {i})"),
        )
        .await;
        assert_eq!(
            (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
            (
                i,
                format!("call{i}\n").as_str(),
                format!("err{i}\n").as_str()
            )
        );
    }
    let r = fx
        .sh("ls /run/evil-* 2>/dev/null | wc -l; ls /run/agentfense/ch")
        .await;
    assert_eq!(r.stdout, "0\n", "{r:?}");
    assert!(r.stderr.contains("Permission denied"), "{r:?}");
    let null_after = std::fs::metadata("/dev/null").unwrap();
    assert_eq!(
        (null_after.mode(), null_after.uid(), null_after.gid()),
        (null_before.mode(), null_before.uid(), null_before.gid())
    );
    fx.destroy().await;
}

/// The session shell runs from an execute-only image (see the conformance case
/// `processes_of_a_session_cannot_reach_into_its_shell`); its name is still the one asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_shells_keep_their_name() {
    if skip("session_shells_keep_their_name") {
        return;
    }
    let fx = start().await;
    let s = session(&fx).await;
    let r = call(&fx, &s, "ps -o args= -p $$").await;
    assert_eq!(r.stdout, "/bin/sh -i\n", "{r:?}");
    fx.destroy().await;
}
