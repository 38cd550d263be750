"""A ``-m`` sweep's parent run in MLflow: opened as the sweep starts (its jobs nest under it),
closed with its results table as it ends, ended KILLED when the sweep is stopped or its
process is found gone."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from autoround_exp.config import TrackingConfig, redact_uri
from autoround_exp.fsutil import write_atomic
from autoround_exp.jobstatus import SettledRun
from autoround_exp.tracking.store import connect, end_killed, git_commit

PARENT_FILE = "mlflow_parent.json"  # in the sweep's folder: the parent run every job nests under
SWEEP_TAG = "autoround_exp.sweep"


def sweep_run_name(sweep_id: str, overrides: list[str]) -> str:
    """What the sweep varies first (MLflow's name column cuts the rest), then which sweep it is."""
    return f"{' '.join(overrides)} (sweep {sweep_id})" if overrides else f"sweep {sweep_id}"


def open_sweep(cfg: TrackingConfig, sweep_dir: Path, sweep_id: str, overrides: list[str]) -> str | None:
    """The parent run of a ``-m`` sweep, started as the sweep starts (its jobs nest under it;
    ``close_sweep`` ends it); its id in the sweep's folder for jobs in other processes. None,
    with a warning, where MLflow fails: the jobs are then top-level runs, nothing else changes."""
    if not cfg.enabled:
        return None
    try:
        import mlflow

        exp_id = connect(mlflow, cfg)
        client = mlflow.MlflowClient()
        end_dead_sweeps(client, exp_id)
        name = sweep_run_name(sweep_id, overrides)
        tags = {SWEEP_TAG: "true", "sweep_id": sweep_id, "overrides": " ".join(overrides)}
        tags["git_commit"] = git_commit() or "unknown"
        tags[OWNER_TAG] = owner()
        run_id = client.create_run(exp_id, tags=tags, run_name=name).info.run_id
    except Exception as e:
        print(f"WARNING: no MLflow parent run for this sweep ({type(e).__name__}: {str(e)[:200]})", flush=True)
        return None

    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(sweep_dir / PARENT_FILE, json.dumps({"run_id": run_id, "uri": redact_uri(cfg.uri)}))
    return run_id


OWNER_TAG = "autoround_exp.sweep_owner"  # host:pid of the process that runs the sweep


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def end_dead_sweeps(client, exp_id: str) -> list[str]:
    """End as KILLED the parent runs left RUNNING by sweeps of this host whose process is gone
    (kill -9, an out-of-memory kill, a closed terminal: nothing of theirs could end them). A
    sweep on another host, or whose process still runs, is left alone. The ids it ended."""
    host = socket.gethostname()
    ended = []
    running = f"tags.`{SWEEP_TAG}` = 'true' and attributes.status = 'RUNNING'"
    for run in client.search_runs([exp_id], filter_string=running):
        where, _, pid = run.data.tags.get(OWNER_TAG, "").rpartition(":")
        if where != host or not pid.isdigit() or _alive(int(pid)):
            continue
        end_killed(client, run.info.run_id, f"its sweep's process ({pid}) was gone; ended by a later sweep")
        ended.append(run.info.run_id)
    return ended


def kill_sweep(cfg: TrackingConfig, run_id: str, reason: str) -> None:
    """End the sweep's parent run as KILLED (the sweep was stopped: SIGTERM, Ctrl-C), saying
    why. A warning, never an error, where MLflow fails: the runs themselves are stored."""
    try:
        import mlflow

        connect(mlflow, cfg)
        end_killed(mlflow.MlflowClient(), run_id, reason)
    except Exception as e:
        print(f"WARNING: ending the sweep's MLflow run {run_id} as KILLED failed: {type(e).__name__}: {e}", flush=True)


def sweep_parent(sweep_dir: str | Path | None) -> str | None:
    """The parent run id ``open_sweep`` wrote for this sweep, if any."""
    path = Path(sweep_dir) / PARENT_FILE if sweep_dir else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text()).get("run_id")


def close_sweep(
    cfg: TrackingConfig,
    run_id: str,
    settled: dict[str, SettledRun],
    results_md: str | None,
    failed: int,
    rows: list[dict] | None = None,
) -> None:
    """End the sweep's parent run: its results table (``results_md``, and ``rows`` as an MLflow table), the runs
    it reused from earlier sweeps (linked by id, not logged again), and FINISHED or FAILED."""
    import mlflow
    import pandas as pd

    connect(mlflow, cfg)
    client = mlflow.MlflowClient()
    status = {key: run.outcome for key, run in settled.items()}
    reused = sorted(o.mlflow_run_id for o in status.values() if o.status == "reused" and o.mlflow_run_id)
    client.set_tag(run_id, "reused_run_ids", ",".join(reused))
    for name in ("done", "reused", "failed"):
        client.log_metric(run_id, f"sweep/{name}_runs", sum(o.status == name for o in status.values()))
    if results_md:
        client.log_text(run_id, results_md, "results.md")
    if rows:  # the table's rows as the report built them, not parsed back from its markdown
        client.log_table(run_id, pd.DataFrame(rows), "results_table.json")
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
