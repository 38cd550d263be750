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
