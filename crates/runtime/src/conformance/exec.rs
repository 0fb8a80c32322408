//! Exec: output, stdin, env, workdir, timeouts, caps, streaming, concurrency, stop.

use std::collections::BTreeSet;
use std::time::Duration;

use pretty_assertions::assert_eq;

use super::{Options, Target, count_host_processes, eventually, req, without_waiting_for};
use crate::error::{ErrorKind, RuntimeError};
use crate::output::truncation_marker;
use crate::types::ExecEvent;

/// Exit code, stdout and stderr; stderr kept on success; killed-by-signal is 128+n.
pub async fn echo_round_trip(t: &Target) {
    let fx = t.start().await;
    let r = fx.sh("echo out; echo err >&2; exit 3").await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (3, "out\n", "err\n")
    );
    // stderr is kept on success too, and killed-by-signal maps to 128+n.
    let r = fx.sh("echo warn >&2; kill -TERM $$").await;
    assert_eq!((r.exit_code, r.stderr.as_str()), (143, "warn\n"));
    fx.destroy().await;
}

/// Stdin, extra variables, relative and absolute workdirs; escaping or missing ones refused.
pub async fn stdin_env_and_workdir(t: &Target) {
    let fx = t.start().await;
    let mut r = req("cat; echo \"[$FOO]\"; pwd");
    r.stdin = b"hello\n".to_vec();
    r.env.insert("FOO".into(), "bar baz".into());
    let res = fx.rt.exec(&fx.id, r).await.unwrap();
    assert_eq!(res.stdout, "hello\n[bar baz]\n/workspace\n");
    // Without stdin, a reader gets end-of-file at once.
    assert_eq!(fx.sh("cat; echo done").await.stdout, "done\n");

    fx.sh("mkdir -p sub/dir").await;
    let mut r = req("pwd");
    r.workdir = "sub/dir".into();
    assert_eq!(
        fx.rt.exec(&fx.id, r).await.unwrap().stdout,
        "/workspace/sub/dir\n"
    );
    let mut r = req("pwd");
    r.workdir = "/workspace/sub".into();
    assert_eq!(
        fx.rt.exec(&fx.id, r).await.unwrap().stdout,
        "/workspace/sub\n"
    );
    for bad in ["../etc", "/etc", "sub/../../x"] {
        let mut r = req("pwd");
        r.workdir = bad.into();
        let err = fx.rt.exec(&fx.id, r).await.unwrap_err();
        assert!(
            matches!(err, RuntimeError::InvalidArgument { .. }),
            "{bad}: {err:?}"
        );
    }
    // A workdir that does not exist is reported as a setup failure (INVALID_ARGUMENT).
    let mut r = req("pwd");
    r.workdir = "missing".into();
    let err = fx.rt.exec(&fx.id, r).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err:?}");
    fx.destroy().await;
}

/// Commands get the clean default environment plus the request's variables, nothing of the
/// server's.
pub async fn environment_is_clean(t: &Target) {
    let fx = t.start().await;
    let mut r = req("env");
    r.env.insert("FOO".into(), "1".into());
    let out = fx.rt.exec(&fx.id, r).await.unwrap().stdout;
    let names: BTreeSet<&str> = out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    // What sh itself adds (PWD) is fine; nothing of the test process may appear.
    let mut allowed: BTreeSet<&str> = ["PATH", "HOME", "LANG", "TERM", "USER", "FOO", "PWD"].into();
    allowed.extend(t.extra_env);
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
    assert!(!out.contains("CARGO"), "{out}");
    for want in [
        "HOME=/tmp/home\n",
        "USER=sandbox\n",
        "LANG=C.UTF-8\n",
        "TERM=dumb\n",
        "PATH=",
    ] {
        assert!(out.contains(want), "{want} missing from {out}");
    }
    fx.destroy().await;
}

/// `sleep` processes inside the sandbox (by `comm`), after the target's reap grace.
async fn sleeps(t: &Target, fx: &super::Sandbox) -> usize {
    let cmd = format!("{}ps -e -o comm= | grep -c '^sleep' || true", t.settle());
    let r = fx.sh(&cmd).await;
    r.stdout.trim().parse().unwrap_or_else(|_| panic!("{r:?}"))
}

