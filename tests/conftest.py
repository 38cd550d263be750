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
