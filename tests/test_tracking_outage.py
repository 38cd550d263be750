"""A real ``mlflow server`` stopped mid-sweep costs no finished work: every job that finished
is stored (the ones MLflow missed as pending), and ``tracking sync`` logs each of them
exactly once after the server is back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autoround_exp.vllm_server import free_port
from tests.support import NO_FIDELITY, ROOT, paths_args, start_mlflow_server, stop_mlflow_server

pytestmark = pytest.mark.slow


def test_a_server_stopped_mid_sweep_loses_nothing_and_sync_logs_once(tmp_path):
    import mlflow

    port = free_port()
    server, url = start_mlflow_server(tmp_path, port)
    work = tmp_path / "work"
    work.mkdir()
    argv = [sys.executable, str(ROOT / "run.py"), "-m", "scheme=w8a8,w4a16", "method=rtn", "baselines=false"]
    argv += ["serve=hf", "eval.limit=4", "report.readme=null", "tracking=server", f"tracking.uri={url}", NO_FIDELITY]
    argv += [f"paths.results={work / 'results'}", f"paths.work={work / 'out'}"]
    argv += [a for a in paths_args(work) if a.startswith("paths.checkpoints=")]  # the session's checkpoints
    proc = subprocess.Popen(argv, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[done]") and server.poll() is None:
                stop_mlflow_server(server)  # the first job is logged; the second will find no server
        assert proc.wait(timeout=1200) == 0, "".join(lines)[-4000:]
    finally:
        proc.kill() if proc.poll() is None else None
        server.poll() is None and stop_mlflow_server(server)
    out = "".join(lines)
    assert "[sweep] 2 done, 0 reused, 0 failed" in out
    assert "is stored as pending: `python -m autoround_exp.tracking sync` logs it" in out

    recs = {r["name"]: r for r in map(json.loads, map(Path.read_text, (work / "results" / "runs").glob("*.json")))}
    assert set(recs) == {"tiny_llama-w8a8-rtn", "tiny_llama-w4a16-rtn"}
    assert sorted(r["tracking"]["status"] for r in recs.values()) == ["logged", "pending"]

    server, url = start_mlflow_server(tmp_path, port)  # the same store, back up
    try:
        sync = [sys.executable, "-m", "autoround_exp.tracking", "sync", "--results", str(work / "results")]
        first = subprocess.run([*sync, "--uri", url], cwd=work, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0 and "[sync] 1 logged, 0 still pending" in first.stdout, first.stdout + first.stderr
        again = subprocess.run([*sync, "--uri", url], cwd=work, capture_output=True, text=True, timeout=300)
        assert "[sync] 0 logged, 0 still pending" in again.stdout, again.stdout + again.stderr
        client = mlflow.MlflowClient(tracking_uri=url)
        runs = client.search_runs([client.get_experiment_by_name("autoround-exp").experiment_id])
        jobs = [r for r in runs if "run_key" in r.data.tags]
        assert sorted(r.data.tags["run_key"] for r in jobs) == sorted(r["key"] for r in recs.values())
        assert {r.info.status for r in jobs} == {"FINISHED"}
        # the run synced later nests under the sweep's parent run like the one logged on time
        (parent,) = [r for r in runs if "autoround_exp.sweep" in r.data.tags]
        assert {r.data.tags.get("mlflow.parentRunId") for r in jobs} == {parent.info.run_id}
    finally:
        stop_mlflow_server(server)
