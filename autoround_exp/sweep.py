"""A ``-m`` sweep's lifecycle, in one place: what happens as it starts, as each job runs, and as
it ends or is stopped. Hydra calls ``SweepLifecycle`` (conf/config.yaml's callback); run.py
calls the job hooks.

- start: every job's config validated at the door (a typo in the last value does not surface
  after hours of quantization), the job total for the progress display, the MLflow parent run;
- each job: nested under the parent run; its outcomes written as the sweep's job status
  (``jobstatus``); a job stopped by SIGTERM or Ctrl-C ends the parent run KILLED;
- end: the report (results/report.md, plots, the README block), the console summary (the
  results table of the runs the sweep touched, then done / reused / failed per run), the
  parent run closed with that table's rows, and exit status 1 if a run failed: every other
  job still ran and is stored.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from autoround_exp import jobstatus, slurm
from autoround_exp.config import ConfigError, ReportConfig, TrackingConfig
from autoround_exp.progress import duration, write_total

# What says where a sweep writes, not what it varies: left out of the parent run's name.
WHERE = ("paths.", "tracking.", "report.", "hydra.")


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The override list of each job, expanded as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def tracking_of(config: DictConfig) -> TrackingConfig:
    return TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))


def check_gpus_fit(config: DictConfig, n_jobs: int) -> None:
    gpus, batch = config.get("gpus"), config.hydra.sweeper.get("max_batch_size")
    parallel = "submitit" in str(config.hydra.launcher.get("_target_", "")).lower()
    if gpus and parallel and n_jobs > len(gpus) and (batch is None or batch > len(gpus)):
        raise ConfigError(
            f"gpus={list(gpus)} gives one GPU to each of {len(gpus)} jobs at a time, but "
            f"hydra.sweeper.max_batch_size={batch} would start more of the {n_jobs} jobs together; "
            f"set hydra.sweeper.max_batch_size={len(gpus)}."
        )


def check_launcher(config: DictConfig) -> None:
    """A Slurm sweep's settings against what the cluster's partition has (``slurm.check_settings``)."""
    if config.hydra.launcher.get("_target_") == slurm.TARGET:
        slurm.check_settings(config.hydra.launcher)


def validate_jobs(jobs: list[tuple[list[str], DictConfig]]) -> None:
    """Every job's config first (fast), then what the serve environment can run (probed once)."""
    from autoround_exp.preflight import at_the_door, validate

    for serve_env in (False, True):
        for overrides, cfg in jobs:
            try:
                exp = validate(cfg, serve_env=serve_env)
                if serve_env:
                    at_the_door(exp)
            except ConfigError as e:
                raise ConfigError(f"job [{' '.join(overrides)}]: {e}") from e


def start(config: DictConfig, config_name: str | None) -> None:
    from hydra import compose

    from autoround_exp.tracking import open_sweep

    # a config folder the user added (hydra.searchpath=[file://...]: their own stack=, model=) composes too
    searchpath = [o for o in config.hydra.overrides.hydra if o.startswith("hydra.searchpath")]
    jobs = [(o, compose(config_name=config_name, overrides=[*searchpath, *o])) for o in job_overrides(config)]
    try:
        check_gpus_fit(config, len(jobs))
        check_launcher(config)
        validate_jobs(jobs)
    except ConfigError as e:
        print(f"autoround-exp: {e}", file=sys.stderr)
        sys.exit(2)
    sweep_dir = Path(config.hydra.sweep.dir)
    write_total(sweep_dir, len(jobs))  # job k/N in the progress display: each job knows only its own number
    named = [o for o in config.hydra.overrides.task if not o.lstrip("+~").startswith(WHERE)]
    open_sweep(tracking_of(config), sweep_dir, sweep_dir.name, named)


# ---------------------------------------------------------------- each job (run.py)


def gpu_of_job(job_num: int, gpus: list[int] | None) -> str | None:
    """The CUDA_VISIBLE_DEVICES of sweep job ``job_num``: jobs take turns on ``gpus``, one GPU each."""
    return None if gpus is None else str(gpus[job_num % len(gpus)])


