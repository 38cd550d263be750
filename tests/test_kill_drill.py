"""kill -9 drill: a sweep killed mid-quantization, then mid-evaluation, and re-run each time
with the same command, ends in the state of a sweep that was never interrupted: the same
runs with the same scores, one finished MLflow run per key, nothing left RUNNING, no
half-written checkpoint taken for a finished one, no process left behind. Real chain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT, mlflow_runs, paths_args, records, sweep_runs

pytestmark = pytest.mark.slow

# Two jobs, each quantize -> evaluate; RTN so that the scores are deterministic on CPU.
SWEEP = ["-m", "scheme=w4a16,w8a8", "method=rtn", "baselines=false", "serve=hf", "eval.limit=8", "report.readme=null"]


def argv(workdir: Path, shared: bool = False) -> list[str]:
    # its own checkpoints: the drill kills the sweep mid-quantization too
    return [sys.executable, str(ROOT / "run.py"), *SWEEP, *paths_args(workdir, share_checkpoints=shared)]


def run_to_end(workdir: Path, shared: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv(workdir, shared), cwd=workdir, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def processes_of(workdir: Path) -> list[str]:
    """Command lines of live processes that work in ``workdir`` (run.py and its children)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmd and int(pid) != os.getpid():
            found.append(cmd)
    return found


def kill_when(workdir: Path, ready, timeout_s: float = 900) -> str:
    """Start the sweep, ``kill -9`` run.py (only it: its children must die with it) once
    ``ready(stdout so far)`` holds; the output it had printed."""
    out = workdir / f"killed-{time.monotonic_ns()}.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(argv(workdir), cwd=workdir, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not ready(out.read_text()):
            assert proc.poll() is None, "the sweep ended before the kill point:\n" + out.read_text()[-3000:]
            assert time.monotonic() < deadline, "the kill point never came:\n" + out.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 60
    while processes_of(workdir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_of(workdir) == [], "children outlived the killed sweep"
    return out.read_text()


def logs_of(workdir: Path, stdout: str, name: str, log: str) -> Path | None:
    """The log ``log`` of the job ``name`` that this output started, once it exists."""
    for line in stdout.splitlines():
        if line.startswith(f"[run] {name} key="):
            path = workdir / "work" / "logs" / line.split("key=")[1].split()[0] / log
            return path if path.is_file() else None
    return None


def log_text(workdir: Path, stdout: str, name: str, log: str) -> str:
    path = logs_of(workdir, stdout, name, log)
    return path.read_text(errors="replace") if path is not None else ""


def final_state(workdir: Path) -> dict:
    recs = records(workdir)
    _, runs = mlflow_runs(workdir)
    return {
        "metrics": {name: rec["metrics"] for name, rec in recs.items()},
        "keys": {name: rec["key"] for name, rec in recs.items()},
        "mlflow": sorted((r.info.run_name, r.data.tags["run_key"], r.info.status) for r in runs),
    }


def test_killed_twice_and_rerun_ends_like_an_uninterrupted_sweep(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir(), killed.mkdir()
    run_to_end(clean, shared=True)  # the reference: RTN's checkpoints are the same bytes wherever made
    expected = final_state(clean)
    assert len(expected["metrics"]) == 2 and all(s == "FINISHED" for *_, s in expected["mlflow"])

    # 1. mid-quantization of the first job: its checkpoint is being made in the child
    kill_when(killed, lambda out: logs_of(killed, out, "tiny_llama-w4a16-rtn", "quantize.log") is not None)
    assert not (killed / "results" / "runs").exists()
    assert not any((killed / "work" / "checkpoints").glob("*/*/quantization.json"))

    # 2. the same command again, killed mid-evaluation of the second job (lm-eval running: its
    # child starts with the quantization and loads its imports, then runs and logs its tasks)
    out = kill_when(killed, lambda out: "Selected Tasks" in log_text(killed, out, "tiny_llama-w8a8-rtn", "lm_eval.log"))
    assert "[run] tiny_llama-w4a16-rtn" in out  # nothing of it had finished, so it ran again
    assert set(records(killed)) == {"tiny_llama-w4a16-rtn"}

    # 3. the same command finishes the sweep: the first job reused, the second's checkpoint reused
    proc = run_to_end(killed)
    assert "[sweep] 1 done, 1 reused, 0 failed" in proc.stdout, proc.stdout[-2000:]
    assert "[reuse] checkpoint " in proc.stdout and "[run] tiny_llama-w4a16-rtn" not in proc.stdout
    assert final_state(killed) == expected
    assert not list((killed / "work" / "checkpoints").glob("*/*.partial"))
    assert not (killed / "results" / "failed").exists()  # a kill is not a failure of the job
    # the killed sweeps' MLflow runs were ended by the sweep that came next, not left RUNNING
    _, parents = sweep_runs(killed)
    assert [r.info.status for r in parents] == ["KILLED", "KILLED", "FINISHED"]
    assert all("ended by a later sweep" in r.data.tags["killed_reason"] for r in parents[:2])


def test_sigterm_ends_the_sweep_its_children_and_its_mlflow_run_as_killed(tmp_path):
    """SIGTERM (a scheduler's pre-emption, `timeout`, `kill`) mid-evaluation: run.py ends its
    children and ends the sweep's MLflow run as KILLED there and then, saying why."""
    out = tmp_path / "terminated.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(argv(tmp_path), cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while "Selected Tasks" not in log_text(tmp_path, out.read_text(), "tiny_llama-w4a16-rtn", "lm_eval.log"):
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert processes_of(tmp_path) == []
    _, (parent,) = sweep_runs(tmp_path)
    assert parent.info.status == "KILLED", out.read_text()[-3000:]
    assert "the sweep was stopped during job 0: exit 143" in parent.data.tags["killed_reason"]
    assert not (tmp_path / "results" / "failed").exists()
