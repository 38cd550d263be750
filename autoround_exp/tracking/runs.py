"""One MLflow run per finished (or failed) job, read from its record; a record that could not
be logged is kept as pending for ``python -m autoround_exp.tracking sync``."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from autoround_exp.config import TrackingConfig, redact_uri
from autoround_exp.record import FailureRecord, RunRecord, Tracking, epoch_ms
from autoround_exp.tracking.store import connect, end_killed, flatten, git_commit


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
            end_killed(client, run.info.run_id, "its job died before ending it; ended by a re-run")
        elif run.info.status == "FINISHED":
            if force:
                client.set_tag(run.info.run_id, "superseded", "force=true re-ran this key")
            elif finished is None:
                finished = run.info.run_id
    return finished


def _identity_tags(rec: RunRecord | FailureRecord) -> dict[str, str]:
    return {
        "run_key": rec.key,
        "quant_key": rec.quant_key,
        "sweep_id": rec.sweep_id,
        "git_commit": git_commit() or "unknown",
    }


def mlflow_name(name: str, backend: str, limit: int | None) -> str:
    """The run's name in MLflow's list: the config (model, scheme, method, iters), then what else
    tells two runs of it apart there — the backend that scored it, and a limit when one is set."""
    return f"{name} {backend}" + (f" limit={limit}" if limit is not None else "")


def _parent_tag(rec: RunRecord | FailureRecord) -> dict[str, str]:
    """MLflow nests a run under the one its ``mlflow.parentRunId`` names: the sweep's."""
    parent = rec.tracking.parent_run_id
    return {"mlflow.parentRunId": parent} if parent else {}


def _tags(rec: RunRecord) -> dict[str, str]:
    ev, p = rec.eval, rec.eval.platform
    tags = {
        **_identity_tags(rec),
        **_parent_tag(rec),
        "model": rec.model.name,
        "scheme": rec.scheme or "none",
        "method": rec.method,
        "eval_backend": ev.backend,
        "eval_backend_requested": str(ev.backend_requested),
        "eval_backend_reason": str(ev.backend_reason),
        "lm_eval_model": ev.lm_eval_model,
        "device": str(ev.device),
        "device_name": str(p.device_name),
        "compute_capability": str(p.compute_capability),
        "vllm_version": str(p.vllm),
        "vllm_kernels": json.dumps(ev.kernels),
        "lm_eval_task_version": json.dumps(ev.task_versions),
        **{f"version.{k}": str(v) for k, v in rec.versions.items()},
    }
    if rec.model.revision:
        tags["model_revision"] = rec.model.revision
    if ev.note:
        tags["eval_note"] = ev.note
    tags["add_bos_token"] = str(ev.bos.add_bos_token if ev.bos else None)
    tags["double_bos"] = str(ev.bos.double_bos if ev.bos else None)
    if ev.bos_warning:
        tags["eval_bos_warning"] = ev.bos_warning
    return tags


