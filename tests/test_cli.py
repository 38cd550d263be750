"""Bad input fails in seconds through the real entry point, and leaves nothing behind."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.support import ROOT

CASES = [
    (["scheme=nvfp5"], ["scheme/nvfp5", "nvfp4", "w4a16"]),
    (["iters=-1"], ["iters=-1", "integer >= 0"]),
    (["iters=abc"], ["iters", "Integer"]),
    (["-m", "iters=200,-1"], ["iters=-1"]),
    (["-m", "+sweep=demo", "eval.limit=0"], ["eval.limit=0"]),
    (["eval.limit=0"], ["eval.limit=0"]),
    (["model=llama4"], ["model/llama4", "tiny_llama", "llama3_1_8b_instruct"]),
    (["method=hqq"], ["method/hqq", "gptq", "awq", "rtn"]),
    (["method=awq", "scheme=w8a8"], ["method=awq with scheme=w8a8 is not supported", "SmoothQuantModifier"]),
    (["method=awq_gptq", "scheme=w8a8"], ["method=awq_gptq with scheme=w8a8 is not supported"]),
    (["method=gptq", "method.actorder=group"], ["method.actorder=group is not supported", "static"]),
    (["method=awq", "method.n_grid=2"], ["method.n_grid=2 is too small for method.duo_scaling=true"]),
    (["eval=mmlu"], ["eval/mmlu", "chartqa", "gsm8k"]),
    (["eval=chartqa"], ["eval=chartqa needs a vision-language model"]),
    (["eval.data_path=/nonexistent"], ["eval data /nonexistent has no train.jsonl"]),
    (["report.recovery_threshold=1.5"], ["report.recovery_threshold=1.5", "(0, 1]"]),
    (["model.path=/nonexistent/model"], ["model.path=/nonexistent/model does not exist"]),
    (["scheme=w4a16", "model.linear_in_features=[100]"], ["do not divide the in_features [100]"]),
    (["fidelity.data_path=/nonexistent.txt"], ["fidelity.data_path=/nonexistent.txt: no such file", "fidelity=none"]),
]
if not shutil.which("nvidia-smi"):  # the conflict exists only where no GPU is visible
    CASES.append((["serve=hf", "serve.device=cuda"], ["serve.device=cuda", "sees no CUDA GPU"]))


@pytest.mark.parametrize("args,needles", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_config_fails_fast_and_writes_nothing(tmp_path, args, needles):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, "paths.work=work"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    for needle in needles:
        assert needle in out, out
    assert "[run]" not in out  # rejected before any job started (timing: the benchmark's job)
    written = [p.name for p in tmp_path.iterdir() if p.name != "work"]
    assert written == [], written  # no mlflow.db, no results/
    assert not (tmp_path / "work").exists() or not any(p.is_file() for p in (tmp_path / "work").rglob("*"))


def test_validation_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from autoround_exp.preflight import validate\n"
        "from tests.support import compose_cfg\n"
        "validate(compose_cfg(['+sweep=upstream_llama3_1_8b_nvfp4']))\n"
        "heavy = [m for m in ('torch', 'transformers', 'llmcompressor', 'lm_eval', 'mlflow', 'vllm')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_help_lists_every_config_group(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "model: llama3_1_8b_instruct, qwen3_vl_8b_instruct, tiny_llama" in proc.stdout
    assert "report: default" in proc.stdout and "serve: auto, hf, vllm, vllm_server" in proc.stdout
