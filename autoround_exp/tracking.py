"""Log stage: one MLflow run per finished job (params, tags, metrics, table, artifacts), read
from its record; a tracking store that is down is caught at the door, and a record that could
not be logged is kept as pending for ``python -m autoround_exp.tracking sync``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from pathlib import Path

from autoround_exp.config import TrackingConfig, redact_uri
from autoround_exp.record import FailureRecord, RunRecord, Tracking, epoch_ms
from autoround_exp.store import locked

# A tracking server that stops answering costs seconds, not MLflow's minutes of retries: the
# record is kept as pending and synced later. A user's own setting wins.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


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


# MLflow 3's UI opens an experiment of unknown kind on its GenAI overview (traces); this
# experiment holds training-style runs (params, metrics, artifacts), so it says so.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(mlflow, cfg: TrackingConfig) -> str:
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        for tag, value in EXPERIMENT_KIND.items():
            if tag not in exp.tags:  # an experiment made before the harness set it
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, tag, value)
        return exp.experiment_id
    location = cfg.artifact_root  # None: the tracking server's own artifact store
    if location and "://" not in location:
        location = Path(location).resolve().as_uri()
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
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
            end_killed(client, run.info.run_id, "its job died before ending it; ended by a re-run")
        elif run.info.status == "FINISHED":
            if force:
                client.set_tag(run.info.run_id, "superseded", "force=true re-ran this key")
            elif finished is None:
                finished = run.info.run_id
    return finished


def end_killed(client, run_id: str, reason: str) -> None:
    """End an MLflow run as KILLED, with why in its ``killed_reason`` tag."""
    client.set_tag(run_id, "killed_reason", reason)
    client.set_terminated(run_id, status="KILLED")


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
    bos = ev.bos or {}
    tags["add_bos_token"] = str(bos.get("add_bos_token"))
    tags["double_bos"] = str(bos.get("double_bos"))
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
        if rec.perf is not None:
            mlflow.log_metrics(perf_metrics(rec.perf))
            mlflow.set_tags(perf_tags(rec.perf))
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
        out[f"perf/{name}"] = m["median"]
        out[f"perf/{name}_spread"] = m["spread"]
    if perf.peak_memory_gb is not None:
        out[f"perf/peak_{perf.memory_kind}_gb"] = perf.peak_memory_gb
    return out


def perf_tags(perf) -> dict[str, str]:
    if not perf.measured:
        return {"perf": f"not measured: {perf.reason}"}
    return {"perf": f"{perf.settings.num_prompts} x {perf.input_len}+{perf.output_len} tokens, {perf.workload}"}


def log_perf(cfg: TrackingConfig, rec: RunRecord) -> None:
    """A serving cost measured for a run logged earlier: onto that MLflow run."""
    import mlflow

    connect(mlflow, cfg)
    client = mlflow.MlflowClient()
    for name, value in perf_metrics(rec.perf).items():
        client.log_metric(rec.mlflow_run_id, name, value)
    for name, value in perf_tags(rec.perf).items():
        client.set_tag(rec.mlflow_run_id, name, value)
    if "perf" in rec.stages:
        client.log_metric(rec.mlflow_run_id, "time/perf_s", rec.stages["perf"])


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


def log_failure(cfg: TrackingConfig, rec: FailureRecord, force: bool = False) -> str:
    """A FAILED MLflow run holding the error and the logs of the job."""
    import mlflow

    exp_id = connect(mlflow, cfg)
    settle_earlier_runs(mlflow, exp_id, rec.key, force)
    tags = {**_identity_tags(rec), **_parent_tag(rec), "eval_backend": rec.backend}
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


# ---------------------------------------------------------------- a sweep's parent run

PARENT_FILE = "mlflow_parent.json"  # in the sweep's folder: the parent run every job nests under
SWEEP_TAG = "autoround_exp.sweep"


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
        name = " ".join(["sweep", sweep_id, *overrides])
        tags = {SWEEP_TAG: "true", "sweep_id": sweep_id, "overrides": " ".join(overrides)}
        tags["git_commit"] = git_commit() or "unknown"
        tags[OWNER_TAG] = owner()
        run_id = client.create_run(exp_id, tags=tags, run_name=name).info.run_id
    except Exception as e:
        print(f"WARNING: no MLflow parent run for this sweep ({type(e).__name__}: {str(e)[:200]})", flush=True)
        return None
    from autoround_exp.store import write_atomic

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


def close_sweep(cfg: TrackingConfig, run_id: str, outcomes: list[dict], results_md: str | None, failed: int) -> None:
    """End the sweep's parent run: its results table (markdown and an MLflow table), the runs
    it reused from earlier sweeps (linked by id, not logged again), and FINISHED or FAILED."""
    import mlflow
    import pandas as pd

    connect(mlflow, cfg)
    client = mlflow.MlflowClient()
    by_key: dict[str, list[dict]] = {}
    for o in outcomes:
        by_key.setdefault(o["key"], []).append(o)
    status = {}  # per run: done if any job computed it, else failed if one failed, else reused
    for key, seen in by_key.items():
        first = next(s for s in ("done", "failed", "reused") if any(o["status"] == s for o in seen))
        status[key] = next(o for o in seen if o["status"] == first)
    reused = sorted(o["mlflow_run_id"] for o in status.values() if o["status"] == "reused" and o["mlflow_run_id"])
    client.set_tag(run_id, "reused_run_ids", ",".join(reused))
    for name in ("done", "reused", "failed"):
        client.log_metric(run_id, f"sweep/{name}_runs", sum(o["status"] == name for o in status.values()))
    if results_md:
        client.log_text(run_id, results_md, "results.md")
        rows = markdown_rows(results_md)
        if rows:
            client.log_table(run_id, pd.DataFrame(rows), "results_table.json")
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def markdown_rows(md: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``md``, keyed by its header."""
    lines = [line.strip() for line in md.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None or start + 1 >= len(lines):
        return []

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split("|")]

    header = [h or f"column {i}" for i, h in enumerate(cells(lines[start]))]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, cells(line), strict=False)))
    return rows


