"""Sweeps as Slurm jobs against a real scheduler: the project's own one-node cluster
(tools/slurm_cluster.py: munge, MariaDB + slurmdbd, slurmctld, slurmd) and a real ``mlflow
server``, with what clusters do to jobs done to them for real while they run:

- ``scancel`` of a running job: recorded failed with Slurm's state, the sweep exits 1 naming it,
  and a rerun computes only that job;
- ``scontrol requeue`` of a running job: it runs again and finishes, one record and one
  FINISHED MLflow run for its key;
- a time limit too short: Slurm ends the job, recorded as timed out with the limit, the sweep's
  other job finishes;
- two sweeps at once that share a base model: the base and RTN runs are computed once across
  Slurm jobs (the locks on the shared folder hold);
- the settings a cluster user sets, in the sbatch script submitit writes; more GPUs per job than
  the node has, refused at the door.

The four sweeps run at the same time on the one node (a campaign, below), so the module costs
about as long as its slowest sweep plus the rerun."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import ROOT, start_mlflow_server, stop_mlflow_server
from tools import slurm_cluster

pytestmark = pytest.mark.slow

JOB = ["launcher=submitit_slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1"]
JOB += ["hydra.launcher.mem_gb=2", "serve=hf", "fidelity=none", "report.readme=null"]
JOB += ["calibration.nsamples=8", "calibration.seqlen=64"]
SETUP_LINE = "echo autoround-exp-setup-line-ran"
# the cheapest jobs that do the case: the base model scored on a few problems (eval.limit keeps
# each sweep's base runs apart), a quantization only where a case needs one
SWEEPS = {
    # two sweeps that both need the base and the W4A16 RTN runs (submitted first: they run together)
    "shared_a": ["scheme=w4a16", "method=rtn", "eval.limit=4"],
    "shared_b": ["scheme=w4a16", "method=gptq", "eval.limit=4"],
    # job 0 finishes, job 1 is cancelled while it runs, job 2 is requeued while it runs (as soon as
    # their runs begin: a few batches of problems keep them running well past that)
    "interrupted": ["method=none", "eval.limit=2,32,48", "baselines=false"]
    + ["hydra.launcher.partition=debug", "hydra.launcher.timeout_min=15", "hydra.launcher.array_parallelism=3"]
    + [f'hydra.launcher.setup=["{SETUP_LINE}"]'],
    # job 0's limit is lowered to 1 minute once it runs (the shortest Slurm has), job 1 keeps its own
    "time_limit": ["scheme=w4a16", "method=autoround,none", "iters=20000", "eval.limit=7", "baselines=false"]
    + ["hydra.launcher.timeout_min=10"],
}


@dataclass
class Campaign:
    work: Path
    url: str
    conf: Path
    procs: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)
    job_ids: dict[str, list[str]] = field(default_factory=dict)
    acted: dict[str, float] = field(default_factory=dict)  # "scancel 7_1" -> when
    sacct: str = ""

    def argv(self, name: str) -> list[str]:
        args = [sys.executable, str(ROOT / "run.py"), "-m", *JOB, *SWEEPS[name], "tracking=server"]
        return args + [f"tracking.uri={self.url}", f"paths.results={self.work / 'results'}", f"paths.work={self.work}"]

    def log(self, name: str) -> Path:
        return self.work / f"{name}.log"


def submitted(log: Path) -> list[str]:
    """The Slurm job ids a sweep's launcher printed as it submitted them."""
    text = log.read_text() if log.is_file() else ""
    m = re.search(r"\[slurm\] submitted \d+ job\(s\): ([\d_, ]+)", text)
    return [j.strip() for j in m.group(1).split(",")] if m else []


def started_run(campaign: Campaign, job_id: str) -> bool:
    """The job is running its run (its log names it): a quantization or evaluation is under way."""
    log = campaign.work / "submitit" / job_id / f"{job_id}_0_log.out"
    return log.is_file() and "[run] " in log.read_text(errors="replace")


# what the cluster does to which job of which sweep, as soon as its run has begun
ACTIONS = {
    ("interrupted", 1): lambda job: ["scancel", job],
    ("interrupted", 2): lambda job: ["scontrol", "requeue", job],
    ("time_limit", 0): lambda job: ["scontrol", "update", f"JobId={job}", "TimeLimit=1"],
}


def intervene(campaign: Campaign, stop: threading.Event) -> None:
    while not stop.is_set() and len(campaign.acted) < len(ACTIONS):
        for (sweep, index), command in ACTIONS.items():
            ids = campaign.job_ids.get(sweep) or submitted(campaign.log(sweep))
            if not ids:
                continue
            campaign.job_ids[sweep] = ids
            argv = command(ids[index])
            if " ".join(argv) not in campaign.acted and started_run(campaign, ids[index]):
                done = slurm_cluster.client(argv, campaign.conf.parent)
                assert done.returncode == 0, done.stderr
                campaign.acted[" ".join(argv)] = time.time()
        stop.wait(0.5)


