"""What a ``-m`` sweep found and what each job did, told once the sweep ends.

Each job writes a small status file into the sweep's folder, so jobs that ran in other
processes (submitit) count too. The summary prints after the report: the short results
table of the runs the sweep touched (the README's renderer), then done / reused / failed
per run; the sweep exits with status 1 if any job failed: every other job still ran and
is stored.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

JOBS = "jobs"


def record_job(sweep_dir: str, num: int, overrides: list[str], outcomes: list, started: float) -> None:
    import os
    import time

    from autoround_exp.store import write_atomic

    status = {
        "overrides": overrides,
        "outcomes": [asdict(o) for o in outcomes],
        "pid": os.getpid(),
        "started": started,
        "ended": time.time(),
    }
    write_atomic(Path(sweep_dir) / JOBS / f"{num}.json", json.dumps(status, indent=2))


def touched_keys(sweep_dir: Path) -> set[str]:
    """Run keys of every finished (done or reused) run of the sweep's jobs."""
    keys = set()
    for path in (sweep_dir / JOBS).glob("*.json"):
        keys |= {o["key"] for o in json.loads(path.read_text())["outcomes"] if o["status"] != "failed"}
    return keys


def results_table(config: DictConfig, keys: set[str]) -> str | None:
    """The compact results table of the runs in ``keys``, as the README shows them."""
    from autoround_exp.config import ReportConfig
    from autoround_exp.report import compact, runs, tables

    if not keys:
        return None
    report = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ReportConfig), config.report))
    thresholds = tables.Thresholds(report.recovery_threshold, dict(report.recovery_thresholds))
    loaded = runs.from_store(config.paths.results)
    block, _ = compact.render_block(
        runs.sections(loaded), thresholds, report.alpha, None, Path("."), "this sweep", keys=keys, details=False
    )
    return block.split("\n", 1)[1].strip()  # without the generated-by comment


def summarize(sweep_dir: Path, now: float | None = None) -> tuple[str, int]:
    """The summary text and the number of failed runs. A run several jobs share (a baseline)
    counts once: done if any job computed it, else failed if one failed, else reused. With
    ``now``: the sweep's wall time too, from its first job's start to ``now``."""
    runs: dict[str, dict] = {}
    started = []
    for path in sorted((sweep_dir / JOBS).glob("*.json"), key=lambda p: int(p.stem)):
        job = json.loads(path.read_text())
        started.append(job["started"])
        for o in job["outcomes"]:
            statuses = runs.setdefault(o["key"], {"name": o["name"], "statuses": set(), "failures": []})
            statuses["statuses"].add(o["status"])
            if o["status"] == "failed":
                statuses["failures"].append((job["overrides"], o["record_path"]))
    counts = {"done": 0, "reused": 0, "failed": 0}
    failed_lines = []
    for run in runs.values():
        status = next(s for s in ("done", "failed", "reused") if s in run["statuses"])
        counts[status] += 1
        if status == "failed":
            overrides, error = run["failures"][0]
            failed_lines.append(f"  FAILED {run['name']} [{' '.join(overrides)}]: {error}")
    head = f"[sweep] {counts['done']} done, {counts['reused']} reused, {counts['failed']} failed"
    if now is not None and started:
        from autoround_exp.progress import duration

        head += f" in {duration(now - min(started))} wall time"
    return "\n".join([head, *failed_lines]), counts["failed"]


def close_parent(config: DictConfig, sweep_dir: Path, table: str | None, failed: int) -> None:
    """The sweep's MLflow parent run gets the results table and ends (FAILED if a run failed)."""
    from autoround_exp.config import TrackingConfig
    from autoround_exp.tracking import close_sweep, sweep_parent

    parent = sweep_parent(sweep_dir)
    if parent is None:
        return
    outcomes = [o for path in (sweep_dir / JOBS).glob("*.json") for o in json.loads(path.read_text())["outcomes"]]
    try:
        cfg = TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))
        close_sweep(cfg, parent, outcomes, table, failed)
    except Exception as e:  # the runs are stored and logged; only the sweep's summary run is short
        print(f"WARNING: ending the sweep's MLflow run {parent} failed: {type(e).__name__}: {e}", flush=True)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            table = results_table(config, touched_keys(sweep_dir))
        except Exception as e:  # the runs are stored; `python -m autoround_exp.report` shows them
            table = f"(results table failed: {type(e).__name__}: {e})"
        text, failed = summarize(sweep_dir, now=time.time())
        print("\n".join(t for t in (table, text) if t), flush=True)
        close_parent(config, sweep_dir, table, failed)
        if failed:
            print("autoround-exp: some runs failed; their logs are in results/failed/ and MLflow", file=sys.stderr)
            sys.exit(1)
