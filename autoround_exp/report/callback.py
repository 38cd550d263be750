"""Hydra callback: the report, regenerated from the stored runs when a -m sweep ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class ReportOnSweepEnd(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.report.on_sweep_end:
            return
        from autoround_exp.config import ReportConfig
        from autoround_exp.report.generate import generate
        from autoround_exp.tracking import sweep_parent

        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ReportConfig), config.report))
        tracking = config.tracking
        # The runs are stored whatever happens here: a failing report never loses a result.
        try:
            generate(
                cfg,
                Path(config.paths.results),
                log_to=tracking.uri if tracking.enabled else None,
                experiment=tracking.experiment,
                run_id=sweep_parent(config.hydra.sweep.dir),  # the sweep's own run, else the report run
            )
        except Exception as e:  # the runs are safe; `python -m autoround_exp.report` retries
            print(
                f"autoround-exp report failed ({type(e).__name__}: {e}); "
                "rerun `python -m autoround_exp.report` once fixed",
                flush=True,
            )