@pytest.fixture(scope="module")
def campaign():
    root = Path(tempfile.mkdtemp(prefix="slurm-test-"))
    root.chmod(0o755)  # munged (user munge) reaches the cluster's folder inside
    server, url = start_mlflow_server(root)
    try:
        with slurm_cluster.cluster(root / "cluster") as conf:
            c = Campaign(root, url, conf)
            env = slurm_cluster.env_of(conf.parent)
            procs = {}
            for name in SWEEPS:  # all at once, each submitted before the next (the two sharing ones first)
                procs[name] = subprocess.Popen(
                    c.argv(name), cwd=ROOT, env=env, stdout=c.log(name).open("w"), stderr=subprocess.STDOUT
                )
                while not submitted(c.log(name)) and procs[name].poll() is None:
                    time.sleep(0.5)
            stop = threading.Event()
            actor = threading.Thread(target=intervene, args=(c, stop), daemon=True)
            actor.start()
            # the interrupted sweep again once it ended (beside the others): only its cancelled job
            # has anything left to compute
            procs["interrupted"].wait(timeout=1200)
            rerun = subprocess.Popen(
                c.argv("interrupted"), cwd=ROOT, env=env, stdout=c.log("rerun").open("w"), stderr=subprocess.STDOUT
            )
            for name, proc in [*procs.items(), ("rerun", rerun)]:
                proc.wait(timeout=1200)
                c.procs[name] = subprocess.CompletedProcess(proc.args, proc.returncode, c.log(name).read_text())
            stop.set()
            actor.join()
            sacct = slurm_cluster.client(["sacct", "-D", "-n", "-X", "-P", "-o", "JobID,State,Start,End"], conf.parent)
            c.sacct = sacct.stdout
            yield c
    finally:
        stop_mlflow_server(server)
        shutil.rmtree(root, ignore_errors=True)  # MariaDB's data alone is about 100 MB


def summary(proc: subprocess.CompletedProcess) -> str:
    return next((ln for ln in proc.stdout.splitlines() if ln.startswith("[sweep] ")), "no summary")


def states(campaign: Campaign, job_id: str) -> list[str]:
    """The job's states in sacct, every time it ran (-D: a requeued job's earlier runs too)."""
    return [ln.split("|")[1] for ln in campaign.sacct.splitlines() if ln.split("|")[0] == job_id]


def records(campaign: Campaign, folder: str = "runs") -> list[dict]:
    return [json.loads(p.read_text()) for p in (campaign.work / "results" / folder).glob("*.json")]


def mlflow_runs(campaign: Campaign):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=campaign.url)
    exp = client.get_experiment_by_name("autoround-exp")
    every = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in every if not {"autoround_exp.report", "autoround_exp.sweep"} & set(r.data.tags)]


def jobs_of(campaign: Campaign, name: str) -> list[dict]:
    """The job status files of sweep ``name`` (those whose overrides hold the sweep's)."""
    dirs = {p.parent.parent for p in (campaign.work / "hydra" / "multirun").glob("*/jobs/*.json")}
    found = []
    for d in dirs:
        statuses = [json.loads(p.read_text()) for p in (d / "jobs").glob("*.json")]
        if any(set(SWEEPS[name]) <= set(s["overrides"]) for s in statuses):
            found.extend(statuses)
    return found


def limit_of(rec: dict) -> int:
    return rec["config"]["eval"]["limit"]


def test_a_cancelled_job_is_recorded_with_slurms_reason_and_a_rerun_computes_only_it(campaign):
    first, rerun = campaign.procs["interrupted"], campaign.procs["rerun"]
    cancelled = campaign.job_ids["interrupted"][1]
    assert f"scancel {cancelled}" in campaign.acted, campaign.acted
    assert states(campaign, cancelled)[0].startswith("CANCELLED"), campaign.sacct
    # the sweep ends non-zero, its summary naming the run and Slurm's reason
    assert first.returncode == 1, first.stdout[-3000:]
    failed = [ln for ln in first.stdout.splitlines() if ln.lstrip().startswith("FAILED")]
    assert len(failed) == 1 and "tiny_llama-base [" in failed[0] and "eval.limit=32 " in failed[0], failed
    assert f"Slurm cancelled job {cancelled} (CANCELLED by 0" in failed[0]
    (rec,) = [r for r in records(campaign, "failed") if r["name"] == "tiny_llama-base" and limit_of(r) == 32]
    assert f"Slurm cancelled job {cancelled}" in rec["error"]
    assert "[slurm] job" in (campaign.work / "submitit" / cancelled / f"{cancelled}_0_log.out").read_text()
    # the rerun: the two finished runs reused, only the cancelled one computed
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "[sweep] 1 done, 2 reused, 0 failed" in summary(rerun), summary(rerun)
    assert 32 in {limit_of(r) for r in records(campaign) if r["name"] == "tiny_llama-base"}


