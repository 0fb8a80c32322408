"""Time the published SDK's first-use flow against a running server.

    python3 bench/sdk_flow.py HOST:PORT [FILES] [ITERATIONS]

Sandbox.from_local over a generated project of FILES small files (create codebase, one upload
per file, create sandbox, start), then the first `run`. Prints one JSON object: wall times and
the Python client's own CPU time, so that the server's share can be told apart.
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from agentfense import Sandbox


def main():
    endpoint = sys.argv[1]
    files = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    iterations = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        for i in range(files):
            p = root / f"pkg{i // 100:02d}" / f"mod{i:04d}.py"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"VALUE_{i} = {i}\n" * 20)
        walls, cpus, firsts = [], [], []
        for _ in range(iterations):
            t0, c0 = time.perf_counter(), time.process_time()
            sb = Sandbox.from_local(str(root), preset="agent-safe", endpoint=endpoint)
            t1 = time.perf_counter()
            r = sb.run("ls pkg00 | wc -l")
            t2, c2 = time.perf_counter(), time.process_time()
            assert r.exit_code == 0 and r.stdout.strip() == "100", r
            walls.append(t2 - t0)
            firsts.append(t2 - t1)
            cpus.append(c2 - c0)
            sb.destroy()
    print(
        json.dumps(
            {
                "files": files,
                "iterations": iterations,
                "wall_s": statistics.median(walls),
                "first_run_s": statistics.median(firsts),
                "client_cpu_s": statistics.median(cpus),
            }
        )
    )


if __name__ == "__main__":
    main()
