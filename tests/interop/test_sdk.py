"""The published Python SDK (agentfense==0.2.1) against our server, unchanged."""

import asyncio
import datetime
import json
import socket
import urllib.error
import urllib.request

import grpc
import pytest
from agentfense import (
    AsyncSandbox,
    CommandExecutionError,
    CommandTimeoutError,
    InvalidConfigurationError,
    ResourceLimits,
    Sandbox,
    SandboxClient,
    SandboxError,
)

SECRET_MARKER = "top-secret"


def run(sb, cmd, **kw):
    return sb.run(cmd, **kw)


# ---- presets --------------------------------------------------------------------------------


def test_agent_safe_hides_secrets_and_protects_source(project, endpoint, audit):
    with Sandbox.from_local(str(project), preset="agent-safe", endpoint=endpoint) as sb:
        ls = run(sb, "ls -a /workspace")
        assert ls.exit_code == 0
        names = ls.stdout.split()
        assert "src" in names and "README.md" in names and "output" in names
        for hidden in [".env", ".env.local", "secrets", ".git"]:
            assert hidden not in names

        # Nothing secret is reachable by any tool, at any depth.
        for cmd in [
            "find /workspace",
            "grep -r top-secret /workspace; true",
            "ls -laR /workspace",
            "du -a /workspace",
            "tar c -C /workspace . | strings",
        ]:
            r = run(sb, cmd)
            assert SECRET_MARKER not in r.stdout + r.stderr, cmd
            for name in [".env.local", ".env.prod", "db.txt", "server.key", "y.txt"]:
                assert name not in r.stdout, (cmd, name)

        r = run(sb, "cat .env.local")
        assert r.exit_code != 0 and "No such file" in r.stderr
        r = run(sb, "cat app/secrets/x/y.txt")
        assert r.exit_code != 0 and "No such file" in r.stderr
        # The SDK expands agent-safe in the client, without SSH keys or cloud credentials;
        # the server's floor hides them anyway.
        for floor_hidden in ["deploy/id_rsa", "home/.aws/credentials", "home/.aws"]:
            r = run(sb, f"cat {floor_hidden}; ls -d {floor_hidden}")
            assert r.exit_code != 0 and "No such file" in r.stderr, floor_hidden
        assert run(sb, "ls deploy").stdout == ""

        # src/ is readable but read-only.
        assert run(sb, "python3 src/main.py").stdout == "hello from sandbox\n"
        r = run(sb, "echo hacked > src/main.py")
        assert r.exit_code != 0 and "Permission denied" in r.stderr
        # An append opens (opening costs no round trip) and its write is refused.
        r = run(sb, "echo hacked >> src/main.py")
        assert r.exit_code != 0
        r = run(sb, "bash -c 'echo hacked >> src/main.py'")
        assert r.exit_code != 0 and "Permission denied" in r.stderr
        r = run(sb, "touch src/new.py")
        assert r.exit_code != 0
        assert run(sb, "cat src/main.py").stdout == "print('hello from sandbox')\n"

        # output/ is writable, and the write is visible through the codebase API after the run.
        r = run(sb, "echo report > output/r.txt && cat output/r.txt")
        assert r.exit_code == 0 and r.stdout == "report\n"
        assert sb.read_file("output/r.txt") == "report\n"

        # The network is absent.
        assert run(sb, "cat /proc/net/dev").stdout.count(":") == 1  # only lo

    denied = audit.wait_for("permission_denied", path="/.env.local")
    # The server's mandatory floor decides before the preset's own `**/.env*`.
    assert denied[0]["level"] == "none" and denied[0]["rule"] == "policy.mandatory: (?i)**/.env.*"


def test_read_only_and_view_only(project, endpoint):
    with Sandbox.from_local(str(project), preset="read-only", endpoint=endpoint) as sb:
        assert run(sb, "cat docs/guide.md").stdout == "guide\n"
        r = run(sb, "echo x > docs/new.md")
        assert r.exit_code != 0 and "Permission denied" in r.stderr
        r = run(sb, "rm docs/guide.md")
        assert r.exit_code != 0
    with Sandbox.from_local(str(project), preset="view-only", endpoint=endpoint) as sb:
        r = run(sb, "ls docs")
        assert r.exit_code == 0 and "guide.md" in r.stdout
        r = run(sb, "stat -c %s docs/guide.md")
        assert r.exit_code == 0 and r.stdout.strip() == "6"
        r = run(sb, "cat docs/guide.md")
        assert r.exit_code != 0 and "Permission denied" in r.stderr


