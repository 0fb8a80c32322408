#!/usr/bin/env python3
"""Secret detection against real project layouts: what each preset hides, what stays usable.

Builds a corpus of layouts (a Python venv with pip's certifi bundle, a node_modules tree with
test certificates, a Django project with credentials.py, a library with test fixture keys, a
home directory with keys and cloud credentials), marks every file secret or public, runs
`agentfense run` on each layout under each preset (with the default mandatory floor), and
prints the Markdown table kept in docs/permissions.md. Then runs the toolchains in the
sandbox (venv + pip, offline pip and npm installs of local packages, imports).

Usage (root, as `agentfense run` needs): scripts/secret-corpus.py [--agentfense PATH]
Exit status 1 if a secret is readable or a toolchain fails.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CERT = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n-----END PRIVATE KEY-----\n"
SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
SA_KEY = json.dumps({"type": "service_account", "private_key": KEY, "client_email": "x@p.iam"})

PRESETS = ["agent-safe", "development", "read-only"]

# layout -> {path: secret?}; files written with the content given (str) or generated.
def layouts(py: str) -> dict:
    return {
        "Python venv (pip, certifi)": {
            "app.py": ("print('hi')\n", False),
            "@venv": (py, False),
            "@wheel": ("localpy", False),
        },
        "node_modules with test certificates": {
            "package.json": (
                '{"name": "app", "version": "1.0.0", '
                '"dependencies": {"https-agent": "file:vendor/https-agent"}}\n',
                False,
            ),
            "vendor/leftpad-local/package.json": (
                '{"name": "leftpad-local", "version": "1.0.0", "main": "index.js"}\n',
                False,
            ),
            "vendor/leftpad-local/index.js": ("module.exports = (s) => ' ' + s;\n", False),
            "vendor/https-agent/package.json": ('{"name": "https-agent", "version": "1.0.0"}\n', False),
            "vendor/https-agent/index.js": ("module.exports = {};\n", False),
            "vendor/https-agent/lib/credentials.js": ("module.exports = {};\n", False),
            "vendor/https-agent/test/fixtures/ca.pem": (CERT, False),
            "vendor/https-agent/test/fixtures/server.crt": (CERT, False),
            "vendor/https-agent/test/fixtures/snakeoil.key": (KEY, True),
            "vendor/https-agent/test/fixtures/combined.pem": (CERT + KEY, True),
            "@npm-install": ("", False),
        },
        "Django project": {
            "manage.py": ("import app\n", False),
            "app/__init__.py": ("", False),
            "app/settings.py": ("SECRET_KEY = os.environ['K']\n", False),
            "app/credentials.py": ("def load(): return {}\n", False),
            "app/credentials/__init__.py": ("", False),
            "app/tests/test_credentials.py": ("def test(): pass\n", False),
            "config/credentials.yml": ("password: hunter2\n", True),
            ".env": ("SECRET_KEY=abc\n", True),
            ".env.production": ("DB=postgres://u:p@h/db\n", True),
            "secrets/prod.json": ('{"k": 1}\n', True),
        },
        "library with test fixture keys": {
            "src/tls.c": ("int main(void) { return 0; }\n", False),
            "tests/fixtures/ca.crt": (CERT, False),
            "tests/fixtures/chain.pem": (CERT * 3, False),
            "tests/fixtures/server.pem": (CERT + KEY, True),
            "tests/fixtures/client.key": (KEY, True),
            "tests/fixtures/id_rsa_test": (SSH_KEY, True),
            "tests/fixtures/id_rsa_test.pub": ("ssh-rsa AAAAB3Nza test\n", False),
            "tests/fixtures/keystore.jks": ("\xfe\xed\xfe\xed", True),
            "tests/fixtures/cert.p12": ("0\x82", True),
        },
        "home directory": {
            ".bashrc": ("alias ll='ls -l'\n", False),
            ".gitconfig": ("[user]\n  name = Dev\n", False),
            ".ssh/id_ed25519": (SSH_KEY, True),
            ".ssh/id_ed25519.pub": ("ssh-ed25519 AAAA dev@host\n", True),
            ".ssh/config": ("Host *\n", True),
            ".aws/credentials": ("aws_secret_access_key = abc\n", True),
            ".aws/config": ("[default]\n", True),
            ".config/gcloud/application_default_credentials.json": ('{"refresh_token": "x"}\n', True),
            ".kube/config": ("users: []\n", True),
            ".docker/config.json": ('{"auths": {}}\n', True),
            ".netrc": ("machine h login u password p\n", True),
            ".npmrc": ("//registry.npmjs.org/:_authToken=x\n", True),
            ".pypirc": ("[pypi]\npassword = x\n", True),
            ".git-credentials": ("https://u:t@github.com\n", True),
            ".gnupg/private-keys-v1.d/A1B2.key": ("(private-key)\n", True),
            ".vault-token": ("s.abc\n", True),
            ".config/gh/hosts.yml": ("github.com:\n  oauth_token: x\n", True),
            "keys/prod-service-account.json": (SA_KEY, True),
            "keys/service-account.schema.json": ('{"type": "object"}\n', False),
            "keys/deploy_id_rsa.bak": (SSH_KEY, True),
            "projects/notes.md": ("todo\n", False),
        },
    }


def build(root: Path, files: dict, python: str) -> dict:
    """Writes the layout; returns {relative path: secret?} for every file in it."""
    truth = {}
    for rel, (content, secret) in files.items():
        if rel == "@wheel":
            # A pure wheel, built by hand: installing it needs no network and no build tools.
            name = content
            whl = root / f"{name}-1.0-py3-none-any.whl"
            info = f"{name}-1.0.dist-info"
            with zipfile.ZipFile(whl, "w") as z:
                z.writestr(f"{name}/__init__.py", "X = 1\n")
                z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
                z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
                z.writestr(f"{info}/RECORD", "")
            truth[whl.name] = False
            continue
        if rel == "@npm-install":
            # node_modules as a developer's checkout has it (offline: the dependency is local).
            subprocess.run(
                ["npm", "install", "--offline", "--no-audit", "--no-fund"],
                cwd=root, check=True, capture_output=True, env={**os.environ, "HOME": str(root.parent)},
            )
            for p in root.rglob("*"):
                if p.is_file() and not p.is_symlink() and str(p.relative_to(root)) not in truth:
                    truth[str(p.relative_to(root))] = False
            continue
        if rel == "@venv":
            subprocess.run([python, "-m", "venv", str(root / ".venv")], check=True)
            for p in (root / ".venv").rglob("*"):
                if p.is_file() and not p.is_symlink():
                    truth[str(p.relative_to(root))] = False
            continue
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode("latin-1"))
        truth[rel] = secret
    return truth


def run(agentfense: str, data: Path, project: Path, preset: str, script: str):
    return subprocess.run(
        [agentfense, "run", "--data-dir", str(data), str(project), "--preset", preset,
         "--discard", "--", script],
        capture_output=True, text=True, timeout=600,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agentfense", default="target/release/agentfense")
    ap.add_argument("--python", default="/usr/bin/python3")
    args = ap.parse_args()
    agentfense = os.path.abspath(args.agentfense)
    failures = []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, files in layouts(args.python).items():
            root = tmp / name.split()[0].lower()
            root.mkdir()
            truth = build(root, files, args.python)
            secrets = {p for p, s in truth.items() if s}
            public = set(truth) - secrets
            cells = []
            for preset in PRESETS:
                r = run(agentfense, tmp / "data", root, preset,
                        "cd /workspace && find . -type f -readable | sed 's|^\\./||'")
                readable = set(r.stdout.split("\n")) - {""}
                leaked = sorted(secrets & readable)
                missing = sorted(public - readable)
                failures += [f"{name} / {preset}: public file hidden: {p}" for p in missing]
                if preset != "read-only":
                    # The floor alone (read-only) hides less by design (no `secrets/`).
                    failures += [f"{name} / {preset}: secret readable: {p}" for p in leaked]
                cells.append(f"{len(secrets) - len(leaked)}/{len(secrets)} hidden, "
                             f"{len(public) - len(missing)}/{len(public)} readable")
            rows.append((name, len(truth), cells))
        # Toolchains, under development (they write).
        checks = [
            ("python", "python -m venv, pip --version, pip install (offline, local package)",
             "python3 -m venv /workspace/.v2 && .v2/bin/pip --version >/dev/null && "
             ".v2/bin/pip install -q --no-index ./localpy-1.0-py3-none-any.whl && "
             ".v2/bin/python -c 'import localpy'"),
            ("node_modules", "npm install (offline, local package), require",
             "HOME=/tmp npm install --offline --no-audit --no-fund ./vendor/leftpad-local "
             ">/dev/null && node -e \"require('leftpad-local')\""),
            ("django", "python: import app.credentials (a source file named like a secret)",
             "cd /workspace && python3 -c 'import app.credentials'"),
        ]
        tool_rows = []
        for layout, what, script in checks:
            r = run(agentfense, tmp / "data", tmp / layout, "development", script)
            ok = r.returncode == 0
            if not ok:
                err = "\n".join(l for l in r.stderr.splitlines() if not l.startswith("  "))
                failures.append(f"toolchain {what}: exit {r.returncode}: {err[-600:]}")
            tool_rows.append((what, "works" if ok else f"FAILS (exit {r.returncode})"))
    print("| layout | files | " + " | ".join(PRESETS) + " |")
    print("|---|---|" + "---|" * len(PRESETS))
    for name, n, cells in rows:
        print(f"| {name} | {n} | " + " | ".join(cells) + " |")
    print()
    print("| toolchain, under `development` | result |")
    print("|---|---|")
    for what, res in tool_rows:
        print(f"| {what} | {res} |")
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
