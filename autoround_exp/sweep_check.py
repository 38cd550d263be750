"""Validate every job of a ``-m`` sweep before the first one starts, so a typo in the
last value does not surface after hours of quantization; then note how many jobs there are."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The override list of each job, expanded as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


class ValidateSweep(Callback):
    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        from hydra import compose

        from autoround_exp.config import ConfigError, at_the_door, validate
        from autoround_exp.progress import write_total

        jobs = [(o, compose(config_name=config_name, overrides=o)) for o in job_overrides(config)]
        gpus, batch = config.get("gpus"), config.hydra.sweeper.get("max_batch_size")
        parallel = "submitit" in str(config.hydra.launcher.get("_target_", "")).lower()
        if gpus and parallel and len(jobs) > len(gpus) and (batch is None or batch > len(gpus)):
            print(
                f"autoround-exp: gpus={list(gpus)} gives one GPU to each of {len(gpus)} jobs at a time, but "
                f"hydra.sweeper.max_batch_size={batch} would start more of the {len(jobs)} jobs together; "
                f"set hydra.sweeper.max_batch_size={len(gpus)}.",
                file=sys.stderr,
            )
            sys.exit(2)
        # every job's config first (fast), then what the serve environment can run (probed once)
        for serve_env in (False, True):
            for overrides, cfg in jobs:
                try:
                    exp = validate(cfg, serve_env=serve_env)
                    if serve_env:
                        at_the_door(exp)
                except ConfigError as e:
                    print(f"autoround-exp: job [{' '.join(overrides)}]: {e}", file=sys.stderr)
                    sys.exit(2)
        # job k/N in the progress display: each job knows only its own number
        sweep_dir = Path(config.hydra.sweep.dir)
        write_total(sweep_dir, len(jobs))
        # the sweep's MLflow run, its jobs' runs nested under it
        from autoround_exp.config import TrackingConfig
        from autoround_exp.tracking import open_sweep

        tracking = TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))
        # named by what it sweeps: where it writes (paths, tracking, report) says nothing of that
        where = ("paths.", "tracking.", "report.", "hydra.")
        named = [o for o in config.hydra.overrides.task if not o.lstrip("+~").startswith(where)]
        open_sweep(tracking, sweep_dir, sweep_dir.name, named)