def test_full_access_and_development(project, endpoint):
    with Sandbox.from_local(str(project), preset="full-access", endpoint=endpoint) as sb:
        client = SandboxClient(endpoint=endpoint)
        before = client.get_codebase(sb.codebase_id)
        assert run(sb, "echo new > src/new.py && mkdir -p a/b && echo y > a/b/c").exit_code == 0
        assert sb.read_file("src/new.py") == "new\n"
        # The codebase's stats follow what the sandbox published (new.py: 4 bytes, c: 2).
        after = client.get_codebase(sb.codebase_id)
        assert (after.file_count, after.size) == (before.file_count + 2, before.size + 6)
        assert "a/b/c" in sb.list_files("", recursive=True)
        assert run(sb, "rm -r a").exit_code == 0
        after = client.get_codebase(sb.codebase_id)
        assert (after.file_count, after.size) == (before.file_count + 1, before.size + 4)
        client.close()
    with Sandbox.from_local(str(project), preset="development", endpoint=endpoint) as sb:
        assert run(sb, "echo dev >> README.md").exit_code == 0
        r = run(sb, "cat .env.local config/.env.prod")
        assert r.exit_code != 0 and SECRET_MARKER not in r.stdout


def test_custom_rules_and_invalid_rules(project, endpoint):
    rules = [
        {"pattern": "/docs/**", "permission": "write", "priority": 10},
        {"pattern": "**/*.py", "permission": "none", "priority": 20},
    ]
    with Sandbox.from_local(
        str(project), preset="read-only", permissions=rules, endpoint=endpoint
    ) as sb:
        assert run(sb, "echo x > docs/new.md").exit_code == 0
        assert "main.py" not in run(sb, "ls src").stdout
    with pytest.raises(InvalidConfigurationError):
        Sandbox.from_local(
            str(project),
            preset="read-only",
            permissions=[{"pattern": "**.md", "permission": "read"}],
            endpoint=endpoint,
        )


# ---- exec -----------------------------------------------------------------------------------


def test_exec_semantics(project, endpoint):
    with Sandbox.from_local(str(project), preset="agent-safe", endpoint=endpoint) as sb:
        r = run(sb, "echo out; echo err >&2; exit 3")
        assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 3)
        r = sb.exec("cat", stdin="fed via stdin")
        assert r.stdout == "fed via stdin"
        r = sb.exec("echo $GREETING; pwd", env={"GREETING": "hi"}, workdir="src")
        assert r.stdout == "hi\n/workspace/src\n"
        # The server's environment never leaks in.
        env = run(sb, "env").stdout
        assert "AGENTFENSE_GRPC" not in env and "CARGO" not in env
        # Binary output arrives as valid (lossy) UTF-8.
        r = run(sb, "printf 'a\\377b'")
        assert r.stdout.startswith("a") and r.stdout.endswith("b")
        with pytest.raises(CommandTimeoutError):
            sb.exec("sleep 30", timeout=datetime.timedelta(seconds=1))
        with pytest.raises(CommandExecutionError):
            sb.run("exit 42", raise_on_error=True)
        assert run(sb, "echo still alive").stdout == "still alive\n"
        # /tmp persists between commands of one sandbox.
        run(sb, "echo kept > /tmp/x")
        assert run(sb, "cat /tmp/x").stdout == "kept\n"


def test_exec_stream(project, endpoint):
    with Sandbox.from_local(str(project), preset="agent-safe", endpoint=endpoint) as sb:
        chunks = list(sb.exec_stream("echo one; sleep 0.1; echo two >&2; echo three"))
        joined = b"".join(chunks)
        for part in [b"one\n", b"two\n", b"three\n"]:
            assert part in joined
        # A non-zero exit still ends the stream normally.
        assert b"x" in b"".join(sb.exec_stream("echo x; exit 7"))


