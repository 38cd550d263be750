"""The MLflow store: where it is, whether it answers, the experiment, and the helpers every
logging module shares. MLflow itself is imported by the callers, inside their functions."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from autoround_exp.config import TrackingConfig, redact_uri
from autoround_exp.fsutil import locked

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


def end_killed(client, run_id: str, reason: str) -> None:
    """End an MLflow run as KILLED, with why in its ``killed_reason`` tag."""
    client.set_tag(run_id, "killed_reason", reason)
    client.set_terminated(run_id, status="KILLED")


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
