"""autoround-exp entry point: compose -> validate -> quantize -> evaluate -> log.

python run.py                       # one run (defaults: conf/config.yaml)
python run.py -m iters=0,200        # a sweep (Hydra multirun)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from autoround_exp import progress, slurm, sweep
from autoround_exp.config import ConfigError, register_configs
from autoround_exp.preflight import at_the_door, validate, with_stack
from autoround_exp.stack import StackError


def sweep_id() -> str:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir).name
    return "single-" + time.strftime("%Y-%m-%d_%H-%M-%S")


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    started = time.time()
    slurm.on_job_start()  # in a Slurm job: Slurm's SIGTERM ends it at once, with no result written
    try:
        exp = at_the_door(validate(cfg))
    except ConfigError as e:
        print(f"autoround-exp: {e}", file=sys.stderr)
        sys.exit(2)
    from autoround_exp.pipeline import run_experiment  # heavy imports only after validation

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        exp = with_stack(exp)
    except StackError as e:  # a stack that cannot be had: this job fails, a sweep's others go on
        print(f"autoround-exp: {e}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        from autoround_exp.pipeline import failed_unrun

        outcomes = failed_unrun(exp, sweep_id(), e, sweep.job_parent(hc.sweep.dir), started, cause="stack")
        sweep.job_finished(hc.sweep.dir, hc.job.num, list(hc.overrides.task), outcomes, started)
        return
    progress.set_job(hc.job.num if multirun else 0, hc.sweep.dir if multirun else None, started)
    if (gpu := sweep.gpu_of_job(hc.job.num if multirun else 0, cfg.get("gpus"))) is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # this job's children (quantize, vLLM) see that GPU only
        print(f"[gpu] job {hc.job.num if multirun else 0} on GPU {gpu}", flush=True)
    parent = sweep.job_parent(hc.sweep.dir) if multirun else None  # this job's runs nest under it
    try:
        outcomes = run_experiment(exp, sweep_id(), stop_on_config_error=not multirun, parent_run_id=parent)
    except ConfigError as e:  # found only once the data was read (calibration): what is stored stays
        print(f"autoround-exp: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit) as e:
        sweep.job_stopped(exp.tracking, parent, hc.job.num, e)
        raise
    if multirun:
        sweep.job_finished(hc.sweep.dir, hc.job.num, list(hc.overrides.task), outcomes, started)
    elif any(o.status == "failed" for o in outcomes):
        sys.exit(1)


def _exit_on_sigterm(signum, frame):
    # Unwind normally, so child processes (quantization, lm-eval) are ended with us.
    sys.exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    register_configs()
    main()
