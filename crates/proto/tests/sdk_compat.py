#!/usr/bin/env python3
"""Wire-compatibility checks between our .proto files and the published SDK agentfense==0.2.1.

Driven by crates/proto/tests/suite/sdk_compat.rs; each subcommand exits 0 on success and
non-zero with a readable report otherwise.

  probe                 exit 0 if the SDK's generated modules import, else print why (exit 3)
  descriptors FDS       compare our encoded FileDescriptorSet (file FDS) with the descriptors
                        embedded in the SDK's *_pb2 modules
  encode DIR            let the SDK encode messages into DIR/*.bin for Rust to decode
  decode DIR            parse DIR/*.bin (encoded by Rust) with the SDK's classes and check them

The values in `encode` and `decode` mirror the ones in sdk_compat.rs; change both together.
"""

import difflib
import os
import sys
from datetime import timedelta

EXIT_MISSING = 3
SDK_VERSION = "0.2.1"
FILES = ("common.proto", "codebase.proto", "sandbox.proto")


def import_sdk():
    # Registers the google.api.http extension so MethodOptions parse it as a known field.
    from google.api import annotations_pb2  # noqa: F401
    from agentfense._gen import codebase_pb2, common_pb2, sandbox_pb2

    return {"common.proto": common_pb2, "codebase.proto": codebase_pb2, "sandbox.proto": sandbox_pb2}


def cmd_probe():
    from importlib import metadata

    try:
        version = metadata.version("agentfense")
        import_sdk()
    except Exception as exc:  # not installed, or the stubs' protobuf runtime version check
        print(f"cannot import the agentfense SDK stubs: {type(exc).__name__}: {exc}")
        return EXIT_MISSING
    if version != SDK_VERSION:
        print(f"agentfense {version} is installed; the compatibility target is {SDK_VERSION}")
        return EXIT_MISSING
    print(f"ok: agentfense {version}")
    return 0


# ------------------------------------------------------------------------------------------
# descriptors


def normalise(fdp):
    """Clears what legitimately differs between protoc and protox, and nothing else.

    * source_code_info: protoc strips it from generated code; we build without it.
    * json_name: protoc leaves it out of embedded descriptors, protox always fills it in. It is
      derived from the field name (which is compared), so it carries no extra information.
    """
    fdp.ClearField("source_code_info")

    def clear(fields):
        for f in fields:
            f.ClearField("json_name")

    def message(m):
        clear(m.field)
        clear(m.extension)
        for nested in m.nested_type:
            message(nested)

    clear(fdp.extension)
    for m in fdp.message_type:
        message(m)
    return fdp


def render(fdp):
    from google.protobuf import text_format

    return text_format.MessageToString(fdp, print_unknown_fields=True)


def cmd_descriptors(path):
    from google.protobuf import descriptor_pb2

    modules = import_sdk()
    with open(path, "rb") as f:
        ours = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    ours_by_name = {fd.name: fd for fd in ours.file}

    failures = []
    # With googleapis-common-protos' annotations_pb2 imported, the http rules parse as a known
    # extension and a mismatch shows up field by field instead of as opaque bytes.
    sdk_codebase = descriptor_pb2.FileDescriptorProto.FromString(modules["codebase.proto"].DESCRIPTOR.serialized_pb)
    if "[google.api.http]" not in render(sdk_codebase):
        failures.append("google.api.http is not a registered extension: is googleapis-common-protos installed?")
    for name in FILES:
        sdk = normalise(descriptor_pb2.FileDescriptorProto.FromString(modules[name].DESCRIPTOR.serialized_pb))
        if name not in ours_by_name:
            failures.append(f"{name}: missing from our FileDescriptorSet (have {sorted(ours_by_name)})")
            continue
        mine = normalise(ours_by_name[name])
        same = mine == sdk and mine.SerializeToString(deterministic=True) == sdk.SerializeToString(
            deterministic=True
        )
        if same:
            print(f"{name}: identical to the SDK's descriptor")
            continue
        diff = difflib.unified_diff(
            render(sdk).splitlines(),
            render(mine).splitlines(),
            fromfile=f"sdk/{name}",
            tofile=f"ours/{name}",
            lineterm="",
        )
        failures.append(f"{name} differs from the SDK's descriptor:\n" + "\n".join(diff))

    if failures:
        print("\n\n".join(failures))
        return 1
    return 0


# ------------------------------------------------------------------------------------------
# SDK -> Rust


