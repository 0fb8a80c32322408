"""`agentfense mcp` and `/mcp`, driven by the official Python MCP SDK (`pip install mcp`).

Run by `crates/cli/tests/suite/mcp.rs`, which prepares what each mode needs:

* MCP_MODES: comma-separated, of `local` (`agentfense mcp --dir`), `remote` (`agentfense mcp
  --sandbox` against a server) and `http` (the server's `/mcp`);
* AGENTFENSE_BIN: the `agentfense` binary;
* local: MCP_PROJECT (a project with `src/main.py`, `.env`, `output/`), MCP_DATA;
* remote/http: AGENTFENSE_GRPC, AGENTFENSE_HTTP, MCP_SANDBOX (started, agent-safe preset,
  same project), MCP_TOKEN (that sandbox's token), MCP_OTHER_SANDBOX (another one), MCP_DATA
  (the server's data directory).

Every sandbox uses the agent-safe preset: `.env` hidden, source read-only, `output/` writable.
"""

import asyncio
import contextlib
import json
import os
import urllib.error
import urllib.request

import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

BIN = os.environ.get("AGENTFENSE_BIN", "agentfense")
MODES = [m for m in os.environ.get("MCP_MODES", "").split(",") if m]

TOOLS = [
    "exec",
    "read_file",
    "write_file",
    "edit_file",
    "list_files",
    "search",
    "changes",
    "diff",
    "checkpoint",
    "restore",
]


def stdio_params(mode, extra=()):
    if mode == "local":
        args = [
            "mcp",
            "--dir",
            os.environ["MCP_PROJECT"],
            "--data-dir",
            os.environ["MCP_DATA"],
            "--preset",
            "agent-safe",
        ]
        env = {}
    else:
        args = ["mcp", "--sandbox", os.environ["MCP_SANDBOX"], "--endpoint", os.environ["AGENTFENSE_GRPC"]]
        env = {"AGENTFENSE_API_KEY": os.environ["MCP_TOKEN"]}
    return StdioServerParameters(command=BIN, args=args + list(extra), env=env)


@contextlib.asynccontextmanager
async def session(mode, extra=()):
    if mode == "http":
        headers = {"Authorization": "Bearer " + os.environ["MCP_TOKEN"]}
        async with httpx2.AsyncClient(headers=headers, timeout=120) as client:
            url = os.environ["AGENTFENSE_HTTP"] + "/mcp"
            async with streamable_http_client(url, http_client=client) as streams:
                async with ClientSession(streams[0], streams[1]) as s:
                    await s.initialize()
                    yield s
    else:
        async with stdio_client(stdio_params(mode, extra)) as (r, w):
            async with ClientSession(r, w) as s:
                await s.initialize()
                yield s


def run(coro):
    return asyncio.run(coro)


def text(result):
    return "".join(c.text for c in result.content if getattr(c, "text", None) is not None)


async def ok(s, name, args):
    r = await s.call_tool(name, args)
    assert not r.is_error, f"{name} {args}: {text(r)}"
    return text(r)


async def fails(s, name, args):
    r = await s.call_tool(name, args)
    assert r.is_error, f"{name} {args} should fail: {text(r)}"
    return text(r)


def root_of(mode):
    return os.environ["MCP_PROJECT"] if mode == "local" else "/workspace"


@pytest.mark.parametrize("mode", MODES)
def test_tools_are_listed_with_hints(mode):
    async def go():
        async with session(mode) as s:
            tools = {t.name: t for t in (await s.list_tools()).tools}
            assert sorted(tools) == sorted(TOOLS)
            for name in ["read_file", "list_files", "search", "changes", "diff"]:
                assert tools[name].annotations.read_only_hint is True, name
            for name in ["write_file", "edit_file", "exec", "restore"]:
                assert tools[name].annotations.destructive_hint is True, name
            assert tools["read_file"].input_schema["required"] == ["path"]
            # Nothing that makes sandboxes, changes rules or widens the network.
            for name in tools:
                assert not any(w in name for w in ["create", "policy", "rule", "egress", "network", "apply"])

    run(go())


