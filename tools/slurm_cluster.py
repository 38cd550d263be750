"""A real one-node Slurm cluster on this machine, started and stopped by the project itself.

    python -m tools.slurm_cluster start DIR     # prints the SLURM_CONF to export
    python -m tools.slurm_cluster stop DIR

Debian's ``slurm-wlm``, ``slurmdbd``, ``munge`` and MariaDB's server (installed with apt-get where
missing), configured under ``DIR`` only: munged runs as user munge with its own key and socket
there; a MariaDB server with its data there holds the accounting that ``slurmdbd`` keeps, so
``sacct`` answers with each job's real state (CANCELLED, TIMEOUT, REQUEUED), which submitit
reads; ``slurmctld`` and ``slurmd`` run with ``proctrack/linuxproc``, ``task/none`` and
``select/cons_tres`` on free ports, the node sized as ``slurmd -C`` reports it. Nothing of
the machine's own configuration (/etc/slurm, /etc/munge, /etc/mysql, systemd) is read or
changed; clients find the cluster through ``SLURM_CONF=DIR/slurm.conf``. ``cluster(DIR)`` is
the same as a context manager that always stops what it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "slurmdbd", "munge", "mariadb-server-core", "mariadb-client-core")
BINARIES = ("munged", "slurmctld", "slurmd", "slurmdbd", "sbatch", "mariadbd", "mariadb-install-db")
# started in this order, stopped in the reverse one
DAEMONS = {
    "munged": "munge/munged.pid",
    "mariadbd": "db/mariadbd.pid",
    "slurmdbd": "slurmdbd.pid",
    "slurmctld": "slurmctld.pid",
    "slurmd": "slurmd.pid",
}
CLUSTER = "autoround-exp"
CRED_EXPIRE_S = 5
DB_USER, DB_NAME = "slurm", "slurm_acct_db"
START_TIMEOUT_S = 60


class ClusterError(RuntimeError):
    pass


def install() -> None:
    """Debian's packages, where a daemon is missing (root, as on the project's machines)."""
    if all(shutil.which(d) for d in BINARIES):
        return
    if os.geteuid() != 0:
        raise ClusterError(f"Slurm is not installed; as root: apt-get install {' '.join(PACKAGES)}")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env, stdout=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_facts() -> dict[str, str]:
    """``slurmd -C``'s line as a dict (NodeName, CPUs, RealMemory, ...)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))


def slurm_conf(folder: Path, facts: dict[str, str], dbd_port: int | None = None) -> str:
    node = facts["NodeName"]
    # a little under what slurmd reports: a node configured larger than the machine is drained
    memory = int(int(facts["RealMemory"]) * 0.9)
    return "\n".join(
        [
            f"ClusterName={CLUSTER}",
            f"SlurmctldHost={node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # a requeued job waits cred_expire seconds before it starts again (default 120)
            f"AuthInfo=socket={folder / 'munge' / 'munge.socket'},cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / DAEMONS['slurmctld']}",
            f"SlurmdPidFile={folder / DAEMONS['slurmd']}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            *(
                ["AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=127.0.0.1"]
                # the munge socket slurmdbd's connections use (else the machine's default one)
                + [f"AccountingStoragePort={dbd_port}", f"AccountingStoragePass={folder / 'munge' / 'munge.socket'}"]
                if dbd_port
                else ["AccountingStorageType=accounting_storage/none"]
            ),
            "JobCompType=jobcomp/none",
            "KillWait=5",  # seconds from SIGTERM to SIGKILL: the harness's jobs exit at SIGTERM
            "OverTimeLimit=0",
            "InactiveLimit=0",
            "MinJobAge=300",
            f"NodeName={node} NodeAddr=127.0.0.1 CPUs={facts['CPUs']} RealMemory={memory} State=UNKNOWN",
            # a job that asks no memory gets its CPUs' share, not the whole node
            f"DefMemPerCPU={memory // int(facts['CPUs'])}",
            # two jobs per core, as on a busy node: a test's jobs run together on a 2-core machine
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2",
            "",
        ]
    )


def slurmdbd_conf(folder: Path, dbd_port: int, db_port: int, password: str) -> str:
    return "\n".join(
        [
            "AuthType=auth/munge",
            f"AuthInfo=socket={folder / 'munge' / 'munge.socket'}",
            "DbdHost=localhost",
            "DbdAddr=127.0.0.1",
            f"DbdPort={dbd_port}",
            "SlurmUser=root",
            f"PidFile={folder / DAEMONS['slurmdbd']}",
            f"LogFile={folder / 'slurmdbd.log'}",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={db_port}",
            f"StorageUser={DB_USER}",
            f"StoragePass={password}",
            f"StorageLoc={DB_NAME}",
            "",
        ]
    )


def env_of(folder: Path) -> dict[str, str]:
    return os.environ | {"SLURM_CONF": str(folder / "slurm.conf")}


def client(argv: list[str], folder: Path, **kw) -> subprocess.CompletedProcess:
    """A Slurm command (or daemon) run against the cluster under ``folder``."""
    return subprocess.run(argv, env=env_of(folder), capture_output=True, text=True, **kw)


