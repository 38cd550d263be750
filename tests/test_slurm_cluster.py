"""The local Slurm cluster's configuration (tools/slurm_cluster.py), without starting it:
`make slurm-check` starts it for real and runs a sweep through sbatch."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import slurm_cluster

FACTS = {"NodeName": "vm", "CPUs": "2", "RealMemory": "24105"}


def test_the_configuration_stays_in_its_folder_and_fits_the_machine(tmp_path):
    conf = dict(line.split("=", 1) for line in slurm_cluster.slurm_conf(tmp_path, FACTS).splitlines() if "=" in line)
    # every path the daemons write is under the folder: nothing of /etc/slurm or /var is touched
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldPidFile", "SlurmdPidFile", "SlurmctldLogFile"):
        assert Path(conf[key]).is_relative_to(tmp_path), key
    assert conf["AuthInfo"] == f"socket={tmp_path / 'munge' / 'munge.socket'}"  # its own munged
    # without systemd or cgroups (22.05 has no CgroupPlugin=disabled)
    assert (conf["ProctrackType"], conf["TaskPlugin"], conf["SelectType"]) == (
        "proctrack/linuxproc",
        "task/none",
        "select/cons_tres",
    )
    node = next(line for line in slurm_cluster.slurm_conf(tmp_path, FACTS).splitlines() if line.startswith("NodeName="))
    # the node no larger than slurmd -C reports (a larger one is drained), named as the host is
    assert "NodeName=vm " in node and "CPUs=2 " in node and "RealMemory=21694 " in node
    assert conf["SlurmctldPort"] != conf["SlurmdPort"]


def test_a_folder_munge_cannot_reach_is_refused_with_what_to_change(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(slurm_cluster.ClusterError, match=f"chmod o\\+x {closed}"):
        slurm_cluster.start(closed / "cluster")
