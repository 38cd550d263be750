"""Log stage: MLflow. ``store`` (where, whether it answers, the experiment), ``runs`` (one run
per job, from its record), ``sweep`` (the sweep's parent run), ``sync`` (pending records).
The names below are the stage's API, as callers use it."""

from autoround_exp.tracking.runs import log_added, log_failure, log_or_defer, log_run, prepare
from autoround_exp.tracking.store import check_reachable, connect, flatten
from autoround_exp.tracking.sweep import (
    OWNER_TAG,
    PARENT_FILE,
    SWEEP_TAG,
    close_sweep,
    end_dead_sweeps,
    kill_sweep,
    open_sweep,
    owner,
    sweep_parent,
)
from autoround_exp.tracking.sync import main, sync

__all__ = [
    "OWNER_TAG",
    "PARENT_FILE",
    "SWEEP_TAG",
    "check_reachable",
    "close_sweep",
    "connect",
    "end_dead_sweeps",
    "flatten",
    "kill_sweep",
    "log_added",
    "log_failure",
    "log_or_defer",
    "log_run",
    "main",
    "open_sweep",
    "owner",
    "prepare",
    "sweep_parent",
    "sync",
]
