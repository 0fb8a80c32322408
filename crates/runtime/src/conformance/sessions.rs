//! Persistent sessions: state persists, exact per-call output, timeouts, exit, serialisation,
//! destroy.

use std::time::Duration;

use pretty_assertions::assert_eq;

use super::{Options, Sandbox, Target, count_host_processes, eventually, without_waiting_for};
use crate::error::{ErrorKind, RuntimeError};
use crate::types::{ExecResult, LimitKind, ResourceLimits, RuntimeEvent, SessionSpec};

async fn open(fx: &Sandbox, shell: &str) -> String {
    fx.rt
        .session_create(
            &fx.id,
            SessionSpec {
                shell: shell.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

async fn run(fx: &Sandbox, s: &str, cmd: &str) -> ExecResult {
    fx.rt
        .session_exec(&fx.id, s, cmd, Some(Duration::from_secs(20)))
        .await
        .unwrap_or_else(|e| panic!("{cmd:?}: {e:?}"))
}

fn triple(r: &ExecResult) -> (i32, &str, &str) {
    (r.exit_code, r.stdout.as_str(), r.stderr.as_str())
}

/// Directory, variables, functions, activation scripts and background jobs persist between
/// calls (sh and bash); bad shells are refused; the session's workdir and env apply.
pub async fn state_persists_between_calls(t: &Target) {
    let fx = t.start().await;
    for shell in ["", "/bin/bash"] {
        let s = open(&fx, shell).await;
        assert!(s.starts_with("sess_") && s.len() == 21, "{s}");
        let r = run(&fx, &s, "cd /tmp; export A=1; B=2; f() { echo \"fn $1\"; }").await;
        assert_eq!(triple(&r), (0, "", ""));
        let r = run(&fx, &s, "pwd; echo \"$A $B\"; f x").await;
        assert_eq!(triple(&r), (0, "/tmp\n1 2\nfn x\n", ""));
        // A virtualenv-style activation script.
        run(&fx, &s, "mkdir -p /tmp/venv/bin && printf 'VIRTUAL_ENV=/tmp/venv\\nexport VIRTUAL_ENV\\nPATH=/tmp/venv/bin:$PATH\\n' > /tmp/venv/bin/activate").await;
        run(&fx, &s, ". /tmp/venv/bin/activate").await;
        let r = run(&fx, &s, "echo $VIRTUAL_ENV; echo $PATH | cut -d: -f1").await;
        assert_eq!(r.stdout, "/tmp/venv\n/tmp/venv/bin\n");
        // Background jobs persist.
        run(&fx, &s, "sleep 100 & echo $! > /tmp/bg").await;
        let r = run(&fx, &s, "kill -0 $(cat /tmp/bg) && echo alive").await;
        assert_eq!(r.stdout, "alive\n");
        fx.rt.session_destroy(&fx.id, &s).await.unwrap();
    }
    let err = fx
        .rt
        .session_create(
            &fx.id,
            SessionSpec {
                shell: "/bin/nonexistent-shell".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err:?}");
    // Workdir and env of the session.
    fx.sh("mkdir -p sub").await;
    let mut env = std::collections::BTreeMap::new();
    env.insert("GREETING".to_owned(), "hello".to_owned());
    let s = fx
        .rt
        .session_create(
            &fx.id,
            SessionSpec {
                shell: String::new(),
                env,
                workdir: "sub".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        run(&fx, &s, "pwd; echo $GREETING").await.stdout,
        "/workspace/sub\nhello\n"
    );
    let s = open(&fx, "/bin/bash").await;
    let r = run(&fx, &s, "echo ${BASH_VERSION:+bash}; shopt -s extglob").await;
    assert_eq!(r.stdout, "bash\n");
    assert_eq!(
        run(&fx, &s, "shopt -q extglob && echo on").await.stdout,
        "on\n"
    );
    fx.destroy().await;
}

/// Each call gets exactly its own output and exit code, whatever it prints (markers, prompts,
/// NULs, no final newline); a syntax error leaves the session usable.
pub async fn output_is_exact_whatever_the_command_prints(t: &Target) {
    let fx = t.start().await;
    for shell in ["", "/bin/bash"] {
        let s = open(&fx, shell).await;
        let r = run(&fx, &s, "echo out; echo err >&2; (exit 7)").await;
        assert_eq!(triple(&r), (7, "out\n", "err\n"));
        let r = run(&fx, &s, "printf 'no newline'").await;
        assert_eq!(triple(&r), (0, "no newline", ""));
        let r = run(
            &fx,
            &s,
            "echo '___END_0123456789abcdef_0___'; echo '$ '; echo",
        )
        .await;
        assert_eq!(r.stdout, "___END_0123456789abcdef_0___\n$ \n\n");
        let r = run(&fx, &s, "printf 'a\\000b\\001\\377c'").await;
        assert_eq!(r.stdout, "a\0b\u{1}\u{fffd}c");
        let r = run(&fx, &s, "cat <<'EOF'\nline 1\n  $HOME `x`\nEOF\necho after").await;
        assert_eq!(r.stdout, "line 1\n  $HOME `x`\nafter\n");
        let r = run(&fx, &s, "false").await;
        assert_eq!(triple(&r), (1, "", ""));
        // A syntax error is reported and the session survives.
        let r = run(&fx, &s, "if then fi").await;
        assert_ne!(r.exit_code, 0);
        assert!(!r.stderr.is_empty());
        assert_eq!(run(&fx, &s, "echo ok").await.stdout, "ok\n");
    }
    fx.destroy().await;
}

/// A timeout interrupts the command (also a builtin loop) but keeps the shell, its state and
/// its background jobs.
pub async fn timeout_interrupts_only_the_command(t: &Target) {
    let fx = t.start().await;
    for shell in ["", "/bin/bash"] {
        let s = open(&fx, shell).await;
        run(&fx, &s, "X=kept; sleep 200 &").await;
        let err = without_waiting_for(
            "sleep 100",
            fx.rt.session_exec(
                &fx.id,
                &s,
                "echo before; sleep 100",
                Some(Duration::from_secs(1)),
            ),
        )
        .await
        .unwrap_err();
        match err {
            RuntimeError::Timeout { stdout, .. } => assert_eq!(stdout, "before\n"),
            other => panic!("{other:?}"),
        }
        let r = run(&fx, &s, "echo $X; ps -e -o args= | grep -c '^sleep 100$'; ps -e -o args= | grep -c '^sleep 200$'").await;
        assert_eq!(r.stdout, "kept\n0\n1\n", "shell {shell:?}");
        // A builtin loop is interrupted too.
        let err = fx
            .rt
            .session_exec(
                &fx.id,
                &s,
                "while :; do :; done",
                Some(Duration::from_millis(500)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, RuntimeError::Timeout { .. }));
        assert_eq!(run(&fx, &s, "echo still").await.stdout, "still\n");
        fx.rt.session_destroy(&fx.id, &s).await.unwrap();
    }
    fx.destroy().await;
}

/// `exit` closes the session (FAILED_PRECONDITION afterwards); destroying it then is fine.
pub async fn exit_closes_the_session(t: &Target) {
    let fx = t.start().await;
    let s = open(&fx, "").await;
    let r = run(&fx, &s, "echo bye; exit 5").await;
    assert_eq!(triple(&r), (5, "bye\n", ""));
    let err = fx
        .rt
        .session_exec(&fx.id, &s, "echo again", None)
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::SessionClosed { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    // Destroying a closed session is fine; afterwards it is unknown.
    fx.rt.session_destroy(&fx.id, &s).await.unwrap();
    assert!(matches!(
        fx.rt.session_exec(&fx.id, &s, "true", None).await,
        Err(RuntimeError::SessionNotFound { .. })
    ));
    fx.destroy().await;
}

/// Concurrent calls on one session run one after the other, each with its own result.
pub async fn concurrent_calls_are_serialised(t: &Target) {
    let fx = t.start().await;
    let s = open(&fx, "").await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (rt, id, s) = (fx.rt.clone(), fx.id.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            let cmd = format!("echo start{i}; sleep 0.1; echo end{i}; echo e{i} >&2; (exit {i})");
            let r = rt.session_exec(&id, &s, &cmd, None).await.unwrap();
            assert_eq!(
                (r.exit_code, r.stdout, r.stderr),
                (i, format!("start{i}\nend{i}\n"), format!("e{i}\n"))
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    fx.destroy().await;
}

/// Destroying a session kills all its processes, even those that left its session.
pub async fn destroy_kills_all_session_processes(t: &Target) {
    let fx = t.start().await;
    let s = open(&fx, "").await;
    run(&fx, &s, "sleep 101 & sleep 102 & setsid sleep 103 &").await;
    assert_eq!(
        fx.sh("sleep 0.1; ps -e -o args= | grep -c '^sleep 10[123]$'")
            .await
            .stdout,
        "3\n"
    );
    fx.rt.session_destroy(&fx.id, &s).await.unwrap();
    let r = fx
        .sh("sleep 0.2; ps -e -o args= | grep -c '^sleep 10[123]$' || true")
        .await;
    assert_eq!(r.stdout, "0\n");
    assert!(matches!(
        fx.rt.session_exec(&fx.id, &s, "true", None).await,
        Err(RuntimeError::SessionNotFound { .. })
    ));
    fx.destroy().await;
}

/// An OOM kill in a session is reported with the session id and the session survives; stopping
/// the sandbox ends its sessions.
pub async fn session_limits_and_stop(t: &Target) {
    let mut fx = t
        .start_with(Options::limited(ResourceLimits {
            memory_bytes: Some(64 << 20),
            ..Default::default()
        }))
        .await;
    let s = open(&fx, "").await;
    let cmd = "python3 -c 'b = bytearray(200 * 1024 * 1024)'";
    let r = run(&fx, &s, cmd).await;
    assert_eq!(r.exit_code, 137, "{r:?}");
    let ev = fx.next_event().await;
    assert_eq!(
        ev,
        RuntimeEvent::ResourceLimitExceeded {
            sandbox_id: fx.id.clone(),
            session_id: Some(s.clone()),
            limit: LimitKind::Memory,
            command: cmd.to_owned(),
        }
    );
    assert_eq!(run(&fx, &s, "echo ok").await.stdout, "ok\n");
    // Stopping the sandbox ends its sessions.
    fx.rt.stop(&fx.id).await.unwrap();
    fx.rt.start(&fx.id).await.unwrap();
    assert!(matches!(
        fx.rt.session_exec(&fx.id, &s, "true", None).await,
        Err(RuntimeError::SessionNotFound { .. })
    ));
    fx.destroy().await;
}

/// bash keeps `!` literal (no history expansion) and runs long multi-line commands.
pub async fn bash_keeps_bangs_literal_and_big_commands_work(t: &Target) {
    let fx = t.start().await;
    let s = open(&fx, "/bin/bash").await;
    let r = run(&fx, &s, "echo 'a!b'; echo \"x!!\"; echo \\!$").await;
    assert_eq!(triple(&r), (0, "a!b\nx!!\n!$\n", ""));
    // A long multi-line command (a script pasted by an agent).
    let script: String = (0..2000).map(|i| format!("echo line{i}\n")).collect();
    let r = run(&fx, &s, &script).await;
    assert_eq!(r.stdout.lines().count(), 2000);
    assert_eq!(r.stdout.lines().last(), Some("line1999"));
    let r = run(&fx, &s, "exit 3").await;
    assert_eq!(r.exit_code, 3);
    fx.destroy().await;
}

/// `exec >/dev/null` in one call does not affect the next call's output.
pub async fn redirecting_the_shell_for_good_does_not_break_the_session(t: &Target) {
    let fx = t.start().await;
    for shell in ["", "/bin/bash"] {
        let s = open(&fx, shell).await;
        let r = run(&fx, &s, "exec >/dev/null 2>&1; echo lost; echo lost >&2").await;
        assert_eq!(triple(&r), (0, "", ""));
        let r = run(
            &fx,
            &s,
            "echo back; echo err >&2; cat; exit_not_a_command 2>/dev/null; echo $?",
        )
        .await;
        assert_eq!(triple(&r), (0, "back\n127\n", "err\n"), "shell {shell:?}");
    }
    fx.destroy().await;
}

/// `exit` with background jobs returns promptly and kills them.
pub async fn exit_with_background_jobs_returns_promptly_and_kills_them(t: &Target) {
    let fx = t.start().await;
    let s = open(&fx, "").await;
    let r = without_waiting_for("sleep 301", run(&fx, &s, "sleep 301 & echo out; exit 2")).await;
    assert_eq!(triple(&r), (2, "out\n", ""));
    eventually("sleep 301 killed", || {
        count_host_processes("sleep 301") == 0
    })
    .await;
    fx.destroy().await;
}

/// A missing or escaping workdir is INVALID_ARGUMENT; an unknown session is not found.
pub async fn session_with_a_missing_workdir_is_invalid(t: &Target) {
    let fx = t.start().await;
    for workdir in ["missing", "../etc"] {
        let err = fx
            .rt
            .session_create(
                &fx.id,
                SessionSpec {
                    workdir: workdir.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{workdir}: {err:?}");
    }
    assert!(matches!(
        fx.rt
            .session_exec(&fx.id, "sess_0000000000000000", "true", None)
            .await,
        Err(RuntimeError::SessionNotFound { .. })
    ));
    fx.destroy().await;
}

/// The attack of finding 2 (issue 13): a process the session started (a separate executable,
/// like any background job) reaches into the shell through `/proc/<shell>` to type its own
/// lines, read the channel or forge results. The shell runs non-dumpable (an execute-only
/// image), so every route is refused, and the calls that follow are exact.
pub async fn processes_of_a_session_cannot_reach_into_its_shell(t: &Target) {
    let fx = t.start().await;
    for shell in ["", "/bin/bash"] {
        let s = open(&fx, shell).await;
        let attack = r#"sh -c '
  printf "touch /tmp/injected\n" > /proc/$PPID/fd/0 && echo typed-into-stdin
  for fd in 1 2 8 9; do printf "\036AFE forged\036" > /proc/$PPID/fd/$fd && echo wrote-fd-$fd; done
  ls /proc/$PPID/fd >/dev/null && echo listed-fds
  head -c1 /proc/$PPID/environ >/dev/null && echo read-environ
  python3 -c "import sys; open(\"/proc/%s/mem\" % sys.argv[1], \"rb\")" $PPID && echo opened-mem
  true' 2>/dev/null"#;
        let r = run(&fx, &s, attack).await;
        assert_eq!(
            (r.exit_code, r.stdout.as_str()),
            (0, ""),
            "shell {shell:?}: {r:?}"
        );
        // A background job that keeps trying, started by one call, active during the next.
        let job = r#"sh -c 'for i in $(seq 200); do printf "touch /tmp/injected\n" > /proc/$PPID/fd/0; done' 2>/dev/null &"#;
        run(&fx, &s, job).await;
        for i in 0..5 {
            let r = run(&fx, &s, &format!("echo call{i}; (exit {i})")).await;
            assert_eq!(
                (r.exit_code, r.stdout.as_str()),
                (i, format!("call{i}\n").as_str())
            );
        }
        let r = run(
            &fx,
            &s,
            "wait; test -e /tmp/injected && echo injected; echo done",
        )
        .await;
        assert_eq!(r.stdout, "done\n", "shell {shell:?}: {r:?}");
        fx.rt.session_destroy(&fx.id, &s).await.unwrap();
    }
    fx.destroy().await;
}

/// `session_exec_stream` delivers output while the command still runs: the command prints,
/// then waits for a file that the test creates only after it has read that first line (a
/// handshake, no clock); then the rest and the exit arrive. A runtime that buffered the
/// whole call would deliver nothing before the command's timeout.
pub async fn session_output_streams_as_it_comes(t: &Target) {
    use crate::types::ExecEvent;
    let fx = t.start().await;
    let s = open(&fx, "").await;
    let mut stream = fx
        .rt
        .session_exec_stream(
            &fx.id,
            &s,
            "echo first; while [ ! -e /tmp/go ]; do sleep 0.01; done; echo second >&2; exit_code=7; (exit $exit_code)",
            Some(Duration::from_secs(20)),
        )
        .await
        .unwrap();
    match stream.next().await {
        Some(Ok(ExecEvent::Stdout(text))) => assert_eq!(text, "first\n"),
        other => panic!("expected the first line while the command waits: {other:?}"),
    }
    let r = fx.sh("touch /tmp/go").await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    let mut rest = Vec::new();
    while let Some(ev) = stream.next().await {
        rest.push(ev.unwrap());
    }
    assert!(
        matches!(rest.as_slice(), [ExecEvent::Stderr(e), ExecEvent::Exit { exit_code: 7, .. }] if e == "second\n"),
        "{rest:?}"
    );
    // The session goes on as before.
    assert_eq!(run(&fx, &s, "echo again").await.stdout, "again\n");
    fx.rt.session_destroy(&fx.id, &s).await.unwrap();
    fx.destroy().await;
}
