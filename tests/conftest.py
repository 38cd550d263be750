from __future__ import annotations

import json

import pytest

from autoround_exp import pipeline
from autoround_exp.evaluate import EvalResult
from autoround_exp.record import Bos, Quantization
from tests.support import compose_cfg, gpu_available


@pytest.fixture
def compose_config():
    return compose_cfg


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not gpu_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (nvidia-smi sees none)")
        for item in gpu_items:
            item.add_marker(skip)


# The pipeline with its heavy stages replaced by stand-ins (tests/test_pipeline.py, test_security.py).
RESULTS = {
    "results": {"gsm8k_arith": {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.05}},
    "versions": {"gsm8k_arith": 3.0},
    "n-shot": {"gsm8k_arith": 5},
    "n-samples": {"gsm8k_arith": {"original": 1000, "effective": 100}},
}


@pytest.fixture
def calls(tmp_path, monkeypatch):
    seen = []

    def fake_quantize(exp, out_dir, log_path):
        seen.append(("quantize", exp.method.name))
        return Quantization(
            checkpoint=str(out_dir),
            oneshot_seconds=1.0,
            total_seconds=2.0,
            peak_memory_gb=0.1,
            memory_kind="cpu_max_rss",
            device="cpu",
            size_mb=1.0,
            recipe="recipe.yaml",
        )

    def fake_evaluate(exp, checkpoint, out_dir, log_path, pre=None):
        seen.append(("evaluate", exp.method.name))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(RESULTS))
        return EvalResult(
            str(out_dir / "results.json"),
            [],
            str(out_dir),
            "hf",
            "hf",
            "cpu",
            {"device_name": "cpu"},
            [],
            Bos(add_bos_token=True, double_bos=False),
            1.0,
            ["lm_eval"],
            None,
        )

    monkeypatch.setattr(pipeline, "quantize", fake_quantize)
    monkeypatch.setattr(pipeline, "evaluate", fake_evaluate)
    monkeypatch.setattr(pipeline, "prestart", lambda *a: None)  # no lm-eval child to start ahead
    return seen
