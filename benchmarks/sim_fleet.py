"""A fleet of simulated tokenmill workers for the routing and gateway benchmarks.

Each is `tokenmill serve --runner simulated` (the real scheduler, prefix cache
and KV events; step times from a profile, no model run) on a free port, with
worker id ``sim-<i>``; the fleet is stopped when the block ends.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

TOKENMILL = [sys.executable, "-m", "tokenmill.cli.main"]


@contextlib.contextmanager
def simulated_fleet(n: int, options: list[str]) -> Iterator[list[str]]:
    """``n`` workers started with ``options`` (and a model folder first, if the options begin with
    one); yields their base URLs."""
    procs, urls = [], []
    try:
        for i in range(n):
            cmd = [*TOKENMILL, "serve", *options, "--runner", "simulated", "--port", "0", "--grpc-port", "-1"]
            cmd += ["--worker-id", f"sim-{i}"]
            procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True))
        for proc in procs:
            assert proc.stderr is not None
            for line in proc.stderr:
                if "ready: " in line:
                    urls.append(line.split("ready: ")[1].split("/v1")[0])
                    break
            else:
                raise RuntimeError("a simulated worker did not start")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
