"""make slurm-check: a sweep of the tiny Llama as Slurm jobs on a real one-node cluster.

Starts the cluster (tools/slurm_cluster.py) and a real ``mlflow server``, runs a 4-job sweep
through ``launcher=submitit_slurm`` (each job one ``sbatch``), watches ``squeue`` while it
runs, then checks what came out: every record in the shared results, one MLflow run per
record nested under the sweep's parent, the report, the summary counting every job. Always
stops the cluster and the server, and checks that no daemon or job process is left. Prints a
table of expected vs seen; exit 1 on a failed check.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tools import slurm_cluster
from tools.mlflow_server import start_mlflow_server, stop_mlflow_server

ROOT = Path(__file__).resolve().parents[1]
# 4 jobs (W4A16 and NVFP4, RTN and AutoRound), each a Slurm job of 1 CPU on the local node
SWEEP = ["-m", "launcher=submitit_slurm", "scheme=w4a16,nvfp4", "method=rtn,autoround", "iters=4"]
SWEEP += ["calibration.nsamples=8", "calibration.seqlen=64", "serve=hf", "eval.limit=8", "fidelity=none"]
SWEEP += ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=6"]
SWEEP += ["hydra.launcher.timeout_min=30", "report.readme=null"]
RECORDS = {"base", "w4a16-rtn", "w4a16-autoround-iters4", "nvfp4-rtn", "nvfp4-autoround-iters4"}
DAEMONS = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd")


def watch_squeue(folder: Path, seen: set[str], stop: threading.Event) -> None:
    while not stop.is_set():
        out = slurm_cluster.client(["squeue", "-h", "-o", "%i %T"], folder).stdout
        seen.update(line.split()[0] for line in out.splitlines() if line.strip())
        stop.wait(2)


def left_running() -> list[str]:
    out = subprocess.run(["ps", "-eo", "stat=,comm="], capture_output=True, text=True).stdout
    return [ln.split()[1] for ln in out.splitlines() if ln.split()[1] in DAEMONS and not ln.startswith("Z")]


def run_check(work: Path) -> list[tuple[str, str, str, bool]]:
    """(check, expected, seen, ok) per check."""
    import mlflow

    checks = []
    cluster_dir = work / "cluster"
    server, url = start_mlflow_server(work)
    try:
        with slurm_cluster.cluster(cluster_dir):
            seen: set[str] = set()
            stop = threading.Event()
            watcher = threading.Thread(target=watch_squeue, args=(cluster_dir, seen, stop), daemon=True)
            watcher.start()
            argv = [sys.executable, str(ROOT / "run.py"), *SWEEP, "tracking=server", f"tracking.uri={url}"]
            argv += [f"paths.results={work / 'results'}", f"paths.work={work / 'work'}"]
            started = time.monotonic()
            proc = subprocess.run(argv, cwd=ROOT, env=slurm_cluster.env_of(cluster_dir), capture_output=True, text=True)
            stop.set()
            watcher.join()
            (work / "sweep.log").write_text(proc.stdout + proc.stderr)
            checks.append(("sweep exit status", "0", str(proc.returncode), proc.returncode == 0))
            checks.append(("Slurm jobs seen in squeue", ">= 4", str(len(seen)), len(seen) >= 4))
            summary = next((ln for ln in proc.stdout.splitlines() if ln.startswith("[sweep] ")), "")
            checks.append(
                ("end-of-sweep summary", "5 done, 0 failed", summary, "5 done" in summary and "0 failed" in summary)
            )
            checks.append(("sweep wall time (s)", "-", f"{time.monotonic() - started:.0f}", True))
        names = {p.name.split("__")[0].removeprefix("tiny_llama-") for p in (work / "results" / "runs").glob("*.json")}
        checks.append(("records in results/", ", ".join(sorted(RECORDS)), ", ".join(sorted(names)), names == RECORDS))
        client = mlflow.MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("autoround-exp")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        parents = [r for r in runs if r.data.tags.get("autoround_exp.sweep") == "true"]
        nested = [r for r in runs if parents and r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        finished = sum(r.info.status == "FINISHED" for r in nested)
        checks.append(
            ("MLflow runs nested under the sweep's parent", "5 FINISHED", f"{finished} FINISHED", finished == 5)
        )
        report = work / "results" / "report.md"
        checks.append(("report", "results/report.md", "written" if report.is_file() else "missing", report.is_file()))
    finally:
        stop_mlflow_server(server)
    time.sleep(1)
    left = left_running()
    checks.append(("daemons left running", "none", ", ".join(left) or "none", not left))
    return checks


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="slurm-check-") as tmp:
        Path(tmp).chmod(0o755)  # munged runs as user munge, under it
        checks = run_check(Path(tmp))
        failed = [c for c in checks if not c[3]]
        width = max(len(c[0]) for c in checks)
        for name, expected, seen, ok in checks:
            print(f"{'ok ' if ok else 'FAIL'} {name:<{width}}  expected {expected}  seen {seen}")
        if failed:
            print((Path(tmp) / "sweep.log").read_text()[-4000:] if (Path(tmp) / "sweep.log").is_file() else "")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
