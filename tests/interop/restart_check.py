"""Durability across a server restart, in two steps run by crates/cli/tests/suite/restart.rs:

    restart_check.py setup ENDPOINT   -> prints the ids as JSON
    restart_check.py verify ENDPOINT IDS_JSON
    restart_check.py lost|forget ENDPOINT IDS_JSON   (after their node was declared lost)

Between the steps the server is killed (SIGKILL or SIGTERM) and started again on the same data
directory. Nothing may be lost: codebases, sandboxes (running ones come back running), published
files, and unpublished delta contents.
"""

import json
import sys

from agentfense import SandboxClient

WRITE = [{"pattern": "**/*", "permission": "write"}]


def setup(endpoint):
    c = SandboxClient(endpoint=endpoint)
    cb = c.create_codebase(name="durable", owner_id="restart-user")
    c.upload_file(cb.id, "a.txt", b"uploaded\n")
    running = c.create_sandbox(cb.id, permissions=WRITE, labels={"role": "running"})
    c.start_sandbox(running.id)
    assert c.exec(running.id, "echo published > out.txt").exit_code == 0
    private = c.create_sandbox(cb.id, permissions=WRITE, labels={"agentfense.publish": "manual"})
    c.start_sandbox(private.id)
    assert c.exec(private.id, "echo private > private.txt").exit_code == 0
    stopped = c.create_sandbox(cb.id, permissions=WRITE)
    c.start_sandbox(stopped.id)
    c.stop_sandbox(stopped.id)
    print(json.dumps({"cb": cb.id, "running": running.id, "private": private.id, "stopped": stopped.id}))


def verify(endpoint, ids):
    c = SandboxClient(endpoint=endpoint)
    assert ids["cb"] in [x.id for x in c.list_codebases(owner_id="restart-user")]
    listed = {s.id: s for s in c.list_sandboxes(codebase_id=ids["cb"])}
    assert set(listed) == {ids["running"], ids["private"], ids["stopped"]}, listed
    status = lambda sid: str(listed[sid].status).upper()
    assert "RUNNING" in status(ids["running"]), listed[ids["running"]]
    assert "RUNNING" in status(ids["private"]), listed[ids["private"]]
    assert "STOPPED" in status(ids["stopped"]), listed[ids["stopped"]]
    assert listed[ids["running"]].labels == {"role": "running"}
    # Published and uploaded files are intact; the running sandbox works again.
    assert c.download_file(ids["cb"], "out.txt") == b"published\n"
    assert c.download_file(ids["cb"], "a.txt") == b"uploaded\n"
    assert c.exec(ids["running"], "cat out.txt a.txt").stdout == "published\nuploaded\n"
    # Unpublished delta contents were kept, and are still private.
    assert c.exec(ids["private"], "cat private.txt").stdout == "private\n"
    assert "private.txt" not in [f.path for f in c.list_files(ids["cb"], recursive=True)]
    # A stopped sandbox can be started.
    c.start_sandbox(ids["stopped"])
    assert c.exec(ids["stopped"], "cat out.txt").stdout == "published\n"
    for sid in (ids["running"], ids["private"], ids["stopped"]):
        c.destroy_sandbox(sid)
    c.delete_codebase(ids["cb"])
    print("ok")


def lost(endpoint, ids, forget):
    """The setup's sandboxes after their node was declared lost: in ERROR, refusing to run
    with the reason, published work intact; with `forget`, destroyed along with the codebase."""
    c = SandboxClient(endpoint=endpoint)
    listed = {s.id: s for s in c.list_sandboxes(codebase_id=ids["cb"])}
    sandboxes = (ids["running"], ids["private"], ids["stopped"])
    for sid in sandboxes:
        assert "ERROR" in str(listed[sid].status).upper(), listed[sid]
        try:
            c.exec(sid, "true")
        except Exception as e:  # the SDK's error for FAILED_PRECONDITION
            assert "lost with its node" in str(e), e
        else:
            raise AssertionError(f"{sid} ran a command after its node was lost")
    assert c.download_file(ids["cb"], "out.txt") == b"published\n"
    assert "private.txt" not in [f.path for f in c.list_files(ids["cb"], recursive=True)]
    if forget:
        for sid in sandboxes:
            c.destroy_sandbox(sid)
        c.delete_codebase(ids["cb"])
    print("ok")


if __name__ == "__main__":
    if sys.argv[1] == "setup":
        setup(sys.argv[2])
    elif sys.argv[1] in ("lost", "forget"):
        lost(sys.argv[2], json.loads(sys.argv[3]), sys.argv[1] == "forget")
    else:
        verify(sys.argv[2], json.loads(sys.argv[3]))
