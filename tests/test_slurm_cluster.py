"""The local Slurm cluster's configuration (tools/slurm_cluster.py), without starting it:
`make slurm-check` starts it for real and runs a sweep through sbatch."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import slurm_cluster

FACTS = {"NodeName": "vm", "CPUs": "2", "RealMemory": "24105"}


def test_the_configuration_stays_in_its_folder_and_fits_the_machine(tmp_path):
    conf = dict(
        line.split("=", 1)
        for line in slurm_cluster.slurm_conf(tmp_path, FACTS, dbd_port=6819).splitlines()
        if "=" in line
    )
    # every path the daemons write is under the folder: nothing of /etc/slurm or /var is touched
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldPidFile", "SlurmdPidFile", "SlurmctldLogFile"):
        assert Path(conf[key]).is_relative_to(tmp_path), key
    assert conf["AuthInfo"].startswith(f"socket={tmp_path / 'munge' / 'munge.socket'},")  # its own munged
    assert conf["AccountingStoragePass"] == str(tmp_path / "munge" / "munge.socket")  # slurmdbd's too
    assert "cred_expire=5" in conf["AuthInfo"]  # a requeued job starts again after 5 s, not 120
    # without systemd or cgroups (22.05 has no CgroupPlugin=disabled)
    assert (conf["ProctrackType"], conf["TaskPlugin"], conf["SelectType"]) == (
        "proctrack/linuxproc",
        "task/none",
        "select/cons_tres",
    )
    node = next(
        line
        for line in slurm_cluster.slurm_conf(tmp_path, FACTS, dbd_port=6819).splitlines()
        if line.startswith("NodeName=")
    )
    # the node no larger than slurmd -C reports (a larger one is drained), named as the host is
    assert "NodeName=vm " in node and "CPUs=2 " in node and "RealMemory=21694 " in node
    assert conf["SlurmctldPort"] != conf["SlurmdPort"]
    # accounting through slurmdbd (sacct answers, so submitit sees CANCELLED, TIMEOUT, REQUEUED)
    assert (conf["AccountingStorageType"], conf["AccountingStoragePort"]) == ("accounting_storage/slurmdbd", "6819")


def test_slurmdbd_stores_into_its_own_mariadb_and_keeps_its_password_to_itself(tmp_path):
    text = slurm_cluster.slurmdbd_conf(tmp_path, dbd_port=6819, db_port=3307, password="pw")
    conf = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert (conf["StorageType"], conf["StorageHost"], conf["StoragePort"]) == (
        "accounting_storage/mysql",
        "127.0.0.1",
        "3307",
    )
    assert Path(conf["PidFile"]).is_relative_to(tmp_path) and Path(conf["LogFile"]).is_relative_to(tmp_path)


def test_a_folder_munge_cannot_reach_is_refused_with_what_to_change(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(slurm_cluster.ClusterError, match=f"chmod o\\+x {closed}"):
        slurm_cluster.start(closed / "cluster")