def cmd_encode(out_dir):
    modules = import_sdk()
    sandbox_pb2 = modules["sandbox.proto"]
    from agentfense import PermissionRule, ResourceLimits, RuntimeType, SandboxClient
    from agentfense.types import PatternType, Permission

    # Drive the SDK's real request building (SandboxClient.create_sandbox) and capture the
    # request instead of sending it. The channel is lazy: nothing connects.
    captured = []

    def fake_create_sandbox(request, *args, **kwargs):
        captured.append(request)
        return sandbox_pb2.Sandbox(id="sb_fake", codebase_id=request.codebase_id)

    client = SandboxClient(endpoint="127.0.0.1:1")
    try:
        client._sandbox_stub.CreateSandbox = fake_create_sandbox
        client.create_sandbox(
            codebase_id="cb_123",
            permissions=[
                {"pattern": "**/.env*", "permission": "none", "priority": "100"},
                PermissionRule(pattern="/secrets", permission=Permission.VIEW, type=PatternType.DIRECTORY, priority=5),
                {"pattern": "/src/main.py", "permission": "write", "type": "file"},
                {"pattern": "**"},
            ],
            labels={"team": "ml", "env": "dev"},
            expires_in=timedelta(seconds=90, milliseconds=500),
            runtime=RuntimeType.DOCKER,
            image="python:3.11-slim",
            resources=ResourceLimits(memory_bytes=512 * 1024 * 1024, pids_limit=64),
        )
    finally:
        client.close()
    if len(captured) != 1:
        print(f"expected the SDK to send one CreateSandboxRequest, it sent {len(captured)}")
        return 1

    outputs = {
        "create_sandbox_request.bin": captured[0],
        "exec_output.bin": sandbox_pb2.ExecOutput(
            type=sandbox_pb2.ExecOutput.OUTPUT_TYPE_STDERR, data=b"\x00\xffnot utf-8\n"
        ),
    }
    for name, message in outputs.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(message.SerializeToString())
        print(f"wrote {name}")
    return 0


# ------------------------------------------------------------------------------------------
# Rust -> SDK


def cmd_decode(in_dir):
    modules = import_sdk()
    sandbox_pb2 = modules["sandbox.proto"]
    common_pb2 = modules["common.proto"]
    from agentfense import _shared
    from agentfense.types import PatternType, Permission, ResourceLimits, RuntimeType, SandboxStatus, SessionStatus

    def parse(cls, name):
        with open(os.path.join(in_dir, name), "rb") as f:
            return cls.FromString(f.read())

    problems = []

    def check(what, got, want):
        if got != want:
            problems.append(f"{what}: got {got!r}, want {want!r}")

    # Sandbox, read through the SDK's own conversion (what SandboxClient.get_sandbox returns).
    pb = parse(sandbox_pb2.Sandbox, "sandbox.bin")
    check("Sandbox.permissions[0].type (raw)", pb.permissions[0].type, common_pb2.PATTERN_TYPE_GLOB)
    check("Sandbox.HasField(resources)", pb.HasField("resources"), True)
    check("Sandbox.HasField(stopped_at)", pb.HasField("stopped_at"), False)
    sb = _shared.proto_to_sandbox(pb)
    check("Sandbox.id", sb.id, "sb_abc")
    check("Sandbox.codebase_id", sb.codebase_id, "cb_123")
    check("Sandbox.status", sb.status, SandboxStatus.RUNNING)
    check(
        "Sandbox.permissions",
        [(p.pattern, p.type, p.permission, p.priority) for p in sb.permissions],
        [
            ("**/.env*", PatternType.GLOB, Permission.NONE, 100),
            ("/secrets", PatternType.DIRECTORY, Permission.VIEW, 5),
            ("/src/main.py", PatternType.FILE, Permission.WRITE, -1),
            ("**", PatternType.GLOB, Permission.READ, 0),
        ],
    )
    check("Sandbox.labels", sb.labels, {"team": "ml", "env": "dev"})
    check("Sandbox.created_at.seconds", pb.created_at.seconds, 1_700_000_000)
    check("Sandbox.created_at.nanos", pb.created_at.nanos, 250_000_000)
    check("Sandbox.started_at.seconds", pb.started_at.seconds, 1_700_000_060)
    check("Sandbox.stopped_at", sb.stopped_at, None)
    check("Sandbox.runtime", sb.runtime, RuntimeType.DOCKER)
    check("Sandbox.image", sb.image, "python:3.11-slim")
    check("Sandbox.resources", sb.resources, ResourceLimits(memory_bytes=536870912, cpu_quota=50000, cpu_shares=None, pids_limit=64))

    res = parse(sandbox_pb2.ExecResult, "exec_result.bin")
    check("ExecResult.stdout", res.stdout, "héllo ✓\n")
    check("ExecResult.stderr", res.stderr, "warn\n")
    check("ExecResult.exit_code", res.exit_code, -3)
    check("ExecResult.duration", _shared.duration_to_timedelta(res.duration), timedelta(seconds=1.25))

    out = parse(sandbox_pb2.ExecOutput, "exec_output.bin")
    check("ExecOutput.type", out.type, sandbox_pb2.ExecOutput.OUTPUT_TYPE_STDOUT)
    check("ExecOutput.data", out.data, b"\x00\x01\xfe\xff")

    sess = _shared.proto_to_session(parse(sandbox_pb2.Session, "session.bin"))
    check("Session.id", sess.id, "sess_1")
    check("Session.sandbox_id", sess.sandbox_id, "sb_abc")
    check("Session.status", sess.status, SessionStatus.ACTIVE)
    check("Session.shell", sess.shell, "/bin/sh")
    check("Session.closed_at", sess.closed_at, None)

    if problems:
        print("the SDK read our messages differently than expected:\n  " + "\n  ".join(problems))
        return 1
    print("ok: Sandbox, ExecResult, ExecOutput and Session parsed by the SDK as expected")
    return 0


def main(argv):
    commands = {"probe": (cmd_probe, 0), "descriptors": (cmd_descriptors, 1), "encode": (cmd_encode, 1), "decode": (cmd_decode, 1)}
    if len(argv) < 2 or argv[1] not in commands or len(argv) - 2 != commands[argv[1]][1]:
        print(__doc__)
        return 2
    func, _ = commands[argv[1]]
    return func(*argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