def test_exec_stream_low_level_types_and_trailer(project, endpoint):
    from agentfense._gen import sandbox_pb2, sandbox_pb2_grpc

    with Sandbox.from_local(str(project), preset="agent-safe", endpoint=endpoint) as sb:
        channel = grpc.insecure_channel(endpoint)
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        call = stub.ExecStream(
            sandbox_pb2.ExecRequest(sandbox_id=sb.id, command="echo o; echo e >&2; exit 5")
        )
        items = [(m.type, m.data) for m in call]
        assert (sandbox_pb2.ExecOutput.OUTPUT_TYPE_STDOUT, b"o\n") in items
        assert (sandbox_pb2.ExecOutput.OUTPUT_TYPE_STDERR, b"e\n") in items
        assert call.code() == grpc.StatusCode.OK
        trailers = dict(call.trailing_metadata())
        assert trailers.get("x-exit-code") == "5"
        channel.close()


# ---- sessions -------------------------------------------------------------------------------


def test_sessions(project, endpoint):
    with Sandbox.from_local(str(project), preset="agent-safe", endpoint=endpoint) as sb:
        with sb.session() as s:
            assert s.exec("cd src && export A=1 && B=2").exit_code == 0
            r = s.exec("pwd; echo $A$B")
            assert r.stdout == "/workspace/src\n12\n"
            r = s.exec("echo o; echo e >&2; false")
            assert (r.stdout, r.stderr, r.exit_code) == ("o\n", "e\n", 1)
            r = s.exec("printf 'no newline'")
            assert r.stdout == "no newline"
            r = s.exec("echo '___END_fake___'; echo after")
            assert r.stdout == "___END_fake___\nafter\n"
            with pytest.raises(CommandTimeoutError):
                s.exec("sleep 30", timeout=datetime.timedelta(seconds=1))
            assert s.exec("echo survived").stdout == "survived\n"
        with sb.session(shell="/bin/bash", env={"INIT_VAR": "v"}) as s:
            assert s.exec("echo $INIT_VAR").stdout == "v\n"
            assert s.exec("f() { echo fn$1; }").exit_code == 0
            assert s.exec("f 7").stdout == "fn7\n"


# ---- files ----------------------------------------------------------------------------------


def test_files_api_and_sandboxignore(project, endpoint):
    with Sandbox.from_local(str(project), preset="full-access", endpoint=endpoint) as sb:
        files = sb.list_files("", recursive=True)
        assert "src/main.py" in files
        assert "ignored_dir/data.txt" not in files and "debug.log" not in files
        assert ".env" not in files  # the SDK never uploads .env
        sb.write_file("notes/todo.txt", "write me\n")
        assert run(sb, "cat notes/todo.txt").stdout == "write me\n"
        assert sb.read_file_bytes("notes/todo.txt") == b"write me\n"
        assert sorted(sb.list_files("notes")) == ["notes/todo.txt"]
        # An upload over a file the running sandbox has already read shows at once.
        assert run(sb, "cat src/main.py").stdout == "print('hello from sandbox')\n"
        sb.write_file("src/main.py", "print('changed')\n")
        assert run(sb, "cat src/main.py").stdout == "print('changed')\n"


# ---- errors and low-level client ------------------------------------------------------------


def test_low_level_lifecycle_and_error_codes(endpoint):
    c = SandboxClient(endpoint=endpoint)
    cb = c.create_codebase(name="lowlevel", owner_id="interop-user")
    c.upload_file(cb.id, "hello.txt", b"hello world!")
    sb = c.create_sandbox(cb.id, permissions=[{"pattern": "**/*", "permission": "read"}])
    assert "PENDING" in str(sb.status).upper()
    with pytest.raises(SandboxError) as e:
        c.exec(sb.id, "true")
    assert e.value.grpc_code == grpc.StatusCode.FAILED_PRECONDITION.value
    c.start_sandbox(sb.id)
    assert c.exec(sb.id, "cat hello.txt").stdout == "hello world!"
    c.stop_sandbox(sb.id)
    c.start_sandbox(sb.id)  # Start after Stop works
    assert c.exec(sb.id, "echo again").stdout == "again\n"
    with pytest.raises(SandboxError) as e:
        c.get_sandbox("sb_0000000000000000")
    assert e.value.grpc_code == grpc.StatusCode.NOT_FOUND.value
    with pytest.raises(SandboxError):
        c.delete_codebase(cb.id)  # still used by a sandbox
    c.destroy_sandbox(sb.id)
    c.delete_codebase(cb.id)
    c.close()


