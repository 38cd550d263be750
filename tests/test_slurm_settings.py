"""The door's checks of a Slurm sweep's settings (autoround_exp/slurm.py) against what ``sinfo``
says of the cluster, on sinfo's own output format (tests/test_slurm.py runs them against the real
local cluster); and the reason a job Slurm ended is recorded with."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from autoround_exp import slurm
from autoround_exp.config import ConfigError
from tests.support import compose_cfg

# sinfo -h -o "%P|%c|%m|%G|%l": a default CPU partition, and a GPU one with two node sizes
SINFO = (
    "cpu*|64|256000|(null)|2-00:00:00\ngpu|32|512000|gpu:h100:4(S:0-1)|12:00:00\ngpu|96+|1024000|gpu:h100:8|12:00:00\n"
)


def launcher(**changes):
    cfg = compose_cfg(["launcher=submitit_slurm"], hydra=True).hydra.launcher
    return OmegaConf.merge(cfg, changes)


def test_sinfo_is_read_per_partition_taking_its_largest_node():
    parts = slurm.partitions(SINFO)
    assert parts["cpu"] == slurm.Partition("cpu", True, 64, 256000, 0, 2880)
    assert parts["gpu"] == slurm.Partition("gpu", False, 96, 1024000, 8, 720)
    assert [slurm.minutes(t) for t in ("infinite", "30", "1:30:00", "1-00:00:00", "0:0:30")] == [None, 30, 90, 1440, 1]
    assert [slurm.gpus_of(g) for g in ("(null)", "gpu:2", "gpu:a100:4(S:0)", "gpu:a:2,gpu:b:1")] == [0, 2, 4, 3]


def test_the_shipped_slurm_launcher_fits_a_gpu_partition():
    slurm.check_settings(launcher(partition="gpu"), SINFO)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "each job asks for 1 GPU\\(s\\).*partition cpu has 0; set hydra.launcher.gpus_per_node=0"),
        ({"partition": "gpu", "gpus_per_node": 9}, "asks for 9 GPU.*has 8"),
        ({"partition": "gpu", "gpus_per_node": 0, "gres": "gpu:16"}, "asks for 16 GPU"),
        ({"partition": "gpu", "gpus_per_node": None, "gpus_per_task": 3, "tasks_per_node": 4}, "asks for 12 GPU"),
        ({"partition": "a100"}, "partition=a100 is not a partition of this cluster; choose one of cpu, gpu"),
        ({"partition": "gpu", "cpus_per_task": 128}, "128 CPUs, but a node of partition gpu has 96"),
        ({"partition": "gpu", "mem_gb": 2000}, "mem_gb=2000 is more than .*\\(1024000 MB\\).*mem_gb=1000 or less"),
        (
            {"partition": "gpu", "timeout_min": 1440},
            "timeout_min=1440 is over partition gpu's time limit \\(720 min\\)",
        ),
        ({"partition": "gpu", "array_parallelism": 0}, "array_parallelism must be at least 1"),
        ({"partition": "gpu", "max_num_timeout": 2}, "max_num_timeout=2: jobs do not checkpoint mid-run"),
    ],
)
def test_settings_the_cluster_cannot_give_are_refused_saying_what_to_set(changes, message):
    with pytest.raises(ConfigError, match=message):
        slurm.check_settings(launcher(**changes), SINFO)


def test_without_slurms_commands_the_door_says_where_to_run(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="on PATH: run the sweep on the cluster's login node"):
        slurm.check_settings(launcher(partition="gpu"))


def test_the_reason_a_job_ended_names_slurms_state_and_the_setting_to_change():
    assert slurm.why_ended("TIMEOUT", "7_1", "00:30:00", 30, 64) == (
        "Slurm ended job 7_1 at its time limit, 00:30:00 (TIMEOUT; the sweep asked hydra.launcher.timeout_min=30)"
    )
    assert slurm.why_ended("CANCELLED by 0", "7_2", "", 30, 64).startswith("Slurm cancelled job 7_2 (CANCELLED by 0")
    assert "hydra.launcher.mem_gb=64" in slurm.why_ended("OUT_OF_MEMORY", "7", "", 30, 64)
    assert slurm.why_ended("NODE_FAIL", "7", "", 30, 64) == "Slurm ended job 7 before it returned (NODE_FAIL)"


def test_the_shipped_launcher_is_the_projects_hydra_plugin():
    assert launcher()._target_ == slurm.TARGET
    from hydra.core.plugins import Plugins

    assert slurm.TARGET in Plugins.instance().class_name_to_class  # Hydra found it where it looks
