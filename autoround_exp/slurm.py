"""Sweeps as Slurm jobs (``launcher=submitit_slurm``): what the door checks of the cluster settings,
the job's side of what Slurm does to it, and the launcher that waits for every job.

- the door: the settings a cluster user sets (partition, time, CPUs, memory, GPUs per job, array
  parallelism, setup lines) against what ``sinfo`` says the partition's nodes have, before any
  job is submitted;
- each job: Slurm ends a job with SIGTERM (``scancel``, its time limit, ``scontrol requeue``, a
  pre-emption); the job then exits at once without writing a result, so that submitit never reads a
  half-done job as finished and a requeued job simply runs again (stored runs are reused);
- the launcher: hydra-submitit's, except that one job Slurm ended does not end the sweep: it
  waits for every job, and records each that returned nothing as failed with Slurm's own state
  (``sacct``: ``CANCELLED by 0``, ``TIMEOUT`` with the limit, ``OUT_OF_MEMORY``, ``NODE_FAIL``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import DictConfig, OmegaConf, open_dict

from autoround_exp.config import ConfigError

# conf/launcher/submitit_slurm.yaml's hydra.launcher._target_ (Hydra takes launchers from hydra_plugins only)
TARGET = "hydra_plugins.autoround_exp_launcher.SlurmLauncher"


# How often the launcher asks sacct about the sweep's jobs (one call for all of them) while it
# waits: submitit alone asks every 10 minutes once a job is old, so a job Slurm ended would be
# seen that late; the result file of a job that returned is looked for every second.
SACCT_EVERY_S = 20


@dataclass(frozen=True)
class Partition:
    """What ``sinfo`` says of a partition: the most any one of its nodes has."""

    name: str
    default: bool
    cpus: int
    memory_mb: int
    gpus: int
    max_minutes: int | None  # None: no limit


def minutes(limit: str) -> int | None:
    """Slurm's time format (``infinite``, ``30``, ``1:00:00``, ``2-12:00:00``) in minutes."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def gpus_of(gres: str) -> int:
    """GPUs in a gres string (``gpu:4``, ``gpu:h100:8(S:0-1)``, ``(null)``): 0 without."""
    return sum(int(n) for n in re.findall(r"gpu(?::[\w.-]+)?:(\d+)", gres or ""))


def partitions(sinfo: str | None = None) -> dict[str, Partition]:
    """The cluster's partitions, from ``sinfo`` (or its output, for tests)."""
    if sinfo is None:
        done = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%G|%l"], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise ConfigError(f"launcher=submitit_slurm: sinfo failed ({done.stderr.strip()}); is slurmctld up?")
        sinfo = done.stdout
    found: dict[str, Partition] = {}
    for line in sinfo.splitlines():
        if line.count("|") != 4:
            continue
        name, cpus, memory, gres, limit = line.split("|")
        p = Partition(
            name.rstrip("*"),
            name.endswith("*"),
            int(cpus.rstrip("+")),
            int(memory.rstrip("+")),
            gpus_of(gres),
            minutes(limit),
        )
        if (old := found.get(p.name)) is not None:  # nodes of several sizes: the largest of each
            p = Partition(
                p.name,
                p.default,
                max(p.cpus, old.cpus),
                max(p.memory_mb, old.memory_mb),
                max(p.gpus, old.gpus),
                p.max_minutes,
            )
        found[p.name] = p
    return found


def gpus_per_job(launcher: DictConfig) -> int:
    """The GPUs one job asks for on its node, whichever of the launcher's ways it asks them."""
    asked = [launcher.get("gpus_per_node") or 0, gpus_of(launcher.get("gres") or "")]
    if launcher.get("gpus_per_task"):
        asked.append(launcher.gpus_per_task * (launcher.get("tasks_per_node") or 1))
    return max(asked)


