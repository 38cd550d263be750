"""A real ``mlflow server`` on 127.0.0.1 for a check or a test (tracking=server), and its stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from autoround_exp.vllm_server import free_port


def start_mlflow_server(folder: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` on 127.0.0.1 with its store in ``folder``, once /health answers."""
    port = port or free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    argv = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--backend-store-uri", f"sqlite:///{folder / 'server.db'}"]
    argv += ["--artifacts-destination", str(folder / "server-artifacts"), "--workers", "1"]
    log = (folder / "server.log").open("a")
    # without MLflow 3's job execution (a job runner and two huey consumers, each importing
    # mlflow: about 20 s of CPU per server start here), which the harness's tracking never uses
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return server, url
        except OSError:
            time.sleep(1)
    stop_mlflow_server(server)
    raise RuntimeError((folder / "server.log").read_text()[-3000:])


def stop_mlflow_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, 15)
    server.wait(timeout=60)
