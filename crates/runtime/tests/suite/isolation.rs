//! Isolation specific to bwrap: our init as PID 1, the file system view, Landlock, the init's
//! capabilities. (The shared behaviour is in the conformance suite.)

use pretty_assertions::assert_eq;

use agentfense_runtime::conformance::assert_all_fail;

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
    assert_all_fail(
        &fx,
        &[
            "ls /proc/1/fd",
            "cat /proc/1/environ",
            "ls /sys/class/net",
            "touch /run/agentfense/x",
            // Allowed by file permissions (the process owns it), denied by Landlock.
            "echo renamed > /proc/self/comm",
        ],
    )
    .await;
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
        "CapEff:\t00000000000000eb\nCapBnd:\t00000000000000eb\n"
    );
    fx.destroy().await;
}
