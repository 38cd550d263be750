"""What each job of a ``-m`` sweep did, as the files it leaves in the sweep's folder: typed,
written and read here only. Jobs that ran in other processes (submitit, Slurm) count too.
The progress display, the end-of-sweep summary and the sweep's MLflow parent run all read
them, and settle a run several jobs shared with one precedence: done > failed > reused."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autoround_exp.fsutil import write_atomic

JOBS = "jobs"  # the folder, under the sweep's, of one <job number>.json per finished job
STATUSES = ("done", "failed", "reused")  # a run's status across jobs: the first that any job has


@dataclass
class Outcome:
    """One run of a job (the job's own, or a baseline it made sure of)."""

    name: str
    key: str
    status: str  # done | reused | failed
    metrics: dict
    mlflow_run_id: str | None
    record_path: str  # the error, for a failed one
    seconds: float | None = None  # what computing it took (None: reused)
    label: str | None = None  # the config as a person reads it: "W4A16 RTN", "base (unquantized)"
    backend: str | None = None


@dataclass
class JobStatus:
    num: int
    overrides: list[str]
    outcomes: list[Outcome]
    pid: int
    started: float
    ended: float

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class SettledRun:
    """A run as the sweep counts it, with the jobs that failed it (their overrides and error)."""

    outcome: Outcome
    failures: list[tuple[list[str], str]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.outcome.status


def write(sweep_dir: str | Path, num: int, overrides: list[str], outcomes: list[Outcome], started: float) -> Path:
    status = JobStatus(num, list(overrides), list(outcomes), os.getpid(), started, time.time())
    path = Path(sweep_dir) / JOBS / f"{num}.json"
    write_atomic(path, json.dumps(asdict(status), indent=2))
    return path


def read(sweep_dir: str | Path) -> list[JobStatus]:
    """The finished jobs of the sweep, by job number; a file being written or damaged is skipped."""
    jobs = []
    for path in (Path(sweep_dir) / JOBS).glob("*.json"):
        try:
            data = json.loads(path.read_text())
            outcomes = [Outcome(**o) for o in data["outcomes"]]
            jobs.append(
                JobStatus(
                    int(path.stem),
                    data["overrides"],
                    outcomes,
                    data["pid"],
                    float(data["started"]),
                    float(data["ended"]),
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(jobs, key=lambda j: j.num)


def settle(jobs: list[JobStatus]) -> dict[str, SettledRun]:
    """One entry per run key: done if any job computed it, else failed if one failed, else reused."""
    seen: dict[str, list[tuple[JobStatus, Outcome]]] = {}
    for job in jobs:
        for o in job.outcomes:
            seen.setdefault(o.key, []).append((job, o))
    settled = {}
    for key, pairs in seen.items():
        status = next(s for s in STATUSES if any(o.status == s for _, o in pairs))
        first = next(o for _, o in pairs if o.status == status)
        failures = [(job.overrides, o.record_path) for job, o in pairs if o.status == "failed"]
        settled[key] = SettledRun(first, failures)
    return settled