def start_munge(folder: Path) -> None:
    m = folder / "munge"
    m.mkdir()
    m.chmod(0o755)  # munged wants its socket's folder reachable by all (the key itself is 0400)
    key = m / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    for path in (m, key):
        shutil.chown(path, "munge", "munge")
    argv = ["munged", f"--key-file={key}", f"--socket={m / 'munge.socket'}", f"--pid-file={m / 'munged.pid'}"]
    argv += [f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"]
    done = subprocess.run(["runuser", "-u", "munge", "--", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"munged did not start: {done.stderr.strip()}")


def start_mariadb(folder: Path, port: int, password: str) -> None:
    """A MariaDB server of its own, its data under ``folder/db``, on 127.0.0.1:``port`` only, with
    the accounting database and its user made at start (``--init-file``)."""
    db = folder / "db"
    data = db / "data"
    done = subprocess.run(
        ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root", "--skip-test-db"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise ClusterError(f"mariadb-install-db failed: {done.stderr.strip()[-2000:]}")
    init = db / "init.sql"
    init.write_text(
        f"CREATE DATABASE IF NOT EXISTS {DB_NAME};\n"
        f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
        f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'127.0.0.1';\n"
    )
    init.chmod(0o600)
    argv = ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={db / 'mariadbd.sock'}"]
    argv += [f"--port={port}", "--bind-address=127.0.0.1", "--skip-name-resolve", "--user=root"]
    argv += [f"--pid-file={db / 'mariadbd.pid'}", f"--log-error={db / 'mariadbd.log'}", f"--init-file={init}"]
    argv += ["--innodb-buffer-pool-size=64M"]
    subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    log = db / "mariadbd.log"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if log.is_file() and "ready for connections" in log.read_text(errors="replace"):
            return
        time.sleep(0.3)
    raise ClusterError(f"MariaDB did not start in {START_TIMEOUT_S} s:\n{tail(db / 'mariadbd.log')}")


def start_accounting(folder: Path, dbd_port: int) -> None:
    """MariaDB, then slurmdbd on it, then this cluster registered there (before slurmctld starts)."""
    password = os.urandom(12).hex()
    db_port = free_port()
    conf = folder / "slurmdbd.conf"
    conf.write_text(slurmdbd_conf(folder, dbd_port, db_port, password))
    conf.chmod(0o600)  # slurmdbd refuses a configuration others can read (it holds the password)
    start_mariadb(folder, db_port, password)
    done = client(["slurmdbd"], folder)
    if done.returncode != 0:
        raise ClusterError(f"slurmdbd did not start: {done.stderr.strip()}\n{tail(folder / 'slurmdbd.log')}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        added = client(["sacctmgr", "-i", "add", "cluster", CLUSTER], folder)
        if added.returncode == 0 or "already exists" in added.stdout + added.stderr:
            return
        time.sleep(0.5)
    raise ClusterError(f"slurmdbd does not answer sacctmgr: {added.stderr.strip()}\n{tail(folder / 'slurmdbd.log')}")


def start(folder: str | Path) -> Path:
    """The cluster under ``folder`` (created; must not exist), up with its node idle."""
    folder = Path(folder).resolve()
    closed = [str(p) for p in folder.parents if p.exists() and not p.stat().st_mode & 0o001]
    if closed:
        raise ClusterError(f"munged runs as user munge and cannot reach {folder}: chmod o+x {' '.join(closed)}")
    install()
    folder.mkdir(parents=True)
    folder.chmod(0o755)  # munged (user munge) reaches its own folder inside
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    facts = node_facts()
    dbd_port = free_port()
    (folder / "slurm.conf").write_text(slurm_conf(folder, facts, dbd_port))
    try:
        start_munge(folder)
        start_accounting(folder, dbd_port)
        for daemon in ("slurmctld", "slurmd"):
            done = client([daemon], folder)
            if done.returncode != 0:
                raise ClusterError(f"{daemon} did not start: {done.stderr.strip()}\n{tail(folder / f'{daemon}.log')}")
        wait_idle(folder, facts["NodeName"])
    except BaseException:
        stop(folder)
        raise
    return folder / "slurm.conf"


def tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


def wait_idle(folder: Path, node: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        state = client(["sinfo", "-h", "-n", node, "-o", "%T"], folder).stdout.strip()
        if state == "idle":
            return
        time.sleep(1)
    raise ClusterError(
        f"node {node} is {state or 'not reported'} after {START_TIMEOUT_S} s:\n{tail(folder / 'slurmd.log')}"
    )


def _pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().split()[0])
    return None


def stop(folder: str | Path) -> None:
    """Cancel every job, stop the daemons this folder's pid files name, and wait for them."""
    folder = Path(folder).resolve()
    if (folder / "slurm.conf").is_file():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            client(["scancel", "--full", "--user", str(os.getuid())], folder, timeout=30)
    for name in reversed(DAEMONS):  # slurmd first, munged last: each stops while what it talks to is up
        pid = _pid(folder / DAEMONS[name])
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.2)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split()[2] == "Z")


@contextlib.contextmanager
def cluster(folder: str | Path):
    """The cluster for the length of a with-block: yields its SLURM_CONF."""
    conf = start(folder)
    try:
        yield conf
    finally:
        stop(folder)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    if argv[0] == "start":
        print(f"export SLURM_CONF={start(argv[1])}")
    else:
        stop(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
