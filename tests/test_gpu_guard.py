"""An 8B model is quantized on a GPU or not at all: with no GPU this environment's torch can
use, the run is refused at the door in seconds, naming the torch build, before anything is
downloaded (llm-compressor itself would only warn and run for days on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.support import ROOT


def run_py(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp_path / "hf")}
    argv = [sys.executable, str(ROOT / "run.py"), *args]
    argv += [f"paths.results={tmp_path / 'results'}", f"paths.work={tmp_path / 'work'}", "tracking.enabled=false"]
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


@pytest.mark.parametrize(
    "args",
    [
        ("model=llama3_1_8b_instruct",),
        ("-m", "+sweep=upstream_llama3_1_8b_nvfp4"),
        ("-m", "+sweep=upstream_qwen3_vl_8b_nvfp4"),
    ],
)
def test_an_8b_model_without_a_usable_gpu_is_refused_at_the_door(tmp_path, args):
    import torch

    proc, seconds = run_py(tmp_path, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "model.quantize_device=cuda" in proc.stderr and f"torch {torch.__version__}" in proc.stderr
    assert "torch.cuda.is_available() is False (CUDA_VISIBLE_DEVICES='')" in proc.stderr
    assert seconds < 30, seconds
    assert not (tmp_path / "hf").exists() and not (tmp_path / "results").exists()  # nothing downloaded or stored


def test_the_unquantized_baseline_and_a_cpu_override_are_not_refused(compose_config):
    from autoround_exp.preflight import at_the_door, check_quantize_device, validate

    check_quantize_device(validate(compose_config(["model=llama3_1_8b_instruct", "method=none"]), serve_env=False))
    exp = validate(compose_config(["model=llama3_1_8b_instruct", "model.quantize_device=cpu"]), serve_env=False)
    check_quantize_device(exp)
    assert at_the_door(validate(compose_config([]), serve_env=False)).model.name == "tiny_llama"