@pytest.mark.parametrize("mode", MODES)
def test_exec_and_files(mode):
    async def go():
        async with session(mode) as s:
            r = await s.call_tool("exec", {"command": "pwd; echo err >&2; exit 3"})
            assert not r.is_error
            assert r.structured_content["exit_code"] == 3
            assert r.structured_content["stdout"].strip() == root_of(mode)
            assert r.structured_content["stderr"] == "err\n"
            assert await ok(s, "read_file", {"path": "src/main.py"}) == 'print("hello")\n'
            assert await ok(s, "read_file", {"path": root_of(mode) + "/src/main.py", "start_line": 1, "end_line": 1, "line_numbers": True}) == '1\tprint("hello")\n'
            # Hidden: does not exist, however it is asked for, and no rule is named.
            for name, args in [
                ("read_file", {"path": ".env"}),
                ("read_file", {"path": root_of(mode) + "/.env"}),
                ("edit_file", {"path": ".env", "old_string": "S", "new_string": "T"}),
            ]:
                assert await fails(s, name, args) == "not found: " + args["path"]
            listing = await ok(s, "list_files", {})
            assert "src/main.py" in listing.splitlines() and ".env" not in listing
            assert await ok(s, "search", {"pattern": "SECRET"}) == "no matches"
            assert "src/main.py:1:" in await ok(s, "search", {"pattern": "hel+o", "glob": "*.py"})
            # Read-only: refused, naming the rule that decided.
            msg = await fails(s, "write_file", {"path": "src/main.py", "content": "x"})
            assert msg.startswith("permission denied: cannot write src/main.py") and "gives it `read`" in msg and "rule #" in msg, msg
            msg = await fails(s, "edit_file", {"path": "src/main.py", "old_string": "hello", "new_string": "bye"})
            assert "gives it `read`" in msg, msg
            assert await ok(s, "read_file", {"path": "src/main.py"}) == 'print("hello")\n'
            # Writable.
            assert (await ok(s, "write_file", {"path": f"output/{mode}/notes.txt", "content": "a\nb\na\n"})).startswith("created")
            msg = await fails(s, "edit_file", {"path": f"output/{mode}/notes.txt", "old_string": "a", "new_string": "c"})
            assert "occurs 2 times" in msg, msg
            assert "not found" in await fails(s, "edit_file", {"path": f"output/{mode}/notes.txt", "old_string": "zzz", "new_string": "c"})
            await ok(s, "edit_file", {"path": f"output/{mode}/notes.txt", "old_string": "b", "new_string": "B"})
            assert await ok(s, "read_file", {"path": f"output/{mode}/notes.txt"}) == "a\nB\na\n"
            r = await s.call_tool("exec", {"command": f"cat output/{mode}/notes.txt"})
            assert r.structured_content["stdout"] == "a\nB\na\n"

    run(go())


@pytest.mark.parametrize("mode", MODES)
def test_bad_calls(mode):
    async def go():
        async with session(mode) as s:
            with pytest.raises(MCPError) as e:
                await s.call_tool("no_such_tool", {})
            assert "no_such_tool" in str(e.value)
            msg = await fails(s, "read_file", {"path": "src/main.py", "bogus": 1})
            assert "invalid arguments for read_file" in msg and "bogus" in msg, msg
            msg = await fails(s, "read_file", {})
            assert "missing field `path`" in msg, msg
            msg = await fails(s, "exec", {"command": "true", "timeout": "soon"})
            assert "invalid arguments for exec" in msg, msg
            msg = await fails(s, "search", {"pattern": "("})
            assert "search failed" in msg, msg

    run(go())


@pytest.mark.parametrize("mode", MODES)
def test_policy_resource(mode):
    async def go():
        async with session(mode) as s:
            uris = [str(r.uri) for r in (await s.list_resources()).resources]
            assert uris == ["agentfense://policy"]
            res = await s.read_resource("agentfense://policy")
            policy = json.loads(res.contents[0].text)
            assert policy["default"] == "none"
            assert root_of(mode) in policy["project"]
            patterns = {r["pattern"]: r["permission"] for r in policy["rules"]}
            assert patterns.get("(?i)**/.env") == "none", patterns
            assert policy["network"]["mode"] == "none"
            with pytest.raises(MCPError):
                await s.read_resource("agentfense://nothing")

    run(go())