def job_parent(sweep_dir: str) -> str | None:
    """The sweep's MLflow run: the job's runs nest under it."""
    from autoround_exp.tracking import sweep_parent

    return sweep_parent(sweep_dir)


def job_stopped(tracking: TrackingConfig, parent: str | None, job_num: int, err: BaseException) -> None:
    """A job stopped by Ctrl-C or SIGTERM in the sweep's own process: the sweep's MLflow run ends
    KILLED, not RUNNING. A job of its own (submitit, Slurm) stopped so leaves the sweep to go on: the
    launcher records it (``job_ended``)."""
    if parent is None or slurm.in_scheduler_job():
        return
    from autoround_exp.tracking import kill_sweep

    why = "Ctrl-C" if isinstance(err, KeyboardInterrupt) else f"exit {getattr(err, 'code', '?')} (SIGTERM: 143)"
    kill_sweep(tracking, parent, f"the sweep was stopped during job {job_num}: {why}")


def job_finished(sweep_dir: str, job_num: int, overrides: list[str], outcomes: list, started: float) -> None:
    jobstatus.write(sweep_dir, job_num, overrides, outcomes, started)


class JobEnded(RuntimeError):
    """The scheduler ended a job before it returned (the launcher's reason)."""


def job_ended(sweep_dir: str, job_num: int, overrides: list[str], cfg: DictConfig, reason: str, started: float) -> None:
    """A job that ended without returning (Slurm cancelled it or ended it at its time limit, its
    node failed): its run recorded as failed with the scheduler's reason, unless the job wrote its
    own status first. Runs it stored before it ended stay stored; a rerun reuses them."""
    if (Path(sweep_dir) / jobstatus.JOBS / f"{job_num}.json").is_file():
        return
    from autoround_exp.pipeline import failed_unrun
    from autoround_exp.preflight import validate

    try:
        exp = validate(cfg)
    except ConfigError:  # the tracking server gone meanwhile: recorded on disk all the same
        exp = validate(cfg, serve_env=False)
    outcomes = failed_unrun(exp, Path(sweep_dir).name, JobEnded(reason), job_parent(sweep_dir), started, cause="slurm")
    jobstatus.write(sweep_dir, job_num, overrides, outcomes, started)


# ---------------------------------------------------------------- end


def report_config(config: DictConfig) -> ReportConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ReportConfig), config.report))


def report(config: DictConfig) -> int:
    """The report from the stored runs (its exit status: 4 for a stack regression that
    report.fail_on_regression asks about). The runs are stored whatever happens here: a failing
    report never loses a result, and `python -m autoround_exp.report` retries it."""
    from autoround_exp.report.generate import generate
    from autoround_exp.tracking import sweep_parent

    tracking = config.tracking
    try:
        return generate(
            report_config(config),
            Path(config.paths.results),
            log_to=tracking.uri if tracking.enabled else None,
            experiment=tracking.experiment,
            run_id=sweep_parent(config.hydra.sweep.dir),  # the sweep's own run, else the report run
        )
    except Exception as e:
        print(
            f"autoround-exp report failed ({type(e).__name__}: {e}); rerun `python -m autoround_exp.report` once fixed",
            flush=True,
        )
        return 0


def touched_keys(sweep_dir: Path) -> set[str]:
    """Run keys of every finished (done or reused) run of the sweep's jobs."""
    return {o.key for job in jobstatus.read(sweep_dir) for o in job.outcomes if o.status != "failed"}