# ---------------------------------------------------------------- at the door, and later


# Servers that answered in this process: a sweep's jobs (validated at its door, then each as
# it starts) ask once. A server that stops later costs no work: its runs are kept as pending.
_ANSWERED: set[str] = set()


def check_reachable(cfg: TrackingConfig, timeout_s: float = 5) -> str | None:
    """None if the tracking store answers, else what is wrong. One request to an HTTP server's
    /health (seconds), before any work: a finished job never waits on a server that is down."""
    if not cfg.enabled or not cfg.uri.startswith(("http://", "https://")) or cfg.uri in _ANSWERED:
        return None
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(cfg.uri)
    # /health needs no credentials; urllib would take user:password@ for a port
    url = urllib.parse.urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""), "", "", ""))
    url = url + parts.path.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - the user's own server
            if resp.status == 200:
                _ANSWERED.add(cfg.uri)
                return None
            return f"answered {resp.status}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return redact_uri(str(getattr(e, "reason", e)))


def sync(results: Path, cfg: TrackingConfig) -> tuple[int, int]:
    """Log every pending record in ``results`` exactly once; (logged, still pending)."""
    from autoround_exp import record
    from autoround_exp.store import Store, write_atomic

    store = Store(results)
    logged = failed = 0
    for path in store.pending():
        data = json.loads(path.read_text())
        try:
            if data.get("status") == "failed":
                rec = record.FailureRecord.model_validate(data)
                run_id = log_failure(cfg, rec)
            else:
                rec = record.from_dict(data)
                run_id = log_run(cfg, rec, store.samples_of(rec.key))
        except Exception as e:
            print(f"[pending] {path.name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            failed += 1
            continue
        rec.tracking = Tracking(status="logged", run_id=run_id, parent_run_id=rec.tracking.parent_run_id)
        write_atomic(path, rec.to_json())
        print(f"[logged] {path.name} mlflow_run={run_id}", flush=True)
        logged += 1
    return logged, failed


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m autoround_exp.tracking",
        description="sync: log to MLflow every stored run that could not be logged when it finished.",
    )
    p.add_argument("command", choices=["sync"])
    p.add_argument("--results", default="results", help="results folder run.py wrote (default: results)")
    p.add_argument("--uri", default=TrackingConfig.uri, help=f"MLflow tracking URI (default: {TrackingConfig.uri})")
    p.add_argument("--experiment", default=TrackingConfig.experiment, help="MLflow experiment name")
    args = p.parse_args(argv)
    cfg = TrackingConfig(uri=args.uri, experiment=args.experiment)
    if (problem := check_reachable(cfg)) is not None:
        print(f"autoround-exp tracking: {redact_uri(cfg.uri)} does not answer ({problem}); start it first.")
        return 2
    logged, failed = sync(Path(args.results), cfg)
    print(f"[sync] {logged} logged, {failed} still pending")
    return 1 if failed else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