@pytest.mark.parametrize("mode", MODES)
def test_review_tools(mode):
    async def go():
        async with session(mode) as s:
            await ok(s, "write_file", {"path": f"output/{mode}/review.txt", "content": "one\n"})
            changes = json.loads(await ok(s, "changes", {}))
            assert f"output/{mode}/review.txt" in [c["path"] for c in changes["changes"]]
            assert all(".env" not in c["path"] for c in changes["changes"])
            diff = await ok(s, "diff", {"paths": [f"output/{mode}/**"]})
            assert f"+++ b/output/{mode}/review.txt" in diff and "+one" in diff
            cp = json.loads(await ok(s, "checkpoint", {"label": "before two"}))
            assert cp["id"].startswith("cp-")
            await ok(s, "write_file", {"path": f"output/{mode}/review.txt", "content": "two\n"})
            dry = json.loads(await ok(s, "restore", {"checkpoint": cp["id"], "dry_run": True}))
            assert dry["restored"] is False
            assert await ok(s, "read_file", {"path": f"output/{mode}/review.txt"}) == "two\n"
            done = json.loads(await ok(s, "restore", {"checkpoint": cp["id"]}))
            assert done["restored"] is True
            assert await ok(s, "read_file", {"path": f"output/{mode}/review.txt"}) == "one\n"
            assert "not found" in (await fails(s, "restore", {"checkpoint": "cp-999"})).lower()

    run(go())


@pytest.mark.parametrize("mode", [m for m in MODES if m != "http"])
def test_tools_flag_limits_the_list(mode):
    async def go():
        async with session(mode, ["--tools", "read_file,list_files"]) as s:
            assert sorted(t.name for t in (await s.list_tools()).tools) == ["list_files", "read_file"]
            with pytest.raises(MCPError):
                await s.call_tool("exec", {"command": "true"})

    run(go())


def mounts():
    """This test's mounts: those under its data directory (other tests run meanwhile)."""
    data = os.path.realpath(os.environ["MCP_DATA"]) + "/"
    with open("/proc/self/mountinfo") as f:
        return sorted(p for p in (line.split()[4] for line in f) if p.startswith(data))


@pytest.mark.parametrize("mode", MODES)
def test_no_leak_over_200_calls(mode):
    """200 tool calls in one session: the sandbox's processes and the host's mounts stay
    as they were (and, for a local sandbox, the mounts go with the session)."""
    before_session = mounts()

    async def go():
        async with session(mode) as s:
            # Counted by the shell alone: a pipeline's own processes would race its count.
            count = "set -- /proc/[0-9]*; echo $#"
            start = (await s.call_tool("exec", {"command": count})).structured_content["stdout"]
            during = mounts()
            for i in range(50):
                await ok(s, "write_file", {"path": f"output/{mode}/leak.txt", "content": f"{i}\n"})
                await ok(s, "read_file", {"path": f"output/{mode}/leak.txt"})
                await ok(s, "search", {"pattern": "hello", "path": "src"})
                await ok(s, "exec", {"command": "true"})
            end = (await s.call_tool("exec", {"command": count})).structured_content["stdout"]
            assert start == end, f"processes in the sandbox: {start} before, {end} after"
            assert mounts() == during

    run(go())
    if mode == "local":
        assert mounts() == before_session


def http_status(method, path, headers, body=None):
    req = urllib.request.Request(os.environ["AGENTFENSE_HTTP"] + path, method=method, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


INIT = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "probe", "version": "1"}},
    }
).encode()


@pytest.mark.skipif("http" not in MODES, reason="the server's /mcp only")
def test_http_endpoint_guards():
    base = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }
    auth = {"Authorization": "Bearer " + os.environ["MCP_TOKEN"]}
    code, _ = http_status("POST", "/mcp", {**base, **auth}, INIT)
    assert code == 200
    # No credentials.
    code, body = http_status("POST", "/mcp", base, INIT)
    assert code == 401, body
    # A web page's request (DNS rebinding or CSRF).
    code, body = http_status("POST", "/mcp", {**base, **auth, "Origin": "http://evil.example"}, INIT)
    assert code == 403, body
    code, body = http_status("POST", "/mcp", {**base, **auth, "Host": "evil.example"}, INIT)
    assert code == 421, body
    # A form post (no preflight) is refused.
    code, body = http_status("POST", "/mcp", {**auth, "Content-Type": "text/plain"}, INIT)
    assert code == 415, body
    # The token is bound to its sandbox.
    other = os.environ["MCP_OTHER_SANDBOX"]
    code, body = http_status("POST", "/mcp?sandbox=" + other, {**base, **auth}, INIT)
    assert code == 400 and "bound to" in body, body
