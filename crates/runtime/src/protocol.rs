//! The control protocol between the host and the init (PID 1 inside the sandbox).
//!
//! Transport: an `AF_UNIX` `SOCK_SEQPACKET` socket pair; the init inherits its end as fd 3.
//! Each message is one JSON document in one packet (message boundaries are kept by the socket),
//! optionally carrying file descriptors (`SCM_RIGHTS`). Command output never crosses this
//! socket: the host creates the pipes and passes their ends, so the data path is a plain pipe.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// The fd number the init finds its control socket on.
pub const CONTROL_FD: RawFd = 3;

/// Largest accepted packet. `/bin/sh -c` cannot take a longer argument anyway
/// (`MAX_ARG_STRLEN` is 128 KiB), and the default `SO_SNDBUF` (~208 KiB) bounds a packet.
pub const MAX_PACKET: usize = 192 * 1024;

/// Most fds attached to one packet.
pub const MAX_FDS: usize = 4;

/// Configuration sent by the host as the first packet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InitConfig {
    /// Uid commands run as.
    pub uid: u32,
    /// Gid commands run as.
    pub gid: u32,
    /// `$HOME` inside the sandbox (created, owned by `uid`).
    pub home: String,
    /// Directories where writes are allowed (Landlock); everything else is read/execute only.
    pub writable: Vec<String>,
    /// Apply the seccomp filter.
    pub seccomp: bool,
    /// Apply Landlock (best effort: skipped with a warning if the kernel lacks it).
    pub landlock: bool,
}

/// Host → init.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// First packet: harden the init and report [`Reply::Ready`].
    Configure(InitConfig),
    /// Run `argv` with fds `[stdin, stdout, stderr]` attached to the packet, plus optionally the
    /// open directory of the command's own cgroup, which the child is created in
    /// (`clone3(CLONE_INTO_CGROUP)`, or joined through its `cgroup.procs` before exec).
    Exec {
        /// Host-chosen id, echoed in the replies.
        id: u64,
        /// Program and arguments (`argv[0]` is an absolute path).
        argv: Vec<String>,
        /// Complete environment, `KEY=VALUE`.
        env: Vec<String>,
        /// Working directory inside the sandbox.
        cwd: String,
        /// The stdin fd is a terminal (a pty slave opened by the host): the child makes it the
        /// controlling terminal of its new session (`TIOCSCTTY`), so job control works.
        /// Absent on the wire when false.
        #[serde(default, skip_serializing_if = "is_false")]
        tty: bool,
    },
    /// Send `signal` to the process group of command (or session shell) `id`.
    Signal {
        /// The command or session.
        id: u64,
        /// Signal number.
        signal: i32,
    },
    /// SIGKILL the process group `pgid` (leftovers of an exited command, e.g. after it hit the
    /// pids limit).
    KillGroup {
        /// The group, from [`Reply::Exited`].
        pgid: i32,
    },
    /// Start a persistent shell (`argv`) reading command lines from a pipe held by the init;
    /// optionally one fd attached: the open directory of the session's own cgroup.
    SessionOpen {
        /// Host-chosen id.
        id: u64,
        /// Shell and arguments.
        argv: Vec<String>,
        /// Complete environment.
        env: Vec<String>,
        /// Starting directory.
        cwd: String,
    },
    /// Run `command` in session `id`; the init answers [`Reply::SessionFifos`].
    SessionExec {
        /// The session.
        id: u64,
        /// Sequence number of this call within the session.
        seq: u64,
        /// The command text (sourced by the shell from a file, never typed into it).
        command: String,
    },
    /// Kill the session's shell and every process of its process group.
    SessionClose {
        /// The session.
        id: u64,
    },
    /// Kill everything and exit.
    Shutdown,
}

