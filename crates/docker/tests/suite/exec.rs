//! Exec: output, stdin, env, workdir, timeouts, caps, streaming, concurrency.

use std::time::{Duration, Instant};

use agentfense_runtime::{ExecEvent, Runtime, RuntimeError};
use pretty_assertions::assert_eq;

use super::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trip() {
    let Some(_g) = guard("echo_round_trip").await else {
        return;
    };
    let fx = Fixture::start().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_env_and_workdir() {
    let Some(_g) = guard("stdin_env_and_workdir").await else {
        return;
    };
    let fx = Fixture::start().await;
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
    // A workdir that does not exist is INVALID_ARGUMENT, as in the bwrap runtime.
    let mut r = req("pwd");
    r.workdir = "missing".into();
    let err = fx.rt.exec(&fx.id, r).await.unwrap_err();
    assert_eq!(
        err.kind(),
        agentfense_runtime::ErrorKind::InvalidArgument,
        "{err:?}"
    );
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_environment() {
    let Some(_g) = guard("clean_environment").await else {
        return;
    };
    let fx = Fixture::start().await;
    // The test process's environment (standing in for the server's) never leaks in.
    let r = fx.sh("env | sort").await;
    assert!(!r.stdout.contains("CARGO"), "{}", r.stdout);
    for want in [
        "HOME=/tmp/home\n",
        "USER=sandbox\n",
        "LANG=C.UTF-8\n",
        "TERM=dumb\n",
        "PATH=",
    ] {
        assert!(r.stdout.contains(want), "{want} missing from {}", r.stdout);
    }
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_tree_promptly() {
    let Some(_g) = guard("timeout_kills_the_whole_tree_promptly").await else {
        return;
    };
    let fx = Fixture::start().await;
    let mut r = req("echo started; sleep 100 & wait");
    r.timeout = Some(Duration::from_secs(1));
    let t = Instant::now();
    let err = fx.rt.exec(&fx.id, r).await.unwrap_err();
    let took = t.elapsed();
    match err {
        RuntimeError::Timeout { stdout, .. } => assert_eq!(stdout, "started\n"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // Nothing of the tree survives, including a child that left the process group.
    let r = fx.sh("ps -e -o comm= | grep -c '^sleep$' || true").await;
    assert_eq!(
        r.stdout.trim(),
        "1",
        "only the container's `sleep infinity`: {r:?}"
    );
    let mut r = req("setsid sleep 101 & sleep 102 & wait");
    r.timeout = Some(Duration::from_millis(500));
    let t = Instant::now();
    assert!(matches!(
        fx.rt.exec(&fx.id, r).await,
        Err(RuntimeError::Timeout { .. })
    ));
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    let r = fx
        .sh("ps -e -o args= | grep -c '^sleep 10[12]$' || true")
        .await;
    assert_eq!(r.stdout.trim(), "0");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_job_does_not_hold_the_result() {
    let Some(_g) = guard("background_job_does_not_hold_the_result").await else {
        return;
    };
    let fx = Fixture::start().await;
    let t = Instant::now();
    let r = fx.sh("sleep 30 & echo hi").await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "hi\n"));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Background processes persist for the sandbox's life, like on a real machine.
    let r = fx.sh("ps -e -o args= | grep -c '^sleep 30$'").await;
    assert_eq!(r.stdout, "1\n");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_capped_with_a_marker_and_lossy_utf8() {
    let Some(_g) = guard("output_is_capped_with_a_marker_and_lossy_utf8").await else {
        return;
    };
    let fx = Fixture::with(Opts {
        cap: 1000,
        ..Opts::default()
    })
    .await;
    let r = fx
        .sh("head -c 5000 /dev/zero | tr '\\0' a; echo e >&2")
        .await;
    assert!(r.stdout_truncated && !r.stderr_truncated);
    assert!(r.stdout.starts_with(&"a".repeat(1000)));
    assert!(
        r.stdout
            .ends_with(&agentfense_runtime::output::truncation_marker(1000, 4000)),
        "{}",
        &r.stdout[1000..]
    );
    assert_eq!(r.stderr, "e\n");
    let r = fx.sh("printf 'a\\377b\\303\\251'").await;
    assert_eq!(r.stdout, "a\u{fffd}bé");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_events_tag_chunks_and_end_with_the_exit_code() {
    let Some(_g) = guard("exec_events_tag_chunks_and_end_with_the_exit_code").await else {
        return;
    };
    let fx = Fixture::start().await;
    let mut rx = fx
        .rt
        .exec_events(&fx.id, req("echo one; sleep 0.3; echo two >&2; exit 4"))
        .await
        .unwrap();
    let t = Instant::now();
    let mut events = Vec::new();
    let mut first_at = None;
    while let Some(ev) = rx.recv().await {
        let ev = ev.unwrap();
        first_at.get_or_insert(t.elapsed());
        events.push(ev);
    }
    // Chunks arrive as produced, before the command ends.
    assert!(
        first_at.unwrap() < Duration::from_millis(250),
        "{first_at:?}"
    );
    let n = events.len();
    assert_eq!(
        events[..n - 1].to_vec(),
        vec![
            ExecEvent::Stdout("one\n".into()),
            ExecEvent::Stderr("two\n".into())
        ]
    );
    assert!(matches!(
        events[n - 1],
        ExecEvent::Exit { exit_code: 4, .. }
    ));
    // A timeout ends the stream with an error item.
    let mut r = req("echo x; sleep 100");
    r.timeout = Some(Duration::from_millis(300));
    let mut rx = fx.rt.exec_events(&fx.id, r).await.unwrap();
    let mut last = None;
    while let Some(ev) = rx.recv().await {
        last = Some(ev);
    }
    assert!(
        matches!(last, Some(Err(RuntimeError::Timeout { .. }))),
        "{last:?}"
    );
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_execs() {
    let Some(_g) = guard("concurrent_execs").await else {
        return;
    };
    let fx = Fixture::start().await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (rt, id) = (fx.rt.clone(), fx.id.clone());
        tasks.push(tokio::spawn(async move {
            let r = rt
                .exec(&id, req(&format!("sleep 0.2; echo {i}; exit {i}")))
                .await
                .unwrap();
            assert_eq!((r.exit_code, r.stdout), (i, format!("{i}\n")));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_events_or_stopping_kills_the_command() {
    let Some(_g) = guard("dropping_events_or_stopping_kills_the_command").await else {
        return;
    };
    let fx = Fixture::start().await;
    let rx = fx.rt.exec_events(&fx.id, req("sleep 97")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(rx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = fx.sh("ps -e -o args= | grep -c '^sleep 97$' || true").await;
    assert_eq!(r.stdout, "0\n");
    // Stop while a command runs: it ends with NOT_RUNNING, promptly.
    let (rt, id) = (fx.rt.clone(), fx.id.clone());
    let running = tokio::spawn(async move { rt.exec(&id, req("sleep 30")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    fx.rt.stop(&fx.id).await.unwrap();
    let r = running.await.unwrap();
    assert!(matches!(r, Err(RuntimeError::NotRunning { .. })), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    fx.destroy().await;
}
