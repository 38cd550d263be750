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

from tests.support import ROOT


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


def _prestarted(tmp_path: Path, out: Path):
    from autoround_exp import child

    (tmp_path / "slow_import.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    (tmp_path / "task.py").write_text(
        "import sys\nif __name__ == '__main__':\n    open(sys.argv[1], 'w').write(' '.join(sys.argv))\n"
    )
    argv = [sys.executable, str(ROOT / "autoround_exp" / "warm.py"), "task", "slow_import", "--", str(out)]
    return child.Prestarted(argv, tmp_path / "task.log", env={"PYTHONPATH": str(tmp_path)}, command=["x"])


def wait_for(path: Path, timeout_s: float = 30) -> bool:
    deadline = time.time() + timeout_s
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    return path.exists()


def test_a_prestarted_child_imports_ahead_and_runs_its_module_only_when_let_go(tmp_path):
    out = tmp_path / "ran"
    pre = _prestarted(tmp_path, out)
    assert wait_for(tmp_path / "imported")  # its imports are done before it is told anything
    time.sleep(0.3)
    assert not out.exists() and pre.proc.poll() is None  # and it waits
    pre.run(timeout_s=60, what="task")
    # as `python -m task <argv>` would: the module as __main__, its file as argv[0]
    assert out.read_text() == f"{tmp_path / 'task.py'} {out}"
    assert pre.proc.poll() == 0 and not alive(pre.proc.watchdog.pid)


def test_a_cancelled_prestarted_child_runs_nothing_and_leaves_no_process(tmp_path):
    out = tmp_path / "ran"
    pre = _prestarted(tmp_path, out)
    assert wait_for(tmp_path / "imported")
    pre.cancel()
    assert pre.proc.poll() is not None and not out.exists()
    assert not (tmp_path / "task.log").exists()  # a log of imports only: gone with it
    assert wait_for_dead(pre.proc.watchdog.pid)


def wait_for_dead(pid: int, timeout_s: float = 10) -> bool:
    deadline = time.time() + timeout_s
    while alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    return not alive(pid)
