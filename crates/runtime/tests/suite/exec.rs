//! Exec: output, stdin, env, workdir, timeouts, caps, streaming, concurrency, stop.

use std::time::{Duration, Instant};

use agentfense_runtime::{ExecEvent, Runtime, RuntimeError};
use pretty_assertions::assert_eq;

use super::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trip() {
    if skip("echo_round_trip") {
        return;
    }
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
    if skip("stdin_env_and_workdir") {
        return;
    }
    let fx = Fixture::start().await;
    let mut r = req("cat; echo \"[$FOO]\"; pwd");
    r.stdin = b"hello\n".to_vec();
    r.env.insert("FOO".into(), "bar baz".into());
    let res = fx.rt.exec(&fx.id, r).await.unwrap();
    assert_eq!(res.stdout, "hello\n[bar baz]\n/workspace\n");

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
    assert_eq!(
        err.kind(),
        agentfense_runtime::ErrorKind::InvalidArgument,
        "{err:?}"
    );
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_tree_promptly() {
    if skip("timeout_kills_the_whole_tree_promptly") {
        return;
    }
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
    // Nothing of the tree survives.
    let r = fx
        .sh("sleep 0.1; ps -e -o comm= | grep -c '^sleep' || true")
        .await;
    assert_eq!(r.stdout.trim(), "0");

    // Not even a process that left the command's session and process group (its cgroup is
    // killed as a whole).
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
    // (A killed orphan may linger as a zombie for a moment until the init reaps it.)
    let r = fx
        .sh("sleep 0.1; ps -e -o comm= | grep -c '^sleep' || true")
        .await;
    assert_eq!(r.stdout.trim(), "0");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_job_does_not_hold_the_result() {
    if skip("background_job_does_not_hold_the_result") {
        return;
    }
    let fx = Fixture::start().await;
    let t = Instant::now();
    let r = fx.sh("sleep 30 & echo done").await;
    assert_eq!(r.stdout, "done\n");
    assert!(t.elapsed() < Duration::from_secs(2));
    // ...and it keeps running: /tmp and processes persist for the sandbox's life.
    let r = fx
        .sh("echo x > /tmp/persist; ps -e -o comm= | grep -c '^sleep'")
        .await;
    assert_eq!(r.stdout.trim(), "1");
    assert_eq!(fx.sh("cat /tmp/persist").await.stdout, "x\n");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_capped_with_a_marker_and_lossy_utf8() {
    if skip("output_is_capped_with_a_marker_and_lossy_utf8") {
        return;
    }
    let fx = Fixture::with(Opts {
        cap: 1000,
        ..Opts::default()
    })
    .await;
    let r = fx
        .sh("head -c 300000 /dev/zero | tr '\\0' a; head -c 5000 /dev/zero | tr '\\0' b >&2")
        .await;
    assert!(r.stdout_truncated && r.stderr_truncated);
    assert!(r.stdout.starts_with(&"a".repeat(1000)));
    assert!(
        r.stdout.contains("output truncated: 299000 more bytes"),
        "{}",
        &r.stdout[1000..]
    );
    assert!(r.stderr.contains("output truncated: 4000 more bytes"));
    let r = fx.sh("printf 'x\\377y\\342\\202\\254'").await;
    assert_eq!(r.stdout, "x\u{fffd}y€");
    // SIGPIPE has its default action in commands.
    let r = fx.sh("yes | head -n 2").await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "y\ny\n", "")
    );
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stream_tags_chunks_and_ends_with_the_exit_code() {
    if skip("exec_stream_tags_chunks_and_ends_with_the_exit_code") {
        return;
    }
    let fx = Fixture::start().await;
    let t = Instant::now();
    let mut s = fx
        .rt
        .exec_stream(&fx.id, req("echo a; sleep 0.5; echo b >&2; exit 4"))
        .await
        .unwrap();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(first, ExecEvent::Stdout("a\n".into()));
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "chunks must stream"
    );
    assert_eq!(
        s.next().await.unwrap().unwrap(),
        ExecEvent::Stderr("b\n".into())
    );
    match s.next().await.unwrap().unwrap() {
        ExecEvent::Exit { exit_code, .. } => assert_eq!(exit_code, 4),
        other => panic!("{other:?}"),
    }
    assert!(s.next().await.is_none());

    // Dropping the stream kills the command.
    let s = fx.rt.exec_stream(&fx.id, req("sleep 77")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(count_host_processes("sleep 77"), 1);
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count_host_processes("sleep 77"), 0);

    let mut r = req("sleep 10");
    r.timeout = Some(Duration::from_millis(300));
    let mut s = fx.rt.exec_stream(&fx.id, r).await.unwrap();
    assert!(matches!(
        s.next().await.unwrap(),
        Err(RuntimeError::Timeout { .. })
    ));
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_execs() {
    if skip("concurrent_execs") {
        return;
    }
    let fx = Fixture::start().await;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (rt, id) = (fx.rt.clone(), fx.id.clone());
        tasks.push(tokio::spawn(async move {
            let cmd = format!("sleep 0.3; echo {i}; echo e{i} >&2");
            let r = rt.exec(&id, req(&cmd)).await.unwrap();
            assert_eq!((r.stdout, r.stderr), (format!("{i}\n"), format!("e{i}\n")));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_everything_and_start_again_works() {
    if skip("stop_kills_everything_and_start_again_works") {
        return;
    }
    let fx = Fixture::start().await;
    fx.sh("sleep 300 > /dev/null 2>&1 &").await;
    let before = count_host_processes("sleep 300");
    assert!(before >= 1);
    // An exec in flight is ended by stop, promptly.
    let (rt, id) = (fx.rt.clone(), fx.id.clone());
    let inflight = tokio::spawn(async move { rt.exec(&id, req("sleep 50")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    fx.rt.stop(&fx.id).await.unwrap();
    let r = inflight.await.unwrap();
    assert!(matches!(r, Err(RuntimeError::NotRunning { .. })), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(matches!(
        fx.rt.exec(&fx.id, req("true")).await,
        Err(RuntimeError::NotRunning { .. })
    ));
    assert_eq!(count_host_processes("sleep 300"), before - 1);
    fx.rt.start(&fx.id).await.unwrap();
    assert_eq!(fx.sh("echo again").await.stdout, "again\n");
    fx.destroy().await;
}

/// Processes on the host whose command line is exactly `cmdline` (space separated).
pub fn count_host_processes(cmdline: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c: Vec<String> = c
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            if c.join(" ") == cmdline {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_without_cgroups() {
    if skip("works_without_cgroups") {
        return;
    }
    let fx = Fixture::with(Opts {
        no_cgroups: true,
        ..Opts::default()
    })
    .await;
    assert_eq!(fx.sh("echo hi").await.stdout, "hi\n");
    // Without cgroups the timeout kills the command's process group.
    let mut r = req("sleep 100 & wait");
    r.timeout = Some(Duration::from_millis(500));
    let t = Instant::now();
    assert!(matches!(
        fx.rt.exec(&fx.id, r).await,
        Err(RuntimeError::Timeout { .. })
    ));
    assert!(t.elapsed() < Duration::from_millis(1500));
    let r = fx
        .sh("sleep 0.1; ps -e -o comm= | grep -c '^sleep' || true")
        .await;
    assert_eq!(r.stdout.trim(), "0");
    // Limits cannot be enforced without cgroups: creating such a sandbox fails closed.
    let err = fx
        .rt
        .create(
            "limited",
            agentfense_runtime::SandboxSpec {
                image: None,
                workspace: fx.ws.path().to_path_buf(),
                limits: agentfense_runtime::ResourceLimits {
                    pids_limit: Some(10),
                    ..Default::default()
                },
                network: Default::default(),
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
