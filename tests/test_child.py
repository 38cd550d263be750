"""Child processes never outlive the harness: a watchdog ends a child's whole process group
when the harness dies, kill -9 included — helpers the child started (vLLM's engine core and
workers) as well, which the child's own death signal does not reach."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.conftest import ROOT


def alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (OSError, StopIteration):
        return False
    return "zombie" not in state


def harness(tmp_path: Path) -> tuple[subprocess.Popen, int, int]:
    """A harness process that starts a child whose own child (same group) would outlive it."""
    script = tmp_path / "harness.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            sys.path.insert(0, {str(ROOT)!r})
            from autoround_exp import child
            log = open({str(tmp_path / "child.log")!r}, "w")
            proc = child.start(["sh", "-c", "sleep 300 & echo $! > {tmp_path / "grandchild.pid"}; exec sleep 300"], log)
            print(proc.pid, flush=True)
            time.sleep(300)
            """
        )
    )
    h = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child_pid = int(h.stdout.readline())
    pidfile = tmp_path / "grandchild.pid"
    for _ in range(100):
        if pidfile.is_file() and pidfile.read_text().strip():
            break
        time.sleep(0.1)
    return h, child_pid, int(pidfile.read_text())


def test_a_harness_killed_with_sigkill_leaves_no_process_of_its_children_groups(tmp_path):
    h, child_pid, grandchild = harness(tmp_path)
    assert alive(child_pid) and alive(grandchild) and os.getpgid(grandchild) == child_pid
    os.kill(h.pid, signal.SIGKILL)
    h.wait()
    deadline = time.monotonic() + 10
    while (alive(child_pid) or alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child_pid) and not alive(grandchild)


def test_a_child_stopped_normally_takes_its_watchdog_with_it(tmp_path):
    from autoround_exp import child

    with (tmp_path / "log").open("w") as log:
        proc = child.start(["sleep", "30"], log)
        assert proc.watchdog is not None and proc.watchdog.poll() is None
        child.stop(proc, grace_s=5)
    assert proc.watchdog.poll() is not None and not alive(proc.pid)
