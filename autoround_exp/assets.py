"""Where the embedded tiny models and data sets live, and the ``${asset:...}`` resolver."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent / "tiny" / "assets"


def asset(relpath: str) -> str:
    """Absolute path of a file shipped under ``autoround_exp/tiny/assets``."""
    return str(ROOT / relpath)


def register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset)
