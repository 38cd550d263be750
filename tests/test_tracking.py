"""Tracking never costs finished work: a server that is down is refused at the door in
seconds; a record that cannot be logged is kept as pending; ``tracking sync`` logs each
pending record exactly once (real MLflow, SQLite store)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from autoround_exp import tracking
from autoround_exp.config import TrackingConfig
from autoround_exp.record import FailureRecord, Tracking
from autoround_exp.store import Store
from tests.support import ROOT

FIXTURE = Path(__file__).parent / "data" / "report" / "results"
DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens there


def test_a_tracking_server_that_is_down_is_refused_at_the_door_naming_it(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "tracking=server", f"tracking.uri={DEAD}", "method=rtn", "scheme=w8a8"]
        + [f"paths.results={tmp_path / 'results'}", f"paths.work={tmp_path / 'work'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"tracking.uri={DEAD} does not answer" in proc.stderr and "mlflow server" in proc.stderr
    assert elapsed < 10, elapsed
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


def pending_store(tmp_path: Path) -> Path:
    """The fixture's runs as a store whose records could not be logged when they finished."""
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    store = Store(results)
    for rec in store.records():
        rec.tracking = Tracking(status="pending", error="ConnectionError: down")
        store.save(rec)
    return results


def test_logging_that_fails_keeps_the_record_as_pending_in_seconds(tmp_path, capsys):
    rec = Store(FIXTURE).records()[0]
    t0 = time.monotonic()
    out = tracking.log_or_defer(TrackingConfig(uri=DEAD), rec, None)
    assert time.monotonic() - t0 < 30
    assert out.tracking.status == "pending" and out.tracking.run_id is None and out.tracking.error
    assert "tracking sync" in capsys.readouterr().out


def test_sync_logs_each_pending_record_once(tmp_path):
    import mlflow

    results = pending_store(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(uri=uri, artifact_root=str(tmp_path / "mlartifacts"))
    assert len(Store(results).pending()) == 7
    assert tracking.sync(results, cfg) == (7, 0)
    assert Store(results).pending() == []
    recs = Store(results).records()
    assert {r.tracking.status for r in recs} == {"logged"}
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("autoround-exp").experiment_id])
    assert sorted(r.data.tags["run_key"] for r in runs) == sorted(r.key for r in recs)
    assert {r.info.run_id for r in runs} == {r.mlflow_run_id for r in recs}
    # the record MLflow holds is the logged one
    logged = json.loads(Path(client.download_artifacts(recs[0].mlflow_run_id, "record.json")).read_text())
    assert logged["tracking"]["run_id"] == recs[0].mlflow_run_id

    # once: a second sync has nothing to do, and a record marked pending again is not logged twice
    assert tracking.sync(results, cfg) == (0, 0)
    rec, first_id = recs[0], recs[0].mlflow_run_id
    rec.tracking = Tracking(status="pending")
    Store(results).save(rec)
    assert tracking.sync(results, cfg) == (1, 0)
    assert len(client.search_runs([runs[0].info.experiment_id])) == 7
    assert Store(results).find(rec.key).mlflow_run_id == first_id


def test_sync_command_refuses_a_server_that_is_down(tmp_path):
    results = pending_store(tmp_path)
    assert tracking.main(["sync", "--results", str(results), "--uri", DEAD]) == 2
    assert len(Store(results).pending()) == 7


