"""The real models' configs resolve to upstream's recipes and lm-eval commands.

Llama-3.1-8B-Instruct and Qwen3-VL-8B-Instruct can't be downloaded or run here; this
composes them against a stand-in GPU platform and checks what would run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autoround_exp import backend, evaluate, quantize
from autoround_exp.preflight import validate
from tests.support import BLACKWELL, compose_cfg, opt


@pytest.fixture(autouse=True)
def gpu(monkeypatch):
    monkeypatch.setattr(backend, "probe", lambda python: {**BLACKWELL, "python": python})
    monkeypatch.setattr(backend, "default_python", lambda b: "/serve/bin/python")


def modifier_of(exp):
    req = quantize.request(exp, Path("/ckpt"))
    return req, quantize.build_modifier(req)


def test_llama_nvfp4_autoround_is_upstreams_recipe():
    exp = validate(compose_cfg(["model=llama3_1_8b_instruct", "scheme=nvfp4", "iters=200"]))
    req, mod = modifier_of(exp)
    assert type(mod).__name__ == "AutoRoundModifier"
    assert mod.targets == ["Linear"] and mod.scheme == "NVFP4" and mod.ignore == ["lm_head"] and mod.iters == 200
    assert req["model"]["path"] == "meta-llama/Llama-3.1-8B-Instruct" and req["model"]["loader"] == "causal_lm"
    cal = req["calibration"]
    assert (cal["source"], cal["nsamples"], cal["seqlen"]) == ("NeelNanda/pile-10k", 128, 2048)
    assert quantize.oneshot_calibration_args(req) == {
        "num_calibration_samples": 128,
        "max_seq_length": 2048,
        "shuffle_calibration_samples": False,
    }
    assert exp.checkpoint_name == "Meta-Llama-3.1-8B-Instruct-NVFP4-AutoRound"
    rtn = quantize.build_modifier(
        quantize.request(validate(compose_cfg(["model=llama3_1_8b_instruct", "method=rtn"])), Path("/c"))
    )
    assert type(rtn).__name__ == "QuantizationModifier" and rtn.scheme == "NVFP4"


def test_llama_gsm8k_is_upstreams_lm_eval_command():
    exp = validate(compose_cfg(["model=llama3_1_8b_instruct", "scheme=nvfp4"]))
    assert exp.serve.backend == "vllm" and exp.serve_choice.note is None  # Blackwell: W4A4 kernels
    argv = evaluate.lm_eval_argv(exp, "/ckpt", Path("/out"), None)
    assert opt(argv, "--model") == "vllm" and opt(argv, "--tasks") == "gsm8k"
    assert opt(argv, "--model_args").startswith("pretrained=/ckpt,dtype=bfloat16,add_bos_token=True,")
    assert opt(argv, "--num_fewshot") == "5" and opt(argv, "--batch_size") == "auto"
    assert "--limit" not in argv and "--include_path" not in argv and "--seed" not in argv


def test_qwen3_vl_keeps_vision_tower_and_lm_head_unquantized():
    exp = validate(compose_cfg(["model=qwen3_vl_8b_instruct", "scheme=nvfp4", "iters=200"]))
    req, mod = modifier_of(exp)
    assert mod.ignore == ["re:.*lm_head", "re:.*visual.*"] and mod.scheme == "NVFP4" and mod.iters == 200
    assert req["model"]["loader"] == "image_text_to_text"
    assert quantize.oneshot_calibration_args(req)["shuffle_calibration_samples"] is False
    argv = evaluate.lm_eval_argv(exp, "/ckpt", Path("/out"), None)
    assert opt(argv, "--model") == "vllm-vlm" and "add_bos_token=True" in opt(argv, "--model_args")
    assert opt(argv, "--tasks") == "gsm8k" and opt(argv, "--num_fewshot") == "5"
    assert exp.checkpoint_name == "Qwen3-VL-8B-Instruct-NVFP4-AutoRound"


def test_qwen3_vl_chartqa_is_upstreams_lm_eval_command():
    exp = validate(compose_cfg(["model=qwen3_vl_8b_instruct", "scheme=nvfp4", "eval=chartqa"]))
    argv = evaluate.lm_eval_argv(exp, "/ckpt", Path("/out"), None)
    assert opt(argv, "--model") == "vllm-vlm" and opt(argv, "--tasks") == "chartqa"
    assert "--apply_chat_template" in argv and opt(argv, "--num_fewshot") == "0"
    # the BOS choice is explicit: upstream's lm-eval config for chartqa with the chat template
    assert "add_bos_token=False" in opt(argv, "--model_args")
    assert opt(argv, "--batch_size") == "auto"  # vllm-vlm batches itself; one at a time would take hours
    hf = validate(compose_cfg(["model=qwen3_vl_8b_instruct", "scheme=nvfp4", "eval=chartqa", "serve=hf"]))
    argv = evaluate.lm_eval_argv(hf, "/ckpt", Path("/out"), None)
    assert opt(argv, "--model") == "hf-multimodal" and opt(argv, "--batch_size") == "1"  # it refuses auto
