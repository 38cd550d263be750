"""Log stage: one MLflow run per finished job (params, tags, metrics, table, artifacts)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from autoround_exp.config import Experiment, TrackingConfig
from autoround_exp.store import locked


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, f"{key}.")
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def connect(mlflow, cfg: TrackingConfig) -> str:
    """Point MLflow at the store; the experiment's id. The first access to a new SQLite
    store creates its tables: parallel jobs (launcher=submitit_*) take turns on a lock next to
    the file, or two of them migrate the same empty database and one fails."""
    mlflow.set_tracking_uri(cfg.uri)
    if not cfg.uri.startswith("sqlite:///"):
        return _experiment_id(mlflow, cfg)
    db = Path(cfg.uri.removeprefix("sqlite:///"))
    with locked(db.with_name(f".{db.name}.lock")):
        return _experiment_id(mlflow, cfg)


def _experiment_id(mlflow, cfg: TrackingConfig) -> str:
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = cfg.artifact_root  # None: the tracking server's own artifact store
    if location and "://" not in location:
        location = Path(location).resolve().as_uri()
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=location)
    except Exception:  # a parallel job created it first
        exp = mlflow.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def settle_earlier_runs(mlflow, exp_id: str, key: str, force: bool) -> str | None:
    """Before logging run ``key``: close what an earlier, killed process left of it.

    The caller holds the run key's lock, so a RUNNING run with this key is no live job's: its
    process died (kill -9, pre-emption) mid-logging, and it is ended as KILLED. A FINISHED
    one was logged completely by a process that died before storing the record: its id is
    returned so that no second run is logged for one key (with ``force`` it is tagged
    superseded and a new one is logged)."""
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.run_key = '{key}'", order_by=["attributes.start_time DESC"]
    )
    finished = None
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "killed_reason", "its job died before ending it; ended by a re-run")
            client.set_terminated(run.info.run_id, status="KILLED")
        elif run.info.status == "FINISHED":
            if force:
                client.set_tag(run.info.run_id, "superseded", "force=true re-ran this key")
            elif finished is None:
                finished = run.info.run_id
    return finished


def _identity_tags(record: dict) -> dict[str, str]:
    return {
        "run_key": record["key"],
        "quant_key": record["quant_key"],
        "sweep_id": record["sweep_id"],
        "git_commit": git_commit() or "unknown",
    }


def log_run(
    exp: Experiment, record: dict, artifacts: dict[str, list[str]], table_md: str, samples: dict | None = None
) -> str:
    """Log a finished job; returns the MLflow run id."""
    import mlflow
    import pandas as pd

    exp_id = connect(mlflow, exp.tracking)
    earlier = settle_earlier_runs(mlflow, exp_id, record["key"], exp.force)
    if earlier is not None:
        return earlier
    tags = {
        **_identity_tags(record),
        "model": exp.model.name,
        "scheme": exp.scheme.name if exp.quantized else "none",
        "method": exp.method.name,
        "eval_backend": record["eval"]["backend"],
        "eval_backend_requested": record["eval"]["backend_requested"],
        "eval_backend_reason": record["eval"]["backend_reason"],
        "lm_eval_model": record["eval"]["lm_eval_model"],
        "device": record["eval"]["device"],
        "device_name": record["eval"]["platform"]["device_name"],
        "compute_capability": str(record["eval"]["platform"].get("compute_capability")),
        "vllm_version": str(record["eval"]["platform"].get("vllm")),
        "vllm_kernels": json.dumps(record["eval"]["kernels"]),
        "lm_eval_task_version": json.dumps(record["eval"]["task_versions"]),
        **{f"version.{k}": str(v) for k, v in record["versions"].items()},
    }
    if record["eval"]["note"]:
        tags["eval_note"] = record["eval"]["note"]
    bos = record["eval"].get("bos") or {}
    tags["add_bos_token"] = str(bos.get("add_bos_token"))
    tags["double_bos"] = str(bos.get("double_bos"))
    if bos.get("warning"):
        tags["eval_bos_warning"] = bos["warning"]
    with mlflow.start_run(experiment_id=exp_id, run_name=record["name"], tags=tags) as run:
        mlflow.log_params(flatten(exp.resolved))
        mlflow.log_params({f"calibration_used.{k}": str(v) for k, v in (record.get("calibration") or {}).items()})
        mlflow.log_metrics(record["metrics"])
        if record.get("quantization"):
            q = record["quantization"]
            mlflow.log_metrics(
                {
                    "quant/oneshot_seconds": q["oneshot_seconds"],
                    "quant/peak_memory_gb": q["peak_memory_gb"],
                    "checkpoint/size_mb": q["size_mb"],
                }
            )
        mlflow.log_metric("eval/seconds", record["eval"]["seconds"])
        mlflow.log_table(pd.DataFrame(record["table"]), artifact_file="lm_eval_table.json")
        mlflow.log_text(table_md, "lm_eval_table.md")
        mlflow.log_dict(exp.resolved, "config.yaml")
        # What `python -m autoround_exp.report --mlflow URI` rebuilds its tables from.
        mlflow.log_dict(record, "record.json")
        if samples is not None:
            mlflow.log_dict(samples, "samples.json")
        for folder, paths in artifacts.items():
            for p in paths:
                if Path(p).is_file():
                    mlflow.log_artifact(p, artifact_path=folder)
        return run.info.run_id


def log_failure(exp: Experiment, record: dict) -> str:
    """A FAILED MLflow run holding the error and the logs of the job."""
    import mlflow

    exp_id = connect(mlflow, exp.tracking)
    settle_earlier_runs(mlflow, exp_id, record["key"], exp.force)
    tags = {**_identity_tags(record), "eval_backend": record["eval"]["backend"]}
    run = mlflow.start_run(experiment_id=exp_id, run_name=record["name"], tags=tags)
    try:
        mlflow.log_params(flatten(exp.resolved))
        mlflow.log_text(record["error"], "error.txt")
        for p in record["logs"]:
            mlflow.log_artifact(p, artifact_path="logs")
    finally:
        mlflow.end_run(status="FAILED")
    return run.info.run_id