def test_the_experiment_says_it_holds_model_runs_so_the_ui_opens_on_them(tmp_path):
    """MLflow 3's UI opens an experiment without ``mlflow.experimentKind`` on its GenAI
    overview; the harness's experiment (new, or one made before it set the tag) declares itself
    a model-development experiment."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    old = client.create_experiment("made-before", artifact_location=(tmp_path / "a").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    for name in ("autoround-exp", "made-before"):
        exp_id = tracking.connect(mlflow, TrackingConfig(uri=uri, experiment=name, artifact_root=str(tmp_path / "a")))
        assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_mlflow_run_spans_the_jobs_real_work_and_holds_its_stage_times(tmp_path):
    import mlflow

    results = pending_store(tmp_path)
    rec = Store(results).records()[0]
    # an older record's whole seconds, and this layout's milliseconds
    rec.started_at, rec.finished_at = "2026-12-02T05:00:00+0000", "2026-12-02T05:41:30.250+00:00"
    rec.stages = {"quantize": 1800.5, "evaluate": 640.25, "perf": 50.0}
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "mlartifacts"))
    run = mlflow.MlflowClient(tracking_uri=cfg.uri).get_run(tracking.log_run(cfg, rec))
    assert run.info.status == "FINISHED"
    # the job's own times, not those of the seconds it took to log it afterwards
    assert run.info.start_time == 1796187600000 and run.info.end_time == 1796187600000 + 2490250
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("time/")} == {
        "time/quantize_s": 1800.5,
        "time/evaluate_s": 640.25,
        "time/perf_s": 50.0,
    }


def test_sync_twice_after_a_failed_job_logs_one_failed_run(tmp_path):
    """A failed job whose first logging created its MLflow run but could not mark the record
    logged (the server went away, the process died) is pending; sync finds that run instead of
    logging the failure a second time, and a second sync has nothing to do."""
    import mlflow

    results = tmp_path / "results"
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "mlartifacts"))
    rec = FailureRecord(
        name="tiny_llama-w4a16-rtn",
        key="k1",
        quant_key="q1",
        sweep_id="s",
        started_at="2026-12-06T10:00:00.000Z",
        failed_at="2026-12-06T10:01:00.000Z",
        error="RuntimeError: boom",
        logs=[],
        backend="hf",
        config={"eval": {"limit": 8}},
        tracking=Tracking(status="pending", error="ConnectionError: down"),
    )
    Store(results).save_failure(rec)
    first = tracking.log_failure(cfg, rec)  # the first attempt, whose record stayed pending
    assert tracking.sync(results, cfg) == (1, 0)
    assert tracking.sync(results, cfg) == (0, 0)
    client = mlflow.MlflowClient(tracking_uri=cfg.uri)
    exp_id = client.get_experiment_by_name("autoround-exp").experiment_id
    runs = client.search_runs([exp_id], "tags.run_key = 'k1'")
    assert [(r.info.run_id, r.info.status) for r in runs] == [(first, "FAILED")]
    # the same key failing again later is a new failure, with a run of its own
    again = rec.model_copy(update={"failed_at": "2026-12-06T11:00:00.000Z"})
    assert tracking.log_failure(cfg, again) != first


def test_a_sweep_ends_the_parent_runs_that_dead_sweeps_of_this_host_left_running(tmp_path):
    """A sweep killed with -9 cannot end its MLflow parent run; the next sweep on the host ends
    it as KILLED, saying why. A sweep whose process still runs, or on another host, is left."""
    import socket

    import mlflow

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "mlartifacts"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    client = mlflow.MlflowClient(tracking_uri=cfg.uri)
    exp_id = tracking.connect(mlflow, cfg)
    owners = {"dead": f"{host}:{dead.pid}", "alive": tracking.owner(), "elsewhere": f"not-{host}:{dead.pid}"}
    ids = {
        name: client.create_run(exp_id, tags={tracking.SWEEP_TAG: "true", tracking.OWNER_TAG: who}).info.run_id
        for name, who in owners.items()
    }
    job = client.create_run(exp_id, tags={"run_key": "k", tracking.OWNER_TAG: owners["dead"]}).info.run_id

    new = tracking.open_sweep(cfg, tmp_path / "sweep", "s2", ["iters=0"])

    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING"}
    assert "ended by a later sweep" in client.get_run(ids["dead"]).data.tags["killed_reason"]
    assert client.get_run(job).info.status == "RUNNING"  # a job's run is settle_earlier_runs' to end
    assert client.get_run(new).data.tags[tracking.OWNER_TAG] == tracking.owner()
    tracking.kill_sweep(cfg, new, "stopped")
    assert client.get_run(new).info.status == "KILLED"
    assert client.get_run(new).data.tags["killed_reason"] == "stopped"