def test_a_requeued_job_runs_again_and_finishes_once(campaign):
    requeued = campaign.job_ids["interrupted"][2]
    assert f"scontrol requeue {requeued}" in campaign.acted, campaign.acted
    assert states(campaign, requeued) == ["REQUEUED", "COMPLETED"], campaign.sacct
    log = (campaign.work / "submitit" / requeued / f"{requeued}_0_log.out").read_text()
    assert log.count("[run] tiny_llama-base ") == 2  # it ran twice: the second time to the end
    # one record, one FINISHED MLflow run for its key, nothing left RUNNING
    (rec,) = [r for r in records(campaign) if r["name"] == "tiny_llama-base" and limit_of(r) == 48]
    runs = [r for r in mlflow_runs(campaign) if r.data.tags.get("run_key") == rec["key"]]
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
    assert "[sweep] 2 done, 0 reused, 1 failed" in summary(campaign.procs["interrupted"])


def test_a_job_over_its_time_limit_is_recorded_as_timed_out_and_the_sweep_goes_on(campaign):
    proc = campaign.procs["time_limit"]
    long_job, short_job = campaign.job_ids.get("time_limit") or submitted(campaign.log("time_limit"))
    assert states(campaign, long_job) == ["TIMEOUT"], campaign.sacct
    assert states(campaign, short_job) == ["COMPLETED"], campaign.sacct
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "1 done, 0 reused, 1 failed" in summary(proc), summary(proc)
    (failed,) = [ln for ln in proc.stdout.splitlines() if ln.lstrip().startswith("FAILED")]
    assert f"scontrol update JobId={long_job} TimeLimit=1" in campaign.acted, campaign.acted
    assert "w4a16-autoround-iters20000" in failed
    assert f"Slurm ended job {long_job} at its time limit, 00:01:00 (TIMEOUT;" in failed
    assert 7 in {limit_of(r) for r in records(campaign) if r["name"] == "tiny_llama-base"}


def test_two_sweeps_sharing_a_base_compute_it_once_across_slurm_jobs(campaign):
    for name in ("shared_a", "shared_b"):
        assert campaign.procs[name].returncode == 0, campaign.procs[name].stdout[-3000:]
    a, b = (submitted(campaign.log(n))[0] for n in ("shared_a", "shared_b"))
    spans = {}
    for line in campaign.sacct.splitlines():
        job, _, start, end = line.split("|")
        if job in (a, b):
            spans[job] = (start, end)
    assert spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1], f"the two jobs did not run together: {spans}"
    outcomes = [o for name in ("shared_a", "shared_b") for job in jobs_of(campaign, name) for o in job["outcomes"]]
    for run in ("tiny_llama-base", "tiny_llama-w4a16-rtn"):
        statuses = sorted(o["status"] for o in outcomes if o["name"] == run)
        assert statuses == ["done", "reused"], (run, statuses)
        (rec,) = [r for r in records(campaign) if r["name"] == run and limit_of(r) == 4]
        finished = [r for r in mlflow_runs(campaign) if r.data.tags.get("run_key") == rec["key"]]
        assert [r.info.status for r in finished] == ["FINISHED"], run


def test_the_cluster_settings_are_in_the_sbatch_script_submitit_wrote(campaign):
    array = campaign.job_ids["interrupted"][0].split("_")[0]
    script = (campaign.work / "submitit" / array / f"{array}_submission.sh").read_text()
    for line in ("--partition=debug", "--time=15", "--cpus-per-task=1", "--mem=2GB", "--gpus-per-node=0"):
        assert f"#SBATCH {line}\n" in script, line
    assert "#SBATCH --array=0-2%3\n" in script
    assert "#SBATCH --signal=URG@120\n" in script  # not submitit's USR2, which kills the job's children
    assert f"# setup\n{SETUP_LINE}\n" in script
    first = campaign.job_ids["interrupted"][0]
    assert "autoround-exp-setup-line-ran" in (campaign.work / "submitit" / first / f"{first}_0_log.out").read_text()


def test_more_gpus_per_job_than_the_node_has_is_refused_before_any_job(campaign):
    sacct = ["sacct", "-n", "-X", "-P", "-o", "JobID"]
    before = slurm_cluster.client(sacct, campaign.conf.parent).stdout
    argv = [sys.executable, str(ROOT / "run.py"), "-m", *JOB, "hydra.launcher.gpus_per_node=2", "method=rtn"]
    argv += [f"paths.results={campaign.work / 'refused'}", f"paths.work={campaign.work / 'refused'}"]
    proc = subprocess.run(
        argv, cwd=ROOT, env=slurm_cluster.env_of(campaign.conf.parent), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "each job asks for 2 GPU(s)" in proc.stderr and "has 0" in proc.stderr
    assert "hydra.launcher.gpus_per_node=0" in proc.stderr  # what to set
    assert slurm_cluster.client(sacct, campaign.conf.parent).stdout == before  # nothing submitted
