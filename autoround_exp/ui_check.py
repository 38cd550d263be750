"""``make ui-check``: the MLflow UI as a user sees it, in a real browser (not in CI).

Starts ``mlflow ui`` on the demo's store (127.0.0.1, a free port), then headless Chromium
(Debian's ``chromium`` package: ``apt-get install chromium``) takes two screenshots under
``results/ui/``: the experiment's runs page (the sweeps' parent runs with their jobs nested,
sorted by the gsm8k strict-match score so that its column shows) and the newest sweep's parent
run. What the pages hold is also printed from MLflow's REST API, the data the UI renders.

    python -m autoround_exp.ui_check [--store sqlite:///mlflow.db] [--out results/ui]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from autoround_exp.server import free_port

ROOT = Path(__file__).resolve().parents[1]
SORT_METRIC = "gsm8k_arith/exact_match/strict-match"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("ui-check: no Chromium found; install Debian's package: apt-get install chromium")


def api(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    with opener.open(req, timeout=30) as resp:
        return json.loads(resp.read())


def start_ui(store: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    argv = [str(mlflow_bin), "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)]
    ui = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            if urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/health", timeout=2):
                return ui, url
        except OSError:
            time.sleep(1)
    os.killpg(ui.pid, signal.SIGTERM)
    raise SystemExit(f"ui-check: mlflow ui did not answer; its log: {log}")


def screenshot(url: str, png: Path) -> None:
    argv = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    argv += ["--window-size=1600,1000", "--virtual-time-budget=20000", f"--screenshot={png}", url]
    subprocess.run(argv, check=True, capture_output=True, timeout=180)
    print(f"[ui-check] {png} ({png.stat().st_size} bytes) <- {url}", flush=True)


VIEW_KEY = "autoround-exp-sweeps"


def metric_keys(runs: list[dict]) -> list[str]:
    """The accuracy metrics (strict-match / relaxed first), as the runs table names columns."""
    names = {m["key"] for r in runs for m in r["data"].get("metrics", [])}
    scores = sorted(n for n in names if n.count("/") == 2 and not n.startswith(("perf/", "time/", "quant/", "eval/")))
    return [f"metrics.`{n}`" for n in scores[:4]]


def share_view(url: str, exp_id: str, expanded: list[str], metrics: list[str]) -> str:
    """A shared view of the runs table (MLflow's "share" stores it as an experiment tag): the
    sweeps' parent runs expanded to show their jobs, the accuracy metrics as columns."""
    state = {
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [*metrics, "tags.`eval_backend`"],
        "runsExpanded": {run_id: True for run_id in expanded},
    }
    tag = {"experiment_id": exp_id, "key": f"mlflow.sharedViewState.{VIEW_KEY}", "value": json.dumps(state)}
    api(url, "experiments/set-experiment-tag", tag)
    return VIEW_KEY


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="sqlite:///mlflow.db", help="MLflow backend store (make demo's by default)")
    ap.add_argument("--experiment", default="autoround-exp")
    ap.add_argument("--out", default=str(ROOT / "results" / "ui"))
    args = ap.parse_args(argv)
    if args.store.startswith("sqlite:///") and not Path(args.store.removeprefix("sqlite:///")).is_file():
        raise SystemExit(f"ui-check: no store at {args.store}; run `make demo` first or pass --store")
    chromium()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ui, url = start_ui(args.store, out / "mlflow-ui.log")
    try:
        exp = api(url, f"experiments/get-by-name?experiment_name={urllib.parse.quote(args.experiment)}")["experiment"]
        exp_id = exp["experiment_id"]
        runs = api(url, "runs/search", {"experiment_ids": [exp_id], "max_results": 1000}).get("runs", [])
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [r for r, t in zip(runs, tags, strict=True) if t.get("autoround_exp.sweep") == "true"]
        nested = sum("mlflow.parentRunId" in t for t in tags)
        print(
            f"[ui-check] experiment {args.experiment} ({exp_id}): {len(runs)} runs, {len(parents)} sweeps, "
            f"{nested} runs nested under one",
            flush=True,
        )
        for r in sorted(parents, key=lambda r: int(r["info"]["start_time"])):
            children = [t for t in tags if t.get("mlflow.parentRunId") == r["info"]["run_id"]]
            span = (int(r["info"].get("end_time") or 0) - int(r["info"]["start_time"])) / 1000
            print(f"  {r['info']['run_name']}: {len(children)} runs, {r['info']['status']}, {span:.0f} s", flush=True)
        key = share_view(url, exp_id, [r["info"]["run_id"] for r in parents], metric_keys(runs))
        screenshot(f"{url}/#/experiments/{exp_id}/runs?viewStateShareKey={key}", out / "runs.png")
        if parents:
            ran = {t.get("mlflow.parentRunId") for t in tags}  # sweeps that ran jobs, not only reused them
            newest = max(parents, key=lambda r: (r["info"]["run_id"] in ran, int(r["info"]["start_time"])))
            screenshot(f"{url}/#/experiments/{exp_id}/runs/{newest['info']['run_id']}", out / "sweep-run.png")
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