def check_settings(launcher: DictConfig, sinfo: str | None = None) -> None:
    """The sweep's Slurm settings against the cluster, before any job is submitted. Raises
    ``ConfigError`` saying what to set."""
    if sinfo is None and shutil.which("sinfo") is None:
        raise ConfigError(
            "launcher=submitit_slurm needs Slurm's commands (sbatch, sinfo, sacct) on PATH: run the sweep on "
            "the cluster's login node, or choose launcher=submitit_local."
        )
    if (launcher.get("max_num_timeout") or 0) > 0:
        raise ConfigError(
            f"hydra.launcher.max_num_timeout={launcher.max_num_timeout}: jobs do not checkpoint mid-run, so one "
            "requeued at its time limit would only start over; set it to 0 (a job ended at its limit is recorded "
            "as timed out, and a rerun with a longer hydra.launcher.timeout_min reuses every run it stored)."
        )
    if (launcher.get("array_parallelism") or 0) < 1:
        raise ConfigError("hydra.launcher.array_parallelism must be at least 1 (jobs of the array that run at once).")
    parts = partitions(sinfo)
    name = launcher.get("partition")
    part = parts.get(name) if name else next((p for p in parts.values() if p.default), None)
    if part is None:
        raise ConfigError(
            f"hydra.launcher.partition={name} is not a partition of this cluster; "
            f"choose one of {', '.join(parts) or 'none'}" + ("" if name else " (the cluster has no default partition)")
        )
    where = f"a node of partition {part.name}"
    gpus = gpus_per_job(launcher)
    if gpus > part.gpus:
        raise ConfigError(
            f"each job asks for {gpus} GPU(s) (hydra.launcher.gpus_per_node / gres / gpus_per_task), but {where} has "
            f"{part.gpus}; set hydra.launcher.gpus_per_node={part.gpus} or choose a partition with GPUs."
        )
    cpus = (launcher.get("cpus_per_task") or 1) * (launcher.get("tasks_per_node") or 1)
    if cpus > part.cpus:
        raise ConfigError(
            f"each job asks for {cpus} CPUs, but {where} has {part.cpus}; set hydra.launcher.cpus_per_task={part.cpus}."
        )
    mem_gb = launcher.get("mem_gb")
    if mem_gb and mem_gb * 1024 > part.memory_mb:
        raise ConfigError(
            f"hydra.launcher.mem_gb={mem_gb} is more than {where} has ({part.memory_mb} MB); "
            f"set hydra.launcher.mem_gb={part.memory_mb // 1024} or less."
        )
    limit = launcher.get("timeout_min")
    if part.max_minutes is not None and limit and limit > part.max_minutes:
        raise ConfigError(
            f"hydra.launcher.timeout_min={limit} is over partition {part.name}'s time limit ({part.max_minutes} min); "
            f"set hydra.launcher.timeout_min={part.max_minutes} or less."
        )


# ---------------------------------------------------------------- each job


def in_scheduler_job() -> bool:
    """Whether this process is a job a submitit launcher started (not the sweep's own process)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def job_id() -> str:
    """This Slurm job's id as squeue and sacct show it (``12_3`` for a job of an array)."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '?')}"
    return env.get("SLURM_JOB_ID", "?")


def _ended_by_slurm(signum, frame):
    print(f"[slurm] job {job_id()}: Slurm ended it (SIGTERM); exiting", flush=True)
    sys.exit(128 + signum)  # unwinds: the children end with us; no result is written