def test_async_api(project, endpoint):
    async def main():
        async with await AsyncSandbox.from_local(
            str(project), preset="agent-safe", endpoint=endpoint
        ) as sb:
            r = await sb.run("python3 src/main.py")
            assert r.stdout == "hello from sandbox\n"
            async with await sb.session() as s:
                await s.exec("cd docs")
                assert (await s.exec("pwd")).stdout == "/workspace/docs\n"

    asyncio.run(main())


# ---- limits and isolation ---------------------------------------------------------------------


def test_network_is_absent(project, endpoint, host_port):
    with Sandbox.from_local(str(project), preset="agent-safe", endpoint=endpoint) as sb:
        code = (
            "import socket,sys\n"
            "s=socket.socket()\n"
            "s.settimeout(2)\n"
            f"sys.exit(0 if s.connect_ex(('127.0.0.1', {host_port})) == 0 else 1)\n"
        )
        r = sb.exec("python3 -", stdin=code)
        assert r.exit_code == 1, "a host loopback port must not be reachable"


def test_memory_and_fork_bomb_are_contained(project, endpoint, audit):
    limits = ResourceLimits(memory_bytes=64 * 1024 * 1024, pids_limit=50)
    with Sandbox.from_local(
        str(project), preset="agent-safe", endpoint=endpoint, resources=limits
    ) as sb:
        r = sb.exec("python3 -c 'b = bytearray(200 * 1024 * 1024); print(len(b))'")
        assert r.exit_code == 137
        audit.wait_for("resource_limit_exceeded", sandbox_id=sb.id, limit="memory")
        r = sb.exec(
            "for i in $(seq 1 200); do (sleep 5 &) 2>/dev/null; done; echo done",
            timeout=datetime.timedelta(seconds=20),
        )
        assert run(sb, "echo alive").stdout == "alive\n"
        audit.wait_for("resource_limit_exceeded", sandbox_id=sb.id, limit="pids")


# ---- REST -----------------------------------------------------------------------------------


