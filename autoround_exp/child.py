"""Run a stage in a child process: blocking wait, a timeout, output to a log file, and the
whole process group ended on timeout, error or Ctrl-C so nothing is left running."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from autoround_exp import progress


class ChildFailed(RuntimeError):
    def __init__(self, what: str, returncode: int | None, log_path: Path):
        tail = _tail(log_path)
        status = "timed out" if returncode is None else f"exited with {returncode}"
        super().__init__(f"{what} {status}; log: {log_path}\n{tail}")
        self.returncode = returncode
        self.log_path = log_path


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _die_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGKILL if the parent dies (even by kill -9)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# A watchdog per child, outside its group: when the harness dies, however (kill -9 included),
# Linux sends the watchdog SIGTERM and it kills the child's whole process group. The child's
# own PR_SET_PDEATHSIG reaches only the child: helpers it started (vLLM's engine core and
# workers, in the group) could outlive a killed harness and hold the GPU.
_WATCHDOG = """
import ctypes, os, signal, sys
parent, pgid = int(sys.argv[1]), int(sys.argv[2])
def end(*_):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    os._exit(0)
signal.signal(signal.SIGTERM, end)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the harness's to handle
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:  # the harness died before the line above
    end()
while True:
    signal.pause()
"""


def _watch(proc: subprocess.Popen) -> subprocess.Popen | None:
    if not sys.platform.startswith("linux"):
        return None
    argv = [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()), str(proc.pid)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """End ``proc`` and everything in its process group: SIGTERM, then SIGKILL after ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    # Helpers of its own (vLLM engine cores and workers) may outlive a clean exit of the leader.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    watchdog = getattr(proc, "watchdog", None)
    if watchdog is not None:  # its group is gone: nothing left to guard
        watchdog.kill()
        watchdog.wait()


def start(argv: list[str], log, env: dict | None = None, stdin=None) -> subprocess.Popen:
    """Start ``argv`` (never through a shell) in a process group of its own, output to ``log``,
    with a watchdog that ends the group if the harness dies (``stop`` ends both)."""
    proc = subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
        preexec_fn=_die_with_parent,
    )
    proc.watchdog = _watch(proc)
    return proc


def run(
    argv: list[str], log_path: Path, timeout_s: float, what: str, env: dict | None = None, stage: str | None = None
) -> None:
    """Run ``argv`` and raise ``ChildFailed`` unless it exits 0 within ``timeout_s``. While it
    runs, the console shows ``stage`` (default ``what``) and the progress its log reports."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        wait(start(argv, log, env), log_path, timeout_s, what, stage)


class Prestarted:
    """A child started ahead of its work (``warm.py``): its interpreter and imports load while
    the harness does something else; ``run`` lets it go and waits as ``run()`` does, ``cancel``
    ends it having run nothing."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None, command: list[str] | None = None):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.command = command  # what it will run once let go, as a plain command line
        with log_path.open("w") as log:
            self.proc = start(argv, log, env, stdin=subprocess.PIPE)

    def run(self, timeout_s: float, what: str, stage: str | None = None) -> None:
        try:
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.close()
        except BrokenPipeError:  # it died while loading: its exit status and log say why
            pass
        wait(self.proc, self.log_path, timeout_s, what, stage)

    def cancel(self) -> None:
        """End it unrun; its log (imports only, if it never ran) goes with it."""
        ran = self.proc.stdin.closed
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        stop(self.proc, grace_s=5)
        if not ran:
            self.log_path.unlink(missing_ok=True)


def wait(proc: subprocess.Popen, log_path: Path, timeout_s: float, what: str, stage: str | None = None) -> None:
    """Wait for a started child as ``run`` does: progress, timeout, the group ended after."""
    try:
        with progress.watching(log_path, stage or what):
            rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise ChildFailed(what, None, log_path) from None
    except BaseException:
        stop(proc)
        raise
    stop(proc, grace_s=5)
    if rc != 0:
        raise ChildFailed(what, rc, log_path)