def log_run(cfg: TrackingConfig, rec: RunRecord, samples: dict | None = None, force: bool = False) -> str:
    """Log a finished job from its record; returns the MLflow run id."""
    import mlflow
    import pandas as pd

    from autoround_exp.lmeval_results import table

    exp_id = connect(mlflow, cfg)
    earlier = settle_earlier_runs(mlflow, exp_id, rec.key, force)
    if earlier is not None:
        return earlier
    client = mlflow.MlflowClient()
    # the run spans the job's real work (MLflow would otherwise show the seconds of logging)
    name = mlflow_name(rec.name, rec.eval.backend, rec.eval_settings.limit)
    created = client.create_run(exp_id, start_time=epoch_ms(rec.started_at), tags=_tags(rec), run_name=name)
    with mlflow.start_run(run_id=created.info.run_id) as run:
        mlflow.log_params(flatten(rec.config))
        if rec.stages:
            mlflow.log_metrics({f"time/{stage}_s": seconds for stage, seconds in rec.stages.items()})
        calibration = rec.calibration.model_dump() if rec.calibration else {}
        mlflow.log_params({f"calibration_used.{k}": str(v) for k, v in calibration.items()})
        mlflow.log_metrics(rec.metrics)
        if rec.quantization:
            q = rec.quantization
            mlflow.log_metrics(
                {
                    "quant/oneshot_seconds": q.oneshot_seconds,
                    "quant/peak_memory_gb": q.peak_memory_gb,
                    "checkpoint/size_mb": q.size_mb,
                }
            )
        if rec.eval.seconds is not None:
            mlflow.log_metric("eval/seconds", rec.eval.seconds)
        for stage in ADDED:
            metrics, tags = added(rec, stage)
            mlflow.log_metrics(metrics)
            mlflow.set_tags(tags)
        mlflow.log_table(pd.DataFrame([m.model_dump() for m in rec.table]), artifact_file="lm_eval_table.json")
        mlflow.log_text(table(rec.lm_eval), "lm_eval_table.md")
        mlflow.log_dict(rec.config, "config.yaml")
        # What `python -m autoround_exp.report --mlflow URI` rebuilds its tables from.
        tracked = Tracking(status="logged", run_id=run.info.run_id, parent_run_id=rec.tracking.parent_run_id)
        logged = rec.model_copy(update={"tracking": tracked})
        mlflow.log_dict(json.loads(logged.model_dump_json()), "record.json")
        if samples is not None:
            mlflow.log_dict(samples, "samples.json")
        for folder, paths in rec.artifacts.items():
            for path in paths:
                if Path(path).is_file():
                    mlflow.log_artifact(path, artifact_path=folder)
    client.set_terminated(run.info.run_id, "FINISHED", end_time=epoch_ms(rec.finished_at))
    return run.info.run_id


def perf_metrics(perf) -> dict[str, float]:
    """``perf/<metric>`` (median over the repeats) and ``perf/<metric>_spread``."""
    out = {}
    for name, m in perf.metrics.items():
        out[f"perf/{name}"] = m.median
        out[f"perf/{name}_spread"] = m.spread
    if perf.peak_memory_gb is not None:
        out[f"perf/peak_{perf.memory_kind}_gb"] = perf.peak_memory_gb
    return out


def perf_tags(perf) -> dict[str, str]:
    if not perf.measured:
        return {"perf": f"not measured: {perf.reason}"}
    return {"perf": f"{perf.settings.num_prompts} x {perf.input_len}+{perf.output_len} tokens, {perf.workload}"}


def fidelity_metrics(f, prefix: str = "fidelity") -> dict[str, float]:
    """``fidelity/<figure>`` and its bootstrap interval, ``fidelity/<figure>_low`` / ``_high``; a
    vision-language model's charts with their images the same under ``fidelity_images/``."""
    out = {}
    for name, fig in f.figures.items():
        out |= {f"{prefix}/{name}": fig.value, f"{prefix}/{name}_low": fig.low, f"{prefix}/{name}_high": fig.high}
    if f.images is not None:
        out |= fidelity_metrics(f.images, "fidelity_images")
    return out


def fidelity_tags(f) -> dict[str, str]:
    if not f.measured:
        return {"fidelity": f"not measured: {f.reason}"}
    s = f.settings
    exact = "exact" if f.exact else f"top {s.top_k} of {f.vocab} + tail"
    tags = {"fidelity": f"{f.positions} positions of {Path(s.text).name} in chunks of {s.seqlen}, {exact}, {f.backend}"}
    if (i := f.images) is not None and i.measured:
        charts = f"{i.chunks} charts of {Path(s.images).name}"
        tags["fidelity_images"] = f"{i.positions} positions after the image of {charts}, {i.backend}"
    return tags


# the stages whose figures a stored run may gain later (a re-run with other settings)
ADDED = ("fidelity", "perf")


def added(rec: RunRecord, stage: str) -> tuple[dict[str, float], dict[str, str]]:
    """The MLflow metrics and tags of ``stage``'s part of the record (nothing where it has none)."""
    part = getattr(rec, stage)
    if part is None:
        return {}, {}
    if stage == "perf":
        return perf_metrics(part), perf_tags(part)
    return fidelity_metrics(part), fidelity_tags(part)


