"""make gpu-kit's plan and limits, offline: which packages the kit holds for the GPU machine
(tools/gpu_kit.py), at the pinned versions, and the size limit with what to change. The
download and the proof in a venv of the machine's packages run in `make gpu-kit` itself."""

from __future__ import annotations

import pytest

from tools import gpu_kit


def test_the_kit_holds_the_quantize_path_at_the_pinned_versions_and_nothing_the_machine_has():
    packages = gpu_kit.plan()
    pinned = gpu_kit.pins()
    for root in ("llmcompressor", "compressed-tensors", "auto-round", "lm-eval", "hydra-core", "omegaconf", "pydantic"):
        assert packages[root] == pinned[root], root
    # what the packages above need and the machine lacks, e.g. Hydra's parser and pydantic's core
    assert {"antlr4-python3-runtime", "pydantic-core", "datasets", "loguru", "sacrebleu"} <= set(packages)
    # what run.py imports beside them (the Slurm launcher's base), and what a whole gsm8k run needed
    assert {"hydra-submitit-launcher", "submitit", "pytz"} <= set(packages)
    # nothing the GPU machine has (torch, transformers and what they need)
    assert not {"torch", "transformers", "accelerate", "numpy", "pandas", "huggingface-hub", "pyyaml"} & set(packages)
    # nothing left out on purpose (lm-eval's metrics for tasks the harness does not run)
    assert not set(gpu_kit.LEFT_OUT) & set(packages)


def test_extras_a_requirement_asks_for_are_followed():
    # pytablewriter (lm-eval's results table) asks for typepy[datetime], whose converter imports pytz;
    # a whole gsm8k run from a kit without it failed there
    assert "pytz" in gpu_kit.closure(("pytablewriter",))
    assert "pytz" not in gpu_kit.closure(("typepy",))


def test_a_package_missing_from_the_constraints_is_named():
    versions = {n: v for n, v in gpu_kit.pins().items() if n != "loguru"}
    with pytest.raises(gpu_kit.KitError, match="not pinned in constraints/quantize.txt: loguru"):
        gpu_kit.plan(versions)


def test_the_manifest_counts_every_wheel_and_a_kit_over_the_limit_names_its_largest(tmp_path):
    (tmp_path / "lm_eval-0.4.13-py3-none-any.whl").write_bytes(b"x" * 3000)
    (tmp_path / "loguru-0.7.3-py3-none-any.whl").write_bytes(b"y" * 1000)
    m = gpu_kit.manifest(tmp_path, {"lm-eval": "0.4.13", "loguru": "0.7.3"})
    assert m["total_bytes"] == 4000 and [f["package"] for f in m["files"]] == ["lm-eval", "loguru"]
    assert all(len(f["sha256"]) == 64 for f in m["files"]) and m["python"] == "3.12"
    gpu_kit.check_size(m, limit=4000)
    with pytest.raises(gpu_kit.KitError, match=r"over 0 MiB; the largest: lm_eval-0.4.13-py3-none-any.whl"):
        gpu_kit.check_size(m, limit=3999)