def on_job_start() -> None:
    """In a Slurm job: SIGTERM exits at once (submitit's own handler would let the job run on and
    report a half-done job as finished). The job has no checkpoint to take before its time limit:
    it runs on to the limit. So the launcher asks Slurm for SIGURG there, not submitit's SIGUSR2,
    which reaches every process of the job (a quantization child dies of it), and for a limit
    shorter than ``signal_delay_s`` comes at once, before any handler is set; SIGUSR2, if a user
    asks for it, is ignored here and in the children (an ignored signal stays so across exec)."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        signal.signal(signal.SIGTERM, _ended_by_slurm)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)


# ---------------------------------------------------------------- the launcher


def why_ended(state: str, job_id: str, limit: str, timeout_min: Any, mem_gb: Any) -> str:
    """Slurm's reason a job ended without a result, as a person reads it (``limit``: sacct's
    Timelimit, which an administrator or ``scontrol update`` may have changed since submission)."""
    if state.startswith("TIMEOUT"):
        return (
            f"Slurm ended job {job_id} at its time limit, {limit} ({state}; the sweep asked "
            f"hydra.launcher.timeout_min={timeout_min})"
        )
    if state.startswith("CANCELLED"):
        return f"Slurm cancelled job {job_id} ({state}: scancel, or an administrator)"
    if state.startswith("OUT_OF_MEMORY"):
        return f"Slurm ended job {job_id} over its memory ({state}: hydra.launcher.mem_gb={mem_gb})"
    return f"Slurm ended job {job_id} before it returned ({state})"


def accounting(job_id: str) -> dict[str, str]:
    """sacct's State and Timelimit of a job ({} where sacct does not answer)."""
    done = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,Timelimit"], capture_output=True, text=True, timeout=60
    )
    lines = [ln.split("|") for ln in done.stdout.splitlines() if ln.count("|") == 1]
    return dict(zip(("State", "Timelimit"), lines[-1], strict=True)) if done.returncode == 0 and lines else {}


class WaitingSlurmLauncher(submitit_launcher.SlurmLauncher):
    """hydra-submitit's Slurm launcher that waits for every job: a job that returns nothing is
    recorded as failed with Slurm's reason (``job_ended``), and the sweep goes on."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        executor = submitit.AutoExecutor(
            cluster="slurm", folder=self.params["submitit_folder"], slurm_max_num_timeout=self.params["max_num_timeout"]
        )
        base = set(OmegaConf.structured(submitit_launcher.BaseQueueConf).keys())
        own = {"submitit_folder", "max_num_timeout"}
        params = {k: v for k, v in self.params.items() if k not in own}
        # the signal submitit asks before the time limit: SIGURG, which every process ignores (see
        # on_job_start); a user's own hydra.launcher.additional_parameters.signal is kept
        extra = dict(params.get("additional_parameters") or {})
        params["additional_parameters"] = {"signal": f"URG@{params['signal_delay_s']}", **extra}
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from hydra.core.singleton import Singleton

        nums = range(initial_job_idx, initial_job_idx + len(job_overrides))
        args = [
            (list(o), "hydra.sweep.dir", n, f"job_id_for_{n}", Singleton.get_state())
            for o, n in zip(job_overrides, nums, strict=True)
        ]
        submitted = time.time()
        jobs = executor.map_array(self, *zip(*args, strict=True))
        print(
            f"[slurm] submitted {len(jobs)} job(s): {', '.join(j.job_id for j in jobs)} ({executor.folder})", flush=True
        )
        return [self._wait(job, list(o), n, submitted) for job, o, n in zip(jobs, job_overrides, nums, strict=True)]

    def _wait(self, job, overrides: list[str], num: int, submitted: float) -> JobReturn:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        checked = time.monotonic()
        while not job.done():  # the result file, every second; Slurm's state, every SACCT_EVERY_S
            time.sleep(1)
            if time.monotonic() - checked > SACCT_EVERY_S:
                job.done(force_check=True)
                checked = time.monotonic()
        try:
            return job.results()[0]
        except UncompletedJobError as err:  # the job never returned, or (FailedJobError) raised
            facts = accounting(job.job_id)
            state = facts.get("State") or job.state
            limit = facts.get("Timelimit", "not known")
            reason = why_ended(state, job.job_id, limit, self.params.get("timeout_min"), self.params.get("mem_gb"))
            if isinstance(err, FailedJobError):
                reason += f": {(str(err).strip().splitlines() or [''])[-1]}"
            reason += f"; its output: {job.paths.stdout}"
            print(f"[slurm] {reason}", flush=True)
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(cfg):
                del cfg["hydra"]  # the job's own config, as run.py gets it
            self.job_ended(num, overrides, cfg, reason, submitted)
            return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=None)

    def job_ended(self, num: int, overrides: list[str], cfg: DictConfig, reason: str, submitted: float) -> None:
        """Record job ``num``, which Slurm ended before it returned: the plugin's
        (``hydra_plugins.autoround_exp_launcher``) hands it to the sweep's lifecycle."""
        raise NotImplementedError
