"""Fixtures for the SDK interoperability suite.

The suite runs against a real `agentfense serve` started by the Rust test harness
(crates/cli/tests/suite/interop.rs), which passes its addresses in the environment:
AGENTFENSE_GRPC (host:port), AGENTFENSE_HTTP (http://host:port), AGENTFENSE_AUDIT (audit log
path) and AGENTFENSE_HOST_PORT (a TCP port listening on the host's loopback, for the
network-isolation test).
"""

import json
import os
import pathlib
import time

import pytest


def _env(name):
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set: run this suite through `cargo test` (interop.rs)", 2)
    return value


@pytest.fixture(scope="session")
def endpoint():
    return _env("AGENTFENSE_GRPC")


@pytest.fixture(scope="session")
def http_base():
    return _env("AGENTFENSE_HTTP")


@pytest.fixture(scope="session")
def host_port():
    return int(_env("AGENTFENSE_HOST_PORT"))


class Audit:
    def __init__(self, path):
        self.path = pathlib.Path(path)

    def events(self, name=None, **fields):
        out = []
        if not self.path.exists():
            return out
        for line in self.path.read_text().splitlines():
            ev = json.loads(line)
            if name and ev.get("event") != name:
                continue
            if all(ev.get(k) == v for k, v in fields.items()):
                out.append(ev)
        return out

    def wait_for(self, name, timeout=5.0, **fields):
        """The audit writer is asynchronous: poll briefly."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.events(name, **fields)
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {name} event with {fields} in {self.path}")


@pytest.fixture(scope="session")
def audit():
    return Audit(_env("AGENTFENSE_AUDIT"))


@pytest.fixture
def project(tmp_path):
    """A small project with secrets at several depths."""
    root = tmp_path / "project"
    files = {
        "README.md": "# demo\n",
        "src/main.py": "print('hello from sandbox')\n",
        "src/util/helpers.py": "X = 1\n",
        ".env": "API_KEY=never-uploaded\n",
        ".env.local": "API_KEY=top-secret-local\n",
        "config/.env.prod": "DB_PASSWORD=top-secret-prod\n",
        "secrets/db.txt": "top-secret-db\n",
        "app/secrets/x/y.txt": "top-secret-deep\n",
        "certs/server.key": "top-secret-key\n",
        # Not in the SDK's own agent-safe list: hidden by the server's mandatory floor.
        "deploy/id_rsa": "top-secret-ssh-key\n",
        "home/.aws/credentials": "aws_secret_access_key=top-secret-aws\n",
        "docs/guide.md": "guide\n",
        "output/.keep": "",
        ".sandboxignore": "ignored_dir/\n*.log\n",
        "ignored_dir/data.txt": "should not upload\n",
        "debug.log": "should not upload\n",
    }
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    return root


def pytest_runtest_logreport(report):
    """One JSON line per scenario outcome for the Rust harness (AGENTFENSE_RESULTS), which
    reports each scenario as a test of its own."""
    path = os.environ.get("AGENTFENSE_RESULTS")
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    line = {
        "test": report.nodeid.split("::")[-1],
        "when": report.when,
        "outcome": report.outcome,
        "detail": report.longreprtext[-6000:],
    }
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