/// A timeout kills the command's whole tree (even what left its session) and returns promptly
/// with the partial output.
pub async fn timeout_kills_the_whole_tree_promptly(t: &Target) {
    let fx = t.start().await;
    let mut r = req("echo started; sleep 100 & wait");
    r.timeout = Some(Duration::from_secs(1));
    let err = without_waiting_for("sleep 100", fx.rt.exec(&fx.id, r))
        .await
        .unwrap_err();
    match err {
        RuntimeError::Timeout { stdout, .. } => assert_eq!(stdout, "started\n"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Nothing of the tree survives.
    assert_eq!(sleeps(t, &fx).await, t.idle_sleeps);

    // Not even a process that left the command's session and process group.
    let mut r = req("setsid sleep 101 & sleep 102 & wait");
    r.timeout = Some(Duration::from_millis(500));
    assert!(matches!(
        without_waiting_for("sleep 101/102", fx.rt.exec(&fx.id, r)).await,
        Err(RuntimeError::Timeout { .. })
    ));
    assert_eq!(sleeps(t, &fx).await, t.idle_sleeps);
    let r = fx
        .sh("ps -e -o args= | grep -c '^sleep 10[12]$' || true")
        .await;
    assert_eq!(r.stdout.trim(), "0");
    fx.destroy().await;
}

/// A background job does not hold the result, and keeps running (as do files in /tmp).
pub async fn background_job_does_not_hold_the_result(t: &Target) {
    let fx = t.start().await;
    // The job outlives any guard: the result cannot have waited for it.
    let r = without_waiting_for("the background job", fx.sh("sleep 303 & echo done")).await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "done\n"));
    // ...and it keeps running: /tmp and processes persist for the sandbox's life.
    let r = fx
        .sh("echo x > /tmp/persist; ps -e -o args= | grep -c '^sleep 303$'")
        .await;
    assert_eq!(r.stdout, "1\n");
    assert_eq!(sleeps(t, &fx).await, t.idle_sleeps + 1);
    assert_eq!(fx.sh("cat /tmp/persist").await.stdout, "x\n");
    fx.destroy().await;
}

/// Each stream is capped with the truncation marker; invalid UTF-8 is replaced; SIGPIPE has
/// its default action.
pub async fn output_is_capped_with_a_marker_and_lossy_utf8(t: &Target) {
    let fx = t
        .start_with(Options {
            output_cap: 1000,
            ..Options::default()
        })
        .await;
    let r = fx
        .sh("head -c 300000 /dev/zero | tr '\\0' a; head -c 5000 /dev/zero | tr '\\0' b >&2")
        .await;
    assert!(r.stdout_truncated && r.stderr_truncated);
    assert!(r.stdout.starts_with(&"a".repeat(1000)));
    assert!(
        r.stdout.ends_with(&truncation_marker(1000, 299_000)),
        "{}",
        &r.stdout[1000..]
    );
    assert!(r.stderr.starts_with(&"b".repeat(1000)));
    assert!(
        r.stderr.ends_with(&truncation_marker(1000, 4000)),
        "{}",
        &r.stderr[1000..]
    );
    // One stream over the cap, the other not.
    let r = fx
        .sh("head -c 5000 /dev/zero | tr '\\0' a; echo e >&2")
        .await;
    assert!(r.stdout_truncated && !r.stderr_truncated);
    assert_eq!(
        r.stdout,
        format!("{}{}", "a".repeat(1000), truncation_marker(1000, 4000))
    );
    assert_eq!(r.stderr, "e\n");
    let r = fx.sh("printf 'x\\377y\\342\\202\\254'").await;
    assert_eq!(r.stdout, "x\u{fffd}y€");
    let r = fx.sh("printf 'a\\377b\\303\\251'").await;
    assert_eq!(r.stdout, "a\u{fffd}bé");
    // SIGPIPE has its default action in commands.
    let r = fx.sh("yes | head -n 2").await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "y\ny\n", "")
    );
    fx.destroy().await;
}

