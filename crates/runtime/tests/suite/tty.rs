//! Interactive programs on a pty: controlling terminal, window size, exit code, timeout.

use std::io::Read;
use std::os::fd::AsFd;
use std::time::Duration;

use agentfense_runtime::{RuntimeError, TtyRequest};
use nix::pty::{OpenptyResult, Winsize, openpty};

use super::common::*;

fn pty(rows: u16, cols: u16) -> OpenptyResult {
    let ws = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    openpty(Some(&ws), None).unwrap()
}

fn sh(script: &str) -> TtyRequest {
    TtyRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// Everything the program wrote, until the last slave fd is closed (EIO on the master).
fn read_all(master: std::os::fd::OwnedFd) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_program_owns_its_terminal() {
    if skip("tty_program_owns_its_terminal") {
        return;
    }
    let fx = start().await;
    let p = pty(33, 101);
    // /dev/tty opens only for a process with a controlling terminal.
    let script = "stty size; : </dev/tty && echo ctty-ok; id -u; exit 3";
    let mut proc = fx
        .rt
        .exec_tty(&fx.id, sh(script), p.slave.as_fd())
        .await
        .unwrap();
    drop(p.slave);
    let reader = read_all(p.master);
    assert_eq!(proc.wait().await.unwrap(), 3);
    assert_eq!(proc.wait().await.unwrap(), 3, "wait is repeatable");
    let out = reader.join().unwrap();
    assert!(out.contains("33 101\r\n"), "{out:?}");
    assert!(out.contains("ctty-ok"), "{out:?}");
    assert!(out.contains("1000\r\n"), "{out:?}");
    // A live handle keeps the environment referenced; destroy then defers the cgroup removal
    // to a background task that would die with this test's runtime.
    drop(proc);
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_program_timeout_and_bad_requests() {
    if skip("tty_program_timeout_and_bad_requests") {
        return;
    }
    let fx = start().await;
    let p = pty(24, 80);
    let mut req = sh("sleep 100 & sleep 100");
    req.timeout = Some(Duration::from_millis(300));
    let mut proc = fx.rt.exec_tty(&fx.id, req, p.slave.as_fd()).await.unwrap();
    drop(p.slave);
    let reader = read_all(p.master);
    assert!(matches!(
        proc.wait().await,
        Err(RuntimeError::Timeout { .. })
    ));
    drop(proc);
    // Everything is gone: the master sees the last slave close.
    let _ = reader.join().unwrap();
    let left = fx.sh("ps -e -o comm= | grep -c sleep || true").await;
    assert_eq!(left.stdout.trim(), "0", "{left:?}");

    // A missing program is reported by wait; a non-terminal fd and a relative path up front.
    let p = pty(24, 80);
    let mut proc = fx
        .rt
        .exec_tty(
            &fx.id,
            TtyRequest {
                argv: vec!["/nonexistent".into()],
                ..Default::default()
            },
            p.slave.as_fd(),
        )
        .await
        .unwrap();
    assert!(matches!(
        proc.wait().await,
        Err(RuntimeError::CommandSetup { .. })
    ));
    drop(proc);
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let err = fx
        .rt
        .exec_tty(&fx.id, sh("true"), devnull.as_fd())
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidArgument { .. }), "{err}");
    let err = fx
        .rt
        .exec_tty(
            &fx.id,
            TtyRequest {
                argv: vec!["sh".into()],
                ..Default::default()
            },
            p.slave.as_fd(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidArgument { .. }), "{err}");
    fx.destroy().await;
}
