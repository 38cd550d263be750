"""autoround-exp's Slurm launcher as a Hydra plugin (conf/launcher/submitit_slurm.yaml): Hydra
takes launchers only from the ``hydra_plugins`` package. It sits above the package: what it does
is ``autoround_exp.slurm``'s, and a job Slurm ended goes to the sweep's lifecycle
(``autoround_exp.sweep.job_ended``), which itself imports ``slurm``."""

from omegaconf import DictConfig

from autoround_exp import sweep
from autoround_exp.slurm import WaitingSlurmLauncher


class SlurmLauncher(WaitingSlurmLauncher):
    """hydra-submitit's Slurm launcher that waits for every job and records the ones Slurm ended."""

    def job_ended(self, num: int, overrides: list[str], cfg: DictConfig, reason: str, submitted: float) -> None:
        sweep.job_ended(self.config.hydra.sweep.dir, num, overrides, cfg, reason, submitted)