/// The stream tags chunks as they are produced and ends with the exit code; a timeout ends it
/// with an error item.
pub async fn exec_stream_tags_chunks_and_ends_with_the_exit_code(t: &Target) {
    let fx = t.start().await;
    // Chunks arrive as produced, before the command ends: the command waits for a file the
    // test creates only after reading the first chunk.
    let mut s = fx
        .rt
        .exec_stream(
            &fx.id,
            req("echo a; while [ ! -e /tmp/go ]; do sleep 0.01; done; echo b >&2; exit 4"),
        )
        .await
        .unwrap();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(first, ExecEvent::Stdout("a\n".into()));
    assert_eq!(fx.sh("touch /tmp/go").await.exit_code, 0);
    assert_eq!(
        s.next().await.unwrap().unwrap(),
        ExecEvent::Stderr("b\n".into())
    );
    match s.next().await.unwrap().unwrap() {
        ExecEvent::Exit { exit_code, .. } => assert_eq!(exit_code, 4),
        other => panic!("{other:?}"),
    }
    assert!(s.next().await.is_none());

    // A timeout ends the stream with an error item, at once when nothing was printed...
    let mut r = req("sleep 10");
    r.timeout = Some(Duration::from_millis(300));
    let mut s = fx.rt.exec_stream(&fx.id, r).await.unwrap();
    assert!(matches!(
        s.next().await.unwrap(),
        Err(RuntimeError::Timeout { .. })
    ));
    // ...and after the output otherwise.
    let mut r = req("echo x; sleep 100");
    r.timeout = Some(Duration::from_millis(300));
    let mut s = fx.rt.exec_stream(&fx.id, r).await.unwrap();
    let mut last = None;
    while let Some(ev) = s.next().await {
        last = Some(ev);
    }
    assert!(
        matches!(last, Some(Err(RuntimeError::Timeout { .. }))),
        "{last:?}"
    );
    fx.destroy().await;
}

/// Dropping the stream kills the command.
pub async fn dropping_the_stream_kills_the_command(t: &Target) {
    let fx = t.start().await;
    let s = fx.rt.exec_stream(&fx.id, req("sleep 77")).await.unwrap();
    eventually("sleep 77 started", || count_host_processes("sleep 77") == 1).await;
    drop(s);
    eventually("sleep 77 killed", || count_host_processes("sleep 77") == 0).await;
    let r = fx.sh("ps -e -o args= | grep -c '^sleep 77$' || true").await;
    assert_eq!(r.stdout, "0\n");
    fx.destroy().await;
}

/// Commands of one sandbox run concurrently, each with its own output and exit code.
pub async fn concurrent_execs(t: &Target) {
    let fx = t.start().await;
    fx.sh("mkdir /tmp/barrier").await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (rt, id) = (fx.rt.clone(), fx.id.clone());
        tasks.push(tokio::spawn(async move {
            // A barrier: no command ends before all ten have started, so they can only
            // finish if they run at the same time (serialised, the first would time out).
            let cmd = format!(
                "touch /tmp/barrier/{i}; until [ $(ls /tmp/barrier | wc -l) -ge 10 ]; do sleep 0.01; done; \
                 echo {i}; echo e{i} >&2; exit {i}"
            );
            let r = rt.exec(&id, req(&cmd)).await.unwrap();
            assert_eq!(
                (r.exit_code, r.stdout, r.stderr),
                (i, format!("{i}\n"), format!("e{i}\n"))
            );
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    fx.destroy().await;
}

/// Stop ends commands in flight promptly and kills everything; the workspace stays; start
/// again works; state errors are reported; destroy forgets the sandbox.
pub async fn stop_kills_everything_and_start_again_works(t: &Target) {
    let fx = t.start().await;
    fx.sh("echo keep > /workspace/kept; sleep 300 > /dev/null 2>&1 &")
        .await;
    let before = count_host_processes("sleep 300");
    assert!(before >= 1);
    // Starting twice is refused.
    assert_eq!(
        fx.rt.start(&fx.id).await.unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    // An exec in flight is ended by stop, promptly.
    let (rt, id) = (fx.rt.clone(), fx.id.clone());
    let inflight = tokio::spawn(async move { rt.exec(&id, req("sleep 250")).await });
    eventually("sleep 250 started", || {
        count_host_processes("sleep 250") >= 1
    })
    .await;
    fx.rt.stop(&fx.id).await.unwrap();
    let r = without_waiting_for("sleep 250", inflight).await.unwrap();
    assert!(matches!(r, Err(RuntimeError::NotRunning { .. })), "{r:?}");
    assert!(matches!(
        fx.rt.exec(&fx.id, req("true")).await,
        Err(RuntimeError::NotRunning { .. })
    ));
    assert!(matches!(
        fx.rt.stop(&fx.id).await,
        Err(RuntimeError::NotRunning { .. })
    ));
    assert_eq!(count_host_processes("sleep 300"), before - 1);
    fx.rt.start(&fx.id).await.unwrap();
    assert_eq!(fx.sh("echo again").await.stdout, "again\n");
    let r = fx
        .sh("cat /workspace/kept; ps -e -o args= | grep -c '^sleep 300$' || true")
        .await;
    assert_eq!(r.stdout, "keep\n0\n");
    let (rt, id) = (fx.rt.clone(), fx.id.clone());
    fx.destroy().await;
    assert!(matches!(
        rt.exec(&id, req("true")).await,
        Err(RuntimeError::SandboxNotFound { .. })
    ));
}
