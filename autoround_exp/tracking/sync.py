"""``python -m autoround_exp.tracking sync``: log every stored run that could not be logged
when it finished, exactly once."""

from __future__ import annotations

from pathlib import Path

from autoround_exp.config import TrackingConfig, redact_uri
from autoround_exp.fsutil import write_atomic
from autoround_exp.record import Tracking
from autoround_exp.tracking.runs import log_failure, log_run
from autoround_exp.tracking.store import check_reachable


def sync(results: Path, cfg: TrackingConfig) -> tuple[int, int]:
    """Log every pending record in ``results`` exactly once; (logged, still pending)."""
    from autoround_exp import record
    from autoround_exp.store import Store

    store = Store(results)
    logged = failed = 0
    for path in store.pending():
        rec = record.load_any(path)
        try:
            if isinstance(rec, record.FailureRecord):
                run_id = log_failure(cfg, rec)
            else:
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
