"""On a CUDA machine: the tiny model quantized to NVFP4 and W4A16 and scored in vLLM's GPU
kernels, with the hardware provenance recorded. Skipped where nvidia-smi sees no GPU."""

from __future__ import annotations

import json

import pytest

from tests.support import run_py, wait_no_serve_processes

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.mark.parametrize("scheme", ["nvfp4", "w4a16"])
def test_quantized_tiny_model_runs_in_vllm_on_gpu(tmp_path, scheme):
    proc = run_py(tmp_path, f"scheme={scheme}", "iters=0", "serve=vllm", "eval.limit=100", "baselines=false")
    (path,) = (tmp_path / "results" / "runs").glob("*.json")
    rec = json.loads(path.read_text())
    ev = rec["eval"]
    assert ev["backend"] == "vllm" and ev["platform"]["cuda"] is True and ev["device"] == "cuda"
    cc = float(ev["platform"]["compute_capability"])
    assert ev["platform"]["device_name"] != "cpu" and ev["kernels"], "vLLM's kernel choice is recorded"
    if scheme == "nvfp4" and cc < 10.0:
        assert "weight-only" in ev["note"] and "NOTE:" in proc.stdout
    else:
        assert ev["note"] is None
    assert rec["metrics"]["gsm8k_arith/exact_match/strict-match"] > 0.3
    assert wait_no_serve_processes(tmp_path) == []