def results_table(config: DictConfig, keys: set[str]) -> tuple[str, list[dict]] | None:
    """The compact results table of the runs in ``keys``, as the README shows them, and its rows."""
    from autoround_exp.report import compact, runs, tables

    if not keys:
        return None
    report = report_config(config)
    thresholds = tables.Thresholds(report.recovery_threshold, dict(report.recovery_thresholds))
    secs = runs.sections(runs.from_store(config.paths.results))
    block, _ = compact.render_block(
        secs, thresholds, report.alpha, None, Path("."), "this sweep", keys=keys, details=False
    )
    rows = [row for s in secs if (cs := compact.compact(s, thresholds, report.alpha, keys)) for row in cs.row_dicts()]
    return block.split("\n", 1)[1].strip(), rows  # the block without its generated-by comment


def stack_lines(config: DictConfig) -> str | None:
    """The configs that regressed between software stacks, under the summary (none: nothing)."""
    from autoround_exp.report.generate import stack_regressions

    try:
        lines = stack_regressions(Path(config.paths.results), report_config(config).alpha)
    except Exception as e:  # the runs are stored; `python -m autoround_exp.report` says it again
        return f"[sweep] stack comparison failed: {type(e).__name__}: {e}"
    return "\n".join(["[sweep] stack regressions:", *(f"  {line}" for line in lines)]) if lines else None


def summarize(sweep_dir: Path, now: float | None = None) -> tuple[str, int]:
    """The summary text and the number of failed runs. A run several jobs share (a baseline)
    counts once (``jobstatus.settle``). With ``now``: the sweep's wall time too, from its
    first job's start to ``now``."""
    jobs = jobstatus.read(sweep_dir)
    settled = jobstatus.settle(jobs)
    counts = {s: sum(r.status == s for r in settled.values()) for s in jobstatus.STATUSES}
    failed_lines = []
    for run in settled.values():
        if run.status == "failed":
            overrides, error = run.failures[0]
            failed_lines.append(f"  FAILED {run.outcome.name} [{' '.join(overrides)}]: {error}")
    head = f"[sweep] {counts['done']} done, {counts['reused']} reused, {counts['failed']} failed"
    if now is not None and jobs:
        head += f" in {duration(now - min(j.started for j in jobs))} wall time"
    return "\n".join([head, *failed_lines]), counts["failed"]


def close_parent(config: DictConfig, sweep_dir: Path, table: str | None, rows: list[dict], failed: int) -> None:
    """The sweep's MLflow parent run gets the results table and ends (FAILED if a run failed)."""
    from autoround_exp.tracking import close_sweep, sweep_parent

    parent = sweep_parent(sweep_dir)
    if parent is None:
        return
    try:
        settled = jobstatus.settle(jobstatus.read(sweep_dir))
        close_sweep(tracking_of(config), parent, settled, table, failed, rows=rows)
    except Exception as e:  # the runs are stored and logged; only the sweep's summary run is short
        print(f"WARNING: ending the sweep's MLflow run {parent} failed: {type(e).__name__}: {e}", flush=True)


def end(config: DictConfig) -> tuple[int, bool]:
    """Report, summary, parent run closed; the number of failed runs, and whether a config
    regressed between stacks where report.fail_on_regression asks (the report printed which)."""
    regressed = False
    if config.report.on_sweep_end:
        regressed = report(config) == 4
    sweep_dir = Path(config.hydra.sweep.dir)
    table, rows = None, []
    try:
        table, rows = results_table(config, touched_keys(sweep_dir)) or (None, [])
    except Exception as e:  # the runs are stored; `python -m autoround_exp.report` shows them
        table = f"(results table failed: {type(e).__name__}: {e})"
    text, failed = summarize(sweep_dir, now=time.time())
    print("\n".join(t for t in (table, text, stack_lines(config)) if t), flush=True)
    close_parent(config, sweep_dir, table, rows, failed)
    return failed, regressed


class SweepLifecycle(Callback):
    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        start(config, config_name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed, regressed = end(config)
        if failed:
            print("autoround-exp: some runs failed; their logs are in results/failed/ and MLflow", file=sys.stderr)
        if regressed:
            print("autoround-exp: a config regressed between stacks (report.fail_on_regression=true)", file=sys.stderr)
        if failed or regressed:
            sys.exit(1)