def _http(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_rest_flow(http_base, endpoint):
    status, cb = _http("POST", f"{http_base}/v1/codebases", {"name": "rest", "owner_id": "rest-user"})
    assert status == 200 and cb["id"].startswith("cb_") and cb["size"] == "0"
    c = SandboxClient(endpoint=endpoint)
    c.upload_file(cb["id"], "a.txt", b"from rest\n")
    status, sb = _http(
        "POST",
        f"{http_base}/v1/sandboxes",
        {"codebaseId": cb["id"], "permissions": [{"pattern": "**/*", "permission": "PERMISSION_READ"}]},
    )
    assert status == 200 and sb["status"] == "SANDBOX_STATUS_PENDING"
    status, sb = _http("POST", f"{http_base}/v1/sandboxes/{sb['id']}/start")
    assert status == 200 and sb["status"] == "SANDBOX_STATUS_RUNNING"
    status, res = _http("POST", f"{http_base}/v1/sandboxes/{sb['id']}/exec", {"command": "cat a.txt; exit 4"})
    assert status == 200 and res["stdout"] == "from rest\n" and res["exitCode"] == 4
    status, err = _http("POST", f"{http_base}/v1/sandboxes/{sb['id']}/exec", {"command": "sleep 5", "timeout": "0.5s"})
    assert status == 504 and err["code"] == 4
    status, err = _http("GET", f"{http_base}/v1/sandboxes/sb_0000000000000000")
    assert status == 404 and err["code"] == 5 and "not found" in err["message"]
    status, _ = _http("DELETE", f"{http_base}/v1/sandboxes/{sb['id']}")
    assert status == 200
    status, _ = _http("DELETE", f"{http_base}/v1/codebases/{cb['id']}")
    assert status == 200
    c.close()


# ---- expiry and publishing between sandboxes ---------------------------------------------------


def test_expired_sandboxes_are_reaped(endpoint, audit):
    c = SandboxClient(endpoint=endpoint)
    cb = c.create_codebase(name="expiry", owner_id="interop-user")
    sb = c.create_sandbox(
        cb.id,
        permissions=[{"pattern": "**/*", "permission": "read"}],
        expires_in=datetime.timedelta(seconds=1),
    )
    c.start_sandbox(sb.id)
    audit.wait_for("sandbox_expired", timeout=10, sandbox_id=sb.id)
    with pytest.raises(SandboxError):
        c.get_sandbox(sb.id)
    c.delete_codebase(cb.id)
    c.close()


def test_manual_publish_and_conflicts(endpoint, http_base, audit):
    c = SandboxClient(endpoint=endpoint)
    cb = c.create_codebase(name="publish", owner_id="interop-user")
    c.upload_file(cb.id, "shared.txt", b"original\n")
    rules = [{"pattern": "**/*", "permission": "write"}]
    private = c.create_sandbox(cb.id, permissions=rules, labels={"agentfense.publish": "manual"})
    auto = c.create_sandbox(cb.id, permissions=rules)
    c.start_sandbox(private.id)
    c.start_sandbox(auto.id)
    # The private sandbox's write stays private...
    assert c.exec(private.id, "echo private > shared.txt").exit_code == 0
    assert c.download_file(cb.id, "shared.txt") == b"original\n"
    # ...while the other one publishes after its command.
    assert c.exec(auto.id, "echo auto > shared.txt").exit_code == 0
    assert c.download_file(cb.id, "shared.txt") == b"auto\n"
    # Publishing the private one now overwrites a file that changed since it took it over:
    # the later publish wins and the conflict is audited.
    req = urllib.request.Request(f"{http_base}/v1/sandboxes/{private.id}/publish", method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        report = json.loads(resp.read())
    assert "shared.txt" in report["written"]
    assert c.download_file(cb.id, "shared.txt") == b"private\n"
    audit.wait_for("publish_conflict", sandbox_id=private.id)
    c.destroy_sandbox(private.id)
    c.destroy_sandbox(auto.id)
    c.delete_codebase(cb.id)
    c.close()


def test_io_mode_label(endpoint):
    c = SandboxClient(endpoint=endpoint)
    cb = c.create_codebase(name="io-mode", owner_id="interop-user")
    c.upload_file(cb.id, "data.txt", b"served by passthrough\n")
    rules = [{"pattern": "**/*", "permission": "read"}]
    # An unknown mode is INVALID_ARGUMENT at create, naming the label and the allowed values.
    with pytest.raises(InvalidConfigurationError) as e:
        c.create_sandbox(cb.id, permissions=rules, labels={"agentfense.io": "fast"})
    assert "agentfense.io" in str(e.value) and "passthrough" in str(e.value)
    sb = c.create_sandbox(cb.id, permissions=rules, labels={"agentfense.io": "passthrough"})
    c.start_sandbox(sb.id)
    assert c.exec(sb.id, "cat data.txt").stdout == "served by passthrough\n"
    assert c.exec(sb.id, "echo x > data.txt").exit_code != 0  # the rules still apply
    c.destroy_sandbox(sb.id)
    c.delete_codebase(cb.id)
    c.close()


def test_resources_above_the_server_ceiling_are_refused(project, endpoint):
    """Issue 13, finding 6: a client asking for more than runtime.max_resources got it."""
    from agentfense import InvalidConfigurationError

    c = SandboxClient(endpoint=endpoint)
    cb = c.create_codebase(name="ceiling", owner_id="ceiling-user")
    rules = [{"pattern": "**/*", "permission": "read"}]
    for limits, field in [
        (ResourceLimits(memory_bytes=8 * 1024**3 + 1), "memory_bytes"),
        (ResourceLimits(pids_limit=1_000_000), "pids_limit"),
    ]:
        # INVALID_ARGUMENT, as the SDK maps it.
        with pytest.raises(InvalidConfigurationError) as err:
            c.create_sandbox(cb.id, permissions=rules, resources=limits)
        assert f"runtime.max_resources.{field}" in str(err.value), err.value
    assert c.list_sandboxes(codebase_id=cb.id) == []
    # Within the ceiling it works, and the limit holds.
    sb = c.create_sandbox(
        cb.id, permissions=rules, resources=ResourceLimits(memory_bytes=8 * 1024**3)
    )
    c.destroy_sandbox(sb.id)
    c.delete_codebase(cb.id)
    c.close()


HOLD_FILES = r"""
import os, signal, sys
k = sys.argv[1]
held = []
try:
    for i in range(15000):
        # Open, then unlink: the filesystem must keep the host file for the open descriptor.
        # (Files merely created and kept open cost the server no descriptor at all.)
        path = f"/workspace/output/h{k}_{i}"
        open(path, "w").close()
        f = open(path)
        os.unlink(path)
        held.append(f)
except OSError as e:
    err = e.errno
else:
    err = 0
with open(f"/tmp/ready{k}", "w") as f:
    f.write(f"{len(held)} {err}\n")
signal.pause()
"""


def test_open_files_of_one_sandbox_do_not_starve_others(project, endpoint, audit):
    """Issue 13, finding 4: a sandbox holding ~20,000 open files made the server hit EMFILE,
    so other sandboxes' execs failed. Four processes try to make the server hold 60,000 host
    files between them (open, then unlink each)."""
    with Sandbox.from_local(str(project), preset="agent-safe", endpoint=endpoint) as hog, \
            Sandbox.from_local(str(project), preset="agent-safe", endpoint=endpoint) as other:
        hog.exec("mkdir -p /workspace/output && cat > /tmp/hold.py", stdin=HOLD_FILES)
        r = hog.exec(
            "for k in 1 2 3 4; do python3 /tmp/hold.py $k & done; "
            "until [ -e /tmp/ready1 ] && [ -e /tmp/ready2 ] && [ -e /tmp/ready3 ] "
            "&& [ -e /tmp/ready4 ]; do sleep 0.05; done; cat /tmp/ready1 /tmp/ready2 /tmp/ready3 /tmp/ready4",
            timeout=datetime.timedelta(seconds=120),
        )
        assert r.exit_code == 0, r
        counts = [line.split() for line in r.stdout.splitlines()]
        held = sum(int(c[0]) for c in counts)
        # The per-sandbox cap (runtime.open_files_per_sandbox, 8192 by default), then EMFILE.
        assert held <= 8192, r.stdout
        assert any(int(c[1]) == 24 for c in counts), r.stdout
        # Everything else still works: another sandbox, a new sandbox, the API.
        assert run(other, "echo ok").stdout == "ok\n"
        assert other.exec("cat README.md").exit_code == 0
        with Sandbox.from_local(str(project), preset="agent-safe", endpoint=endpoint) as third:
            assert run(third, "echo fine").stdout == "fine\n"
        audit.wait_for("resource_limit_exceeded", sandbox_id=hog.id, limit="open_files")
        # The hog itself can work again once its files are closed.
        hog.exec("pkill -f hold.py; true")


def test_disk_quota_holds_for_the_delta_publishes_and_tmp(endpoint, audit):
    """Issue 13, finding 5: a write rule let a sandbox fill the host's disk through its delta
    (in the automatic publish mode, a command at a time into the codebase), and /tmp was a
    fixed 512 MiB. With agentfense.disk_bytes=4M the agent hits ENOSPC, sees the quota in df,
    and gets room back by deleting."""
    from agentfense import InvalidConfigurationError

    c = SandboxClient(endpoint=endpoint)
    cb = c.create_codebase(name="disk", owner_id="disk-user")
    c.upload_file(cb.id, "README.md", b"# disk\n")
    rules = [{"pattern": "**/*", "permission": "write"}]
    for bad, why in [("1T", "runtime.max_resources.disk_bytes"), ("lots", "agentfense.disk_bytes"),
                     ("0", "agentfense.disk_bytes")]:
        with pytest.raises(InvalidConfigurationError) as err:
            c.create_sandbox(cb.id, permissions=rules, labels={"agentfense.disk_bytes": bad})
        assert why in str(err.value), err.value
    sb = c.create_sandbox(cb.id, permissions=rules, labels={"agentfense.disk_bytes": "4M"})
    c.start_sandbox(sb.id)
    sh = lambda cmd: c.exec(sb.id, cmd, timeout=datetime.timedelta(seconds=60))
    assert sh("df -B1 --output=size /workspace /tmp | tail -n +2").stdout.split() == \
        ["4194304", "4194304"]
    # One command cannot take more than the quota...
    r = sh("head -c 6000000 /dev/zero > big")
    assert r.exit_code != 0 and "No space left on device" in r.stderr, r
    assert sh("rm -f big").exit_code == 0
    # ...nor can commands one after another, though each one's writes are published into the
    # codebase when it ends: what the sandbox published counts.
    assert sh("head -c 3000000 /dev/zero > a").exit_code == 0
    assert len(c.download_file(cb.id, "a")) == 3000000
    r = sh("head -c 3000000 /dev/zero > b")
    assert r.exit_code != 0 and "No space left on device" in r.stderr, r
    # /tmp (and $HOME in it) share the quota.
    r = sh("head -c 3000000 /dev/zero > /tmp/t")
    assert r.exit_code != 0 and "No space left on device" in r.stderr, r
    r = sh("head -c 3000000 /dev/zero > ~/t")
    assert r.exit_code != 0, r
    audit.wait_for("resource_limit_exceeded", sandbox_id=sb.id, limit="disk")
    # Deleting makes room again, also for what was published (once the deletion is: here
    # when the command that deleted ends).
    assert sh("rm -f a b /tmp/t ~/t").exit_code == 0
    assert sh("head -c 3000000 /dev/zero > b && echo ok").stdout == "ok\n"
    c.destroy_sandbox(sb.id)
    c.delete_codebase(cb.id)
    c.close()


def test_per_owner_quota(endpoint):
    from agentfense import ResourceLimitExceededError

    c = SandboxClient(endpoint=endpoint)
    cb = c.create_codebase(name="quota", owner_id="quota-user")
    rules = [{"pattern": "**/*", "permission": "read"}]
    ids = [c.create_sandbox(cb.id, permissions=rules).id for _ in range(10)]  # the default limit
    with pytest.raises(ResourceLimitExceededError):
        c.create_sandbox(cb.id, permissions=rules)
    for sid in ids:
        c.destroy_sandbox(sid)
    c.destroy_sandbox(c.create_sandbox(cb.id, permissions=rules).id)  # room again
    c.delete_codebase(cb.id)
    c.close()


def test_server_floor_hides_secrets_the_sdk_preset_misses(project, endpoint, http_base, audit):
    """Issue 15, finding 2: the published SDK expands preset="agent-safe" in the client to the
    original's list, which has no SSH keys and no cloud credentials, so deploy/id_rsa was
    readable. The server's mandatory floor (policy.mandatory, on by default) ranks above every
    client rule."""
    for rel, text in {
        "deploy/id_rsa": "-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n",
        "deploy/id_rsa.pub": "ssh-ed25519 AAAA public\n",
        "home/.aws/credentials": "[default]\naws_secret_access_key=secret\n",
    }.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    with Sandbox.from_local(str(project), preset="agent-safe", endpoint=endpoint) as sb:
        for secret in ["deploy/id_rsa", "home/.aws/credentials"]:
            r = run(sb, f"cat {secret}")
            assert r.exit_code != 0 and "No such file" in r.stderr, (secret, r)
        listed = run(sb, "ls -a deploy home").stdout.split()
        assert "id_rsa" not in listed and ".aws" not in listed, listed
        # The public half stays readable.
        assert run(sb, "cat deploy/id_rsa.pub").exit_code == 0
        audit.wait_for("permission_denied", sandbox_id=sb.id, rule="policy.mandatory: (?i)**/id_rsa")
        # The floor is shown with the sandbox's rules, as a trailing group above everything.
        c = SandboxClient(endpoint=endpoint)
        rules = c.get_sandbox(sb.id).permissions
        floor = [r for r in rules if r.priority == 2**31 - 1]
        assert any(r.pattern == "(?i)**/id_rsa" for r in floor), rules
        c.close()
    # Unknown ids of any shape are NOT_FOUND, not a bad request.
    for bad in ["sb_nope", "sb_0000000000000000", "x"]:
        try:
            urllib.request.urlopen(f"{http_base}/v1/sandboxes/{bad}", timeout=10)
            raise AssertionError(f"{bad} was found")
        except urllib.error.HTTPError as e:
            assert e.code == 404, (bad, e.code)
