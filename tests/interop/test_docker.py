"""The published SDK with runtime=DOCKER: the same behaviour as the bwrap runtime.

Run by crates/cli/tests/suite/interop.rs against a server started with `--runtime docker`;
AGENTFENSE_DOCKER_IMAGE names a local image (built by scripts/docker-setup.sh).
"""

import datetime
import os

import pytest
from agentfense import (
    CommandTimeoutError,
    ResourceLimits,
    RuntimeType,
    Sandbox,
)

IMAGE = os.environ.get("AGENTFENSE_DOCKER_IMAGE")
pytestmark = pytest.mark.skipif(not IMAGE, reason="AGENTFENSE_DOCKER_IMAGE is not set")


def docker_sandbox(project, endpoint, **kw):
    return Sandbox.from_local(
        str(project), preset="agent-safe", endpoint=endpoint, runtime=RuntimeType.DOCKER, image=IMAGE, **kw
    )


def test_docker_permissions_exec_and_publish(project, endpoint, audit):
    with docker_sandbox(project, endpoint) as sb:
        assert sb.runtime.name == "DOCKER" or "DOCKER" in str(sb.runtime).upper()
        ls = sb.run("ls -a /workspace").stdout.split()
        assert "src" in ls and ".env.local" not in ls and "secrets" not in ls
        r = sb.run("cat .env.local")
        assert r.exit_code != 0 and "No such file" in r.stderr
        r = sb.run("echo x >> src/main.py")
        assert r.exit_code != 0
        r = sb.run("id -u; echo report > output/r.txt")
        assert r.stdout == "1000\n", "containers run as a non-root user"
        assert sb.read_file("output/r.txt") == "report\n"
        r = sb.run("echo o; echo e >&2; exit 4")
        assert (r.stdout, r.stderr, r.exit_code) == ("o\n", "e\n", 4)
        assert sb.run("cat /proc/net/dev").stdout.count(":") == 1  # only lo
        assert sb.run("touch /etc/x").exit_code != 0, "read-only root filesystem"
        chunks = b"".join(sb.exec_stream("echo a; echo b >&2"))
        assert b"a\n" in chunks and b"b\n" in chunks
        with pytest.raises(CommandTimeoutError):
            sb.exec("sleep 30", timeout=datetime.timedelta(seconds=1))
        with sb.session() as s:
            s.exec("cd src && export V=7")
            r = s.exec("pwd; echo $V")
            assert r.stdout == "/workspace/src\n7\n"
    audit.wait_for("permission_denied", path="/.env.local")


def test_docker_limits_and_restart(project, endpoint, audit):
    limits = ResourceLimits(memory_bytes=64 * 1024 * 1024, pids_limit=50)
    with docker_sandbox(project, endpoint, resources=limits) as sb:
        r = sb.exec("python3 -c 'b = bytearray(200 * 1024 * 1024)'")
        assert r.exit_code == 137
        audit.wait_for("resource_limit_exceeded", sandbox_id=sb.id, limit="memory")
        sb.exec(
            "for i in $(seq 1 200); do (sleep 5 &) 2>/dev/null; done; true",
            timeout=datetime.timedelta(seconds=20),
        )
        assert sb.run("echo alive").stdout == "alive\n"
        # Stop then Start works (the original failed with a container name conflict).
        sb.stop()
        sb.start()
        assert sb.run("cat output/r.txt 2>/dev/null; echo ok").stdout.endswith("ok\n")


def test_docker_disk_quota_counts_tmp(project, endpoint, audit):
    """Issue 13, finding 5, in a container: the delta and /tmp share the quota."""
    with docker_sandbox(project, endpoint, labels={"agentfense.disk_bytes": "4M"}) as sb:
        assert sb.run("df -B1 --output=size /workspace | tail -n 1").stdout.strip() == "4194304"
        r = sb.run("head -c 6000000 /dev/zero > output/big")
        assert r.exit_code != 0 and "No space left on device" in r.stderr, r
        # (The partial file was published when the command ended; deleting it makes room
        # once that deletion is published, at the end of the command.)
        assert sb.run("rm -f output/big").exit_code == 0
        assert sb.run("head -c 3000000 /dev/zero > output/a").exit_code == 0
        r = sb.run("head -c 3000000 /dev/zero > /tmp/t")
        assert r.exit_code != 0 and "No space left on device" in r.stderr, r
        audit.wait_for("resource_limit_exceeded", sandbox_id=sb.id, limit="disk")
