//! What a command sees: the workspace, its user, the root filesystem, the network.

use std::os::unix::fs::MetadataExt;

use pretty_assertions::assert_eq;

use super::{DENIED, Options, Refused, Target, assert_all_refused};
use crate::types::NetworkMode;

/// Host and sandbox share the workspace; the sandbox writes as its user (uid 1000 inside, the
/// host uid the runtime gives it outside) and cannot read what that user may not.
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
    let owner = fx.rt.sandbox_owner(&fx.id).unwrap_or((1000, 1000));
    assert_eq!((m.uid(), m.gid()), owner);
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
    // Absent (bwrap's generated /etc has no shadow, /root is not there) or unreadable (an
    // image's): either way not the sandbox user's.
    let gone_or_denied = Refused::Saying(&["No such file", "Permission denied"]);
    let read_only = Refused::Saying(&["Read-only file system", "Permission denied"]);
    assert_all_refused(
        &fx,
        &[
            ("cat /etc/shadow", gone_or_denied),
            ("ls /root", gone_or_denied),
            ("touch /dev/x", read_only),
            ("echo h > /proc/sys/kernel/hostname", read_only),
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
    use Refused::Exit1;
    assert_all_refused(
        &fx,
        &[
            (
                "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m",
                Refused::Saying(&["must be superuser", "Operation not permitted", "permission denied"]),
            ),
            ("unshare -U true", DENIED),
            ("unshare -r true", DENIED),
            ("unshare -n true", DENIED),
            ("dmesg", DENIED),
            // unshare(CLONE_NEWUSER) through the raw syscall.
            ("python3 -c 'import ctypes,sys; sys.exit(0 if ctypes.CDLL(None).syscall(272, 0x10000000)==0 else 1)'", Exit1),
            // io_uring_setup(8, params): refused (a ring would be an fd >= 0).
            ("python3 -c 'import ctypes,sys; p = ctypes.create_string_buffer(120); sys.exit(0 if ctypes.CDLL(None).syscall(425, 8, p) >= 0 else 1)'", Exit1),
            // ptrace(PTRACE_TRACEME) succeeds unless filtered.
            ("python3 -c 'import ctypes,sys; sys.exit(0 if ctypes.CDLL(None).ptrace(0,0,0,0)==0 else 1)'", Exit1),
            // pidfd_getfd and kcmp with bad arguments: EBADF / ESRCH unless filtered (EPERM).
            ("python3 -c 'import ctypes,sys; c = ctypes.CDLL(None, use_errno=True); c.syscall(438, -1, 0, 0); sys.exit(0 if ctypes.get_errno() != 1 else 1)'", Exit1),
            ("python3 -c 'import ctypes,sys; c = ctypes.CDLL(None, use_errno=True); c.syscall(312, 999999999, 999999999, 0, 0, 0); sys.exit(0 if ctypes.get_errno() != 1 else 1)'", Exit1),
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

/// One probe per class of refused system call (issue 13), with arguments that make the kernel
/// answer something else than the filter would if the call got through: the filter answers
/// `EPERM` (1) for the deny-list and `ENOSYS` (38) for calls outside the allow-list.
const SECCOMP_PROBES: &str = r#"
import ctypes, socket
c = ctypes.CDLL(None, use_errno=True)
c.syscall.restype = ctypes.c_long
L, P = ctypes.c_long, ctypes.c_char_p
def probe(name, nr, *args):
    ctypes.set_errno(0)
    r = c.syscall(L(nr), *args)
    print(name, ctypes.get_errno() if r < 0 else "ok")
probe("unshare", 272, L(0x10000000))
probe("setns", 308, L(-1), L(0))
probe("open_tree", 428, L(-100), P(b"/"), L(0))
probe("move_mount", 429, L(-1), P(b""), L(-1), P(b""), L(0))
probe("fsopen", 430, P(b"tmpfs"), L(0))
probe("keyctl", 250, L(0), L(-3), L(0))
probe("add_key", 248, P(b"user"), P(b"x"), P(b"y"), L(1), L(-3))
probe("bpf", 321, L(0), L(0), L(0))
probe("perf_event_open", 298, L(0), L(0), L(-1), L(-1), L(0))
probe("userfaultfd", 323, L(0))
probe("kcmp", 312, L(999999999), L(999999999), L(0), L(0), L(0))
probe("open_by_handle_at", 304, L(-1), L(0), L(0))
probe("ptrace", 101, L(0), L(0), L(0), L(0))
probe("io_uring_setup", 425, L(8), ctypes.create_string_buffer(120))
probe("sysfs", 139, L(3))
probe("personality", 135, L(0x0040000))
try:
    socket.socket(40, socket.SOCK_STREAM)
    print("socket_vsock ok")
except OSError as e:
    print("socket_vsock", e.errno)
"#;

/// The probes the deny-list answers (`EPERM`); the others are outside the allow-list and
/// answer `ENOSYS`, or `EPERM` where Docker's profile loader (20.10) ignores `defaultErrnoRet`.
const SECCOMP_DENIED: &[&str] = &[
    "unshare",
    "setns",
    "open_tree",
    "move_mount",
    "fsopen",
    "keyctl",
    "add_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "kcmp",
    "open_by_handle_at",
    "ptrace",
    "io_uring_setup",
];
const SECCOMP_UNLISTED: &[&str] = &["sysfs", "personality", "socket_vsock"];

/// Seccomp is an allow-list: every refused class answers the filter's errno, calls outside the
/// list answer `ENOSYS`, and the 32-bit entry points (x32 numbers, `int 0x80`) never reach the
/// kernel (x86_64; elsewhere the probes are skipped, loudly).
pub async fn seccomp_is_an_allow_list(t: &Target) {
    let arch = (std::env::consts::ARCH != "x86_64")
        .then(|| "x86_64 (the probes use its syscall numbers)".to_owned());
    if !super::require("seccomp_is_an_allow_list", arch) {
        return;
    }
    let fx = t.start().await;
    let r = fx
        .sh(&format!("python3 - <<'EOF'\n{SECCOMP_PROBES}EOF"))
        .await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    let got: Vec<(&str, &str)> = r.stdout.lines().filter_map(|l| l.split_once(' ')).collect();
    let names: Vec<&str> = got.iter().map(|(n, _)| *n).collect();
    let want: Vec<&str> = SECCOMP_DENIED
        .iter()
        .chain(SECCOMP_UNLISTED)
        .copied()
        .collect();
    assert_eq!(names, want, "{r:?}");
    for (name, errno) in got {
        if SECCOMP_DENIED.contains(&name) {
            assert_eq!(errno, "1", "{name} must answer EPERM: {r:?}");
        } else {
            assert!(
                errno == "38" || errno == "1",
                "{name} must be refused: {r:?}"
            );
        }
    }
    // getpid through the x32 number: the kernel (x32 or not) would answer with a pid or ENOSYS;
    // the filter answers EPERM, or kills the process (libseccomp's bad-arch action).
    let r = fx
        .sh("python3 -c 'import ctypes; c = ctypes.CDLL(None, use_errno=True); r = c.syscall(0x40000000 | 39); print(r, ctypes.get_errno())'")
        .await;
    assert!(
        r.stdout == "-1 1\n" || (r.stdout.is_empty() && r.exit_code == 128 + 31),
        "x32 call: {r:?}"
    );
    // getpid through `int 0x80` (the i386 entry point, CONFIG_IA32_EMULATION): killed.
    let int80 = "python3 -c 'import ctypes, mmap
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3]))
f = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
print(\"reached\", f())'";
    let r = fx.sh(int80).await;
    assert!(!r.stdout.contains("reached"), "int 0x80: {r:?}");
    assert_eq!(r.exit_code, 128 + 31, "int 0x80 must die of SIGSYS: {r:?}");
    fx.destroy().await;
}

/// Everyday tools still work under the filters: python (threads, subprocesses), and, where the
/// sandbox has them, git, make, a C compiler and node (each one present is checked; python3
/// is required). The compiled program runs from the workspace (Docker's `/tmp` is `noexec`).
pub async fn everyday_tools_work(t: &Target) {
    let fx = t.start().await;
    let script = r#"set -e
cd /tmp
python3 -c 'import threading, subprocess, sqlite3, ssl, hashlib
t = threading.Thread(target=print, args=("thread",)); t.start(); t.join()
print(subprocess.run(["echo", "sub"], capture_output=True, text=True).stdout.strip())
sqlite3.connect(":memory:").execute("select 1")'
if command -v git >/dev/null; then
  git init -q r && cd r && git -c user.name=a -c user.email=a@b commit -q --allow-empty -m m && git log --oneline | wc -l && cd ..
else echo 1; fi
if command -v make >/dev/null; then printf 'all:
	@echo made
' > Makefile && make -s; else echo made; fi
if command -v cc >/dev/null; then
  printf '#include <pthread.h>
#include <stdio.h>
static void *f(void *a){return a;}
int main(void){pthread_t t; pthread_create(&t,0,f,0); pthread_join(t,0); puts("cc"); return 0;}
' > a.c
  cc -pthread a.c -o /workspace/a.out && /workspace/a.out
else echo cc; fi
if command -v node >/dev/null; then node -e 'require("child_process").execSync("true"); console.log("node")'; else echo node; fi
"#;
    let r = fx.sh(script).await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str()),
        (0, "thread\nsub\n1\nmade\ncc\nnode\n"),
        "{r:?}"
    );
    fx.destroy().await;
}

/// A command starts with stdin, stdout and stderr only: nothing of the runtime, the server or
/// the sandbox's init is inherited (finding 3 of issue 13: fd 10 and a writable server pipe).
pub async fn commands_inherit_only_stdio(t: &Target) {
    let fx = t.start().await;
    let r = fx.sh("ls /proc/$$/fd; true").await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "0\n1\n2\n"), "{r:?}");
    // Nor the init's own umask (0, for its channel files): new files are not world-writable.
    let r = fx
        .sh("touch /tmp/u && mkdir /tmp/d && stat -c '%A' /tmp/u /tmp/d | cut -c9")
        .await;
    assert_eq!(r.stdout, "-\n-\n", "{r:?}");
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
