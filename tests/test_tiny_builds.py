"""The embedded models are built offline and deterministically: the same command twice gives
the same bytes. Run on a few steps; the shipped model is built by the same code path."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SHORT = ["--train-charts", "24", "--probe-charts", "8", "--vision-steps", "3", "--steps", "3", "--batch", "4"]


def test_building_the_tiny_qwen3_vl_twice_gives_the_same_bytes(tmp_path):
    outs = []
    for name in ("first", "second"):
        out = tmp_path / name
        argv = [sys.executable, "-m", "tools.tiny.build_qwen3_vl", "--out", str(out), *SHORT]
        argv += ["--eval-charts", "3"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(out / "tiny_qwen3_vl")
    first, second = outs
    names = sorted(p.name for p in first.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        if name == "build_info.json":  # holds the build's wall time
            continue
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
