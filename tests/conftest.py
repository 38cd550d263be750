from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from autoround_exp.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_cfg(overrides: list[str] | None = None, hydra: bool = False):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=overrides or [], return_hydra_config=hydra)


@pytest.fixture
def compose_config():
    return compose_cfg


def gpu_available() -> bool:
    """A CUDA GPU that nvidia-smi can see (the serve and quantize environments both need one)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not gpu_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (nvidia-smi sees none)")
        for item in gpu_items:
            item.add_marker(skip)


def hand_written_gsm8k_arith_task(tasks: Path, stock_gsm8k_yaml: str | Path) -> Path:
    """lm-eval's stock gsm8k task on the tiny model's data, as a user would write it by hand."""
    import yaml

    from autoround_exp.assets import asset

    data = Path(asset("data/arith_gsm8k"))
    tasks.mkdir(parents=True, exist_ok=True)
    task = {
        "include": str(stock_gsm8k_yaml),
        "task": "gsm8k_arith",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")}},
    }
    (tasks / "gsm8k_arith.yaml").write_text(yaml.safe_dump(task))
    return tasks


def lm_eval_by_hand(
    python: str,
    stock_gsm8k_yaml: str | Path,
    workdir: Path,
    model: str,
    model_args: str,
    limit: int,
    extra: tuple[str, ...] = (),
    env: dict | None = None,
) -> dict[str, float]:
    """``python -m lm_eval`` on the tiny model's gsm8k, 5-shot, typed as a user would, without
    the harness; returns the metrics under the names the harness records them."""
    import subprocess

    from autoround_exp import lmeval_results

    tasks = hand_written_gsm8k_arith_task(workdir / "tasks", stock_gsm8k_yaml)
    out = workdir / "out"
    argv = [python, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", "gsm8k_arith"]
    argv += ["--include_path", str(tasks), "--num_fewshot", "5", "--limit", str(limit), "--output_path", str(out)]
    subprocess.run([*argv, *extra], check=True, capture_output=True, timeout=1200, env=env)
    results = lmeval_results.load(next(out.rglob("results_*.json")))
    return lmeval_results.mlflow_metrics(lmeval_results.metrics(results))


def paths_args(workdir: Path) -> list[str]:
    """run.py overrides that keep a test's results, outputs and MLflow store in ``workdir``."""
    return [
        f"paths.results={workdir / 'results'}",
        f"paths.work={workdir / 'work'}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"tracking.artifact_root={workdir / 'mlartifacts'}",
    ]
