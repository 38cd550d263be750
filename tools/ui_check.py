"""``make ui-check``: the MLflow UI as a user sees it, in a real browser (not in CI).

Starts ``mlflow ui`` on the demo's store (127.0.0.1, a free port), then headless Chromium
(Debian's ``chromium`` package: ``apt-get install chromium``) takes two screenshots under
``results/ui/``: the experiment's runs page (the sweeps' parent runs with their jobs nested,
sorted by the gsm8k strict-match score so that its column shows) and the newest sweep's parent
run. What the pages hold is also printed from MLflow's REST API, the data the UI renders.

    python -m tools.ui_check [--store sqlite:///mlflow.db] [--out results/ui]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from autoround_exp.vllm_server import free_port

ROOT = Path(__file__).resolve().parents[1]
SORT_METRIC = "gsm8k_arith/exact_match/strict-match"
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never via a proxy


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
    with LOOPBACK.open(req, timeout=30) as resp:
        return json.loads(resp.read())


def start_ui(store: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    argv = [str(mlflow_bin), "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)]
    # the runs' pages only: MLflow 3's job execution (a job runner and two huey consumers) stays off
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    ui = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            if LOOPBACK.open(f"{url}/health", timeout=2):
                return ui, url
        except OSError:
            time.sleep(1)
    os.killpg(ui.pid, signal.SIGTERM)
    raise SystemExit(f"ui-check: mlflow ui did not answer; its log: {log}")


class DevTools:
    """Chromium's DevTools protocol over a websocket, with the standard library only: enough to
    load a page, run a script in it and take a screenshot."""

    def __init__(self, ws_url: str):
        host, path = ws_url.removeprefix("ws://").split("/", 1)
        name, port = host.rsplit(":", 1)
        self.sock = socket.create_connection((name, int(port)), timeout=120)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self._read(1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"ui-check: Chromium refused the DevTools websocket: {head[:200]!r}")
        self.n = 0

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            if not (chunk := self.sock.recv(n - len(buf))):
                raise EOFError("ui-check: Chromium closed the DevTools websocket")
            buf += chunk
        return buf

    def _message(self) -> dict:
        data = b""
        while True:
            b1, b2 = self._read(2)
            n = b2 & 0x7F
            if n >= 126:
                n = struct.unpack(">H" if n == 126 else ">Q", self._read(2 if n == 126 else 8))[0]
            data += self._read(n)
            if b1 & 0x80:  # the last frame of the message
                return json.loads(data)

    def call(self, method: str, **params) -> dict:
        self.n += 1
        msg, mask = json.dumps({"id": self.n, "method": method, "params": params}).encode(), os.urandom(4)
        n = len(msg)
        size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
        self.sock.sendall(b"\x81" + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
        while (reply := self._message()).get("id") != self.n:
            pass  # events
        if "error" in reply:
            raise RuntimeError(f"ui-check: {method}: {reply['error']}")
        return reply["result"]


# Clicks every parent run's expander in the runs table (MLflow 3.17 keeps the shared view's
# runsExpanded to itself) and closes the assistant's side panel; returns how many it expanded.
EXPAND = """(() => {
  const expanders = Array.from(document.querySelectorAll('div[style*="width: 24px"] button'));
  expanders.forEach(b => b.click());
  const close = document.querySelector('button[aria-label="Close"]');
  if (close) close.click();
  return expanders.length;
})()"""


def screenshot(url: str, png: Path, script: str | None = None, wait_s: float = 30) -> None:
    """Headless Chromium loads the page, runs ``script`` in it, and writes the screenshot."""
    port = free_port()
    argv = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    argv += ["--window-size=1600,1000", f"--remote-debugging-port={port}", "about:blank"]
    browser = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                targets = json.loads(LOOPBACK.open(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
                if pages := [t for t in targets if t["type"] == "page"]:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("ui-check: headless Chromium did not open its DevTools port")
            time.sleep(0.5)
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        tools.call("Page.navigate", url=url)
        time.sleep(wait_s)  # the UI's scripts render the table after the page has loaded
        note = ""
        if script:
            result = tools.call("Runtime.evaluate", expression=script, returnByValue=True)["result"]
            note = f", script returned {result.get('value')}"
            time.sleep(5)
        png.write_bytes(base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"]))
    finally:
        os.killpg(browser.pid, signal.SIGTERM)
        browser.wait(timeout=60)
    print(f"[ui-check] {png} ({png.stat().st_size} bytes{note}) <- {url}", flush=True)


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
            end = r["info"].get("end_time")
            span = f"{(int(end) - int(r['info']['start_time'])) / 1000:.0f} s" if end else "not ended"
            print(f"  {r['info']['run_name']}: {len(children)} runs, {r['info']['status']}, {span}", flush=True)
        key = share_view(url, exp_id, [r["info"]["run_id"] for r in parents], metric_keys(runs))
        screenshot(f"{url}/#/experiments/{exp_id}/runs?viewStateShareKey={key}", out / "runs.png", EXPAND)
        if parents:
            ran = {t.get("mlflow.parentRunId") for t in tags}  # sweeps that ran jobs, not only reused them
            newest = max(parents, key=lambda r: (r["info"]["run_id"] in ran, int(r["info"]["start_time"])))
            run_page = f"{url}/#/experiments/{exp_id}/runs/{newest['info']['run_id']}"
            screenshot(run_page, out / "sweep-run.png", EXPAND)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