/// Init → host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Reply {
    /// Configuration applied.
    Ready {
        /// Landlock status text (`fully_enforced`, `partially_enforced`, `not_enforced`, `disabled`).
        landlock: String,
    },
    /// Command or shell `id` was started.
    Started {
        /// The id.
        id: u64,
    },
    /// Command or shell `id` could not be started.
    SpawnFailed {
        /// The id.
        id: u64,
        /// Step that failed inside the init/child.
        step: String,
        /// errno.
        errno: i32,
    },
    /// Command or shell `id` exited (`128 + signal` if killed by a signal).
    Exited {
        /// The id.
        id: u64,
        /// Exit code.
        code: i32,
        /// Its pid inside the sandbox, which is also its process group (for [`Request::KillGroup`]).
        pid: i32,
    },
    /// The read ends of the session call's `[stdout, stderr, status]` FIFOs are attached.
    SessionFifos {
        /// The session.
        id: u64,
        /// The call.
        seq: u64,
    },
    /// A request about `id` failed in the init.
    Failed {
        /// The id (0 when none applies).
        id: u64,
        /// What went wrong.
        message: String,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Encodes `msg` and sends it with `fds` as one packet.
pub fn send_packet<T: Serialize>(sock: BorrowedFd<'_>, msg: &T, fds: &[RawFd]) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if bytes.len() > MAX_PACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "control message too large",
        ));
    }
    let iov = [IoSlice::new(&bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    let sent = socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)?;
    if sent != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write on a seqpacket socket",
        ));
    }
    Ok(())
}

/// Receives one packet: `Ok(None)` on end of stream. Received fds are close-on-exec.
pub fn recv_packet<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
    flags: MsgFlags,
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    // Peek at the packet's real length first (MSG_TRUNC), so the buffer fits the message
    // instead of zeroing the maximum for every packet.
    let mut probe = [0u8; 1];
    let peeked = {
        let mut iov = [IoSliceMut::new(&mut probe)];
        socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            None,
            flags | MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
        )
        .map_err(io::Error::from)?
        .bytes
    };
    let mut buf = vec![0u8; peeked.clamp(1, MAX_PACKET + 1024)];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            flags | MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in our table for us (SCM_RIGHTS);
                    // nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let truncated =
            msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC);
        (msg.bytes, fds, truncated)
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control message truncated",
        ));
    }
    let msg = serde_json::from_slice(&buf[..len]).map_err(io::Error::other)?;
    Ok(Some((msg, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn packets_round_trip_with_fds() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let msg = Request::Exec {
            id: 7,
            argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            env: vec!["A=1".into()],
            cwd: "/workspace".into(),
            tty: false,
        };
        send_packet(a.as_fd(), &msg, &[w.as_raw_fd()]).unwrap();
        drop(w);
        let (got, fds): (Request, _) = recv_packet(b.as_fd(), MsgFlags::empty()).unwrap().unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 1);
        let mut wf = std::fs::File::from(fds.into_iter().next().unwrap());
        wf.write_all(b"hi").unwrap();
        drop(wf);
        let mut s = String::new();
        std::fs::File::from(r).read_to_string(&mut s).unwrap();
        assert_eq!(s, "hi");
        drop(a);
        assert!(
            recv_packet::<Request>(b.as_fd(), MsgFlags::empty())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn exec_tty_flag_is_optional_on_the_wire() {
        let plain = Request::Exec {
            id: 1,
            argv: vec!["/bin/sh".into()],
            env: vec![],
            cwd: "/workspace".into(),
            tty: false,
        };
        let text = serde_json::to_string(&plain).unwrap();
        assert_eq!(
            text,
            r#"{"op":"exec","id":1,"argv":["/bin/sh"],"env":[],"cwd":"/workspace"}"#
        );
        // A message without the field (an older host) is a plain exec.
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), plain);

        let tty = Request::Exec {
            id: 1,
            argv: vec!["/bin/sh".into()],
            env: vec![],
            cwd: "/workspace".into(),
            tty: true,
        };
        let text = serde_json::to_string(&tty).unwrap();
        assert!(text.ends_with(r#","tty":true}"#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), tty);
    }
}