def log_added(cfg: TrackingConfig, rec: RunRecord, stage: str) -> None:
    """A stage measured for a run logged earlier (``perf``, ``fidelity``): onto that MLflow run."""
    import mlflow

    connect(mlflow, cfg)
    client = mlflow.MlflowClient()
    metrics, tags = added(rec, stage)
    for name, value in metrics.items():
        client.log_metric(rec.mlflow_run_id, name, value)
    for name, value in tags.items():
        client.set_tag(rec.mlflow_run_id, name, value)
    if stage in rec.stages:
        client.log_metric(rec.mlflow_run_id, f"time/{stage}_s", rec.stages[stage])
    # the record a report from MLflow reads (`report --mlflow`), replaced by the one that has the stage
    client.log_dict(rec.mlflow_run_id, json.loads(rec.model_dump_json()), "record.json")


def prepare(cfg: TrackingConfig) -> threading.Thread:
    """Import MLflow and open (on first use: create) its store and experiment in a background
    thread, while the job's children quantize and evaluate: the logging at the job's end then
    finds them ready. Its errors are left for that logging to meet and report."""

    def warm() -> None:
        try:
            import lm_eval.utils  # noqa: F401 - its table
            import mlflow
            import pandas  # noqa: F401 - log_table's

            connect(mlflow, cfg)
        except Exception:  # noqa: S110 - log_or_defer meets it again and keeps the run pending
            pass

    thread = threading.Thread(target=warm, name="mlflow-prepare", daemon=True)
    thread.start()
    return thread


def log_or_defer(cfg: TrackingConfig, rec: RunRecord, samples: dict | None, force: bool = False) -> RunRecord:
    """The record with where MLflow has it. A tracking store that fails now costs no finished
    work: the record is kept as ``pending`` and ``python -m autoround_exp.tracking sync`` logs it."""
    parent = rec.tracking.parent_run_id
    try:
        run_id = log_run(cfg, rec, samples, force)
    except Exception as e:
        print(
            f"WARNING: logging {rec.name} to MLflow ({redact_uri(cfg.uri)}) failed ({type(e).__name__}: "
            f"{str(e)[:300]}); the run is stored as pending: `python -m autoround_exp.tracking sync` logs it.",
            flush=True,
        )
        pending = Tracking(status="pending", error=f"{type(e).__name__}: {e}"[:500], parent_run_id=parent)
        return rec.model_copy(update={"tracking": pending})
    return rec.model_copy(update={"tracking": Tracking(status="logged", run_id=run_id, parent_run_id=parent)})


FAILED_AT_TAG = "failed_at"  # a FAILED run's failure: with the run key, which failure it holds


def logged_failure(mlflow, exp_id: str, rec: FailureRecord) -> str | None:
    """The FAILED run already logged for this very failure (same run key and failure time)."""
    found = mlflow.MlflowClient().search_runs(
        [exp_id],
        filter_string=f"tags.run_key = '{rec.key}' and tags.{FAILED_AT_TAG} = '{rec.failed_at}' "
        "and attributes.status = 'FAILED'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def log_failure(cfg: TrackingConfig, rec: FailureRecord, force: bool = False) -> str:
    """A FAILED MLflow run holding the error and the logs of the job."""
    import mlflow

    exp_id = connect(mlflow, cfg)
    settle_earlier_runs(mlflow, exp_id, rec.key, force)
    earlier = logged_failure(mlflow, exp_id, rec)
    if earlier is not None:  # this failure's run exists (its first logging broke off): not twice
        return earlier
    tags = {**_identity_tags(rec), **_parent_tag(rec), "eval_backend": rec.backend, FAILED_AT_TAG: rec.failed_at}
    client = mlflow.MlflowClient()
    # from the job's start to its failure
    name = mlflow_name(rec.name, rec.backend, (rec.config.get("eval") or {}).get("limit"))
    run = client.create_run(exp_id, start_time=epoch_ms(rec.started_at), tags=tags, run_name=name)
    try:
        with mlflow.start_run(run_id=run.info.run_id):
            mlflow.log_params(flatten(rec.config))
            mlflow.log_text(rec.error, "error.txt")
            for path in rec.logs:
                if Path(path).is_file():
                    mlflow.log_artifact(path, artifact_path="logs")
    finally:
        client.set_terminated(run.info.run_id, "FAILED", end_time=epoch_ms(rec.failed_at))
    return run.info.run_id
