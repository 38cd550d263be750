"""Sweeps spread over processes and a remote tracking server, for real: two jobs through
Hydra's submitit_local launcher (separate processes, at the same time) into one results
store and one MLflow store; and runs logged over HTTP to a real ``mlflow server`` on
127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import NO_FIDELITY, ROOT, paths_args, records, start_mlflow_server, stop_mlflow_server

pytestmark = pytest.mark.slow

QUICK = ["method=rtn", "scheme=w4a16", "baselines=false", "serve=hf", "eval.limit=4", "report.readme=null"]


def run(workdir: Path, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=workdir, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def test_submitit_local_runs_two_jobs_in_parallel_processes_into_one_store(tmp_path):
    # two different eval limits: two runs of one checkpoint, each job its own process
    args = ["-m", "launcher=submitit_local", "eval.limit=4,5", *QUICK[:-2], "report.readme=null"]
    proc = run(tmp_path, [*args, *paths_args(tmp_path)])
    recs = list(map(json.loads, map(Path.read_text, (tmp_path / "results" / "runs").glob("*.json"))))
    assert sorted(r["table"][0]["n_samples"] for r in recs) == [4, 5]
    assert "[sweep] 2 done, 0 reused, 0 failed" in proc.stdout
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("autoround-exp")
    every = client.search_runs([exp.experiment_id])
    runs = [r for r in every if not {"autoround_exp.report", "autoround_exp.sweep"} & set(r.data.tags)]
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    # jobs in other processes nest under the sweep's one parent run all the same
    (parent,) = [r for r in every if "autoround_exp.sweep" in r.data.tags]
    assert {r.data.tags.get("mlflow.parentRunId") for r in runs} == {parent.info.run_id}
    # each job ran in its own process, and they overlapped in time
    (sweep_dir,) = (tmp_path / "work" / "hydra" / "multirun").iterdir()
    jobs = [json.loads(p.read_text()) for p in (sweep_dir / "jobs").glob("*.json")]
    assert len({j["pid"] for j in jobs}) == 2 and os.getpid() not in {j["pid"] for j in jobs}
    (a, b) = sorted((j["started"], j["ended"]) for j in jobs)
    assert b[0] < a[1], f"the two jobs did not overlap: {a}, {b}"


def test_two_sweeps_started_together_each_get_their_own_folder_and_parent_run(tmp_path):
    """Two terminals, or a script, starting two sweeps in the same second: Hydra names the sweep
    folder by the time to the second, so both once shared one and one MLflow parent run stayed
    RUNNING with no jobs under it, for good."""
    import mlflow

    argv = [sys.executable, str(ROOT / "run.py"), "-m", "method=none", "serve=hf", "report.readme=null"]
    procs = [
        subprocess.Popen(
            [*argv, f"eval.limit={n}", *paths_args(tmp_path)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in (2, 3)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = list((tmp_path / "work" / "hydra" / "multirun").iterdir())
    assert len(folders) == 2 and all(len(list((f / "jobs").glob("*.json"))) == 1 for f in folders)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("autoround-exp")
    every = client.search_runs([exp.experiment_id])
    parents = [r for r in every if "autoround_exp.sweep" in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"]
    for parent in parents:
        children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 1, parent.info.run_name


@pytest.fixture
def mlflow_server(tmp_path):
    server, url = start_mlflow_server(tmp_path)
    try:
        yield url, tmp_path / "server-artifacts"
    finally:
        stop_mlflow_server(server)


def test_runs_are_logged_over_http_to_a_real_mlflow_server(tmp_path, mlflow_server):
    url, artifacts = mlflow_server
    work = tmp_path / "work"
    work.mkdir()
    args = ["tracking=server", f"tracking.uri={url}", *QUICK, NO_FIDELITY]
    args += [f"paths.results={work / 'results'}", f"paths.work={work / 'out'}"]
    args += [a for a in paths_args(work) if a.startswith("paths.checkpoints=")]  # the session's checkpoints
    run(work, args)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url)
    (run_,) = client.search_runs([client.get_experiment_by_name("autoround-exp").experiment_id])
    assert run_.info.status == "FINISHED"
    assert "gsm8k_arith/exact_match/strict-match" in run_.data.metrics
    assert run_.data.params["tracking.uri"] == url
    # the artifacts went through the server into its artifact store
    assert any(p.name == "record.json" for p in artifacts.rglob("*"))
    assert not (work / "mlflow.db").exists() and not (work / "mlartifacts").exists()
    (rec,) = records(work).values()
    assert rec["tracking"] == {"status": "logged", "run_id": run_.info.run_id, "error": None, "parent_run_id": None}
