"""A `vllm serve` process on 127.0.0.1 for the length of a ``with`` block.

The server runs the serve environment's Python in a process group of its own; leaving the
block by any route (success, an exception, a timeout, Ctrl-C, SIGTERM turned into
SystemExit by run.py) ends the whole group, engine cores and workers included.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from autoround_exp import child, progress


class ServerFailed(child.ChildFailed):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def healthy(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def running(
    argv: list[str], port: int, log_path: Path, startup_timeout_s: float, env: dict
) -> Iterator[tuple[str, int]]:
    """Start the server ``argv`` (listening on ``port``), wait for /health, yield its /v1 URL
    and its process group (whose members' memory the serving benchmark reads)."""
    base = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = child.start(argv, log, env)
        try:
            deadline = time.monotonic() + startup_timeout_s
            with progress.watching(log_path, "evaluate vllm_server (server starting)"):
                while not healthy(f"{base}/health"):
                    if proc.poll() is not None:
                        raise ServerFailed("vLLM server", proc.returncode, log_path)
                    if time.monotonic() > deadline:
                        raise ServerFailed(f"vLLM server (not healthy after {startup_timeout_s} s)", None, log_path)
                    time.sleep(1)
            yield f"{base}/v1", proc.pid
        finally:
            child.stop(proc, grace_s=30)
