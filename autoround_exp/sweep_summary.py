"""What each job of a ``-m`` sweep did (done / reused / failed), told once the sweep ends.

Each job writes a small status file into the sweep's folder, so jobs that ran in other
processes (submitit) count too. The summary prints after the report, and the sweep exits
with status 1 if any job failed: every other job still ran and is stored.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

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


def summarize(sweep_dir: Path) -> tuple[str, int]:
    """The summary text and the number of failed runs. A run several jobs share (a baseline)
    counts once: done if any job computed it, else failed if one failed, else reused."""
    runs: dict[str, dict] = {}
    for path in sorted((sweep_dir / JOBS).glob("*.json"), key=lambda p: int(p.stem)):
        job = json.loads(path.read_text())
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
    return "\n".join([head, *failed_lines]), counts["failed"]


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        text, failed = summarize(Path(config.hydra.sweep.dir))
        print(text, flush=True)
        if failed:
            print("autoround-exp: some runs failed; their logs are in results/failed/ and MLflow", file=sys.stderr)
            sys.exit(1)
