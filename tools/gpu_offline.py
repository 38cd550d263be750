"""The GPU check for a GPU machine without network and without vLLM (issue 33): the quantize
path on CUDA from the wheels of ``make gpu-kit``, stage by stage, within a time budget.

    python3 -m tools.gpu_offline --kit .gpu-kit --out DIR [--budget-s 420] [--device auto|cuda|cpu]

It installs the kit into a temporary folder (``pip install --no-index --no-deps --target``),
uses the machine's own torch, and runs, in order:

- ``kit``, ``env``: the kit against its manifest; versions, the GPU, its compute capability and
  free memory;
- ``tiny w4a16``, ``tiny nvfp4``: the tiny Llama quantized by ``run.py`` on the device (RTN and
  AutoRound iters 16, the base beside them), every checkpoint verified, each scored on the
  device with lm-eval's ``hf`` backend (``add_bos_token``) and compared with the CPU's scores
  for the same runs (``docs/data/gpu-and-cluster/offline-cpu-scores.json``, made by this
  command's CPU variant with ``--write-reference``);
- ``block``: one decoder block at Llama-3.1-8B's shapes, quantized by the harness's quantize
  child as upstream's NVFP4 preset (``tools/gpu_block.py``): time and peak memory per block, and
  the projection to the 32-block model;
- ``vlm``: the tiny Qwen3-VL on chartqa through ``hf-multimodal``.

Every stage writes its rows (expected, seen, PASS / FAIL / SKIP) into ``DIR/rows.jsonl`` and
``DIR/table.md`` as soon as it ends, with all output in ``DIR/check.log`` and the runs' own logs
in ``DIR/logs.tar.gz`` (four files: the GPU machine returns at most eight). A stage that
would start with less of the budget left than it needs is skipped, and one that runs past the
budget is stopped; both say so. MLflow is off. Without ``--kit`` the installed packages are
used (the CPU variant in CI). Exit 1 if any row fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autoround_exp import child
from autoround_exp.fsutil import write_atomic
from tools import gpu_block, gpu_kit
from tools.gpu_check import MIN_STRICT, SMALL_CALIB, STRICT, Check, gpu_visible, render, verification_check

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "data" / "gpu-and-cluster" / "offline-cpu-scores.json"
ITERS = 16  # as make gpu-check: improves on RTN in every block of the tiny Llama on every CPU tried
LIMIT = 100  # gsm8k_arith problems per text run (the CPU reference is made at the same limit)
VLM_LIMIT = 20
STAGES = ("kit", "env", "tiny w4a16", "tiny nvfp4", "block", "vlm")
# The least budget a stage is started with (seconds): under it, it is skipped and says so. From
# the CPU variant here (2 cores) and guessed for CUDA until a GPU run measures them.
NEEDS_S = {"kit": 20, "env": 20, "tiny w4a16": 60, "tiny nvfp4": 60, "block": 60, "vlm": 40}
MARGIN_S = 5  # kept for writing the last rows after a stage is stopped
KIT_PROBES = ("llmcompressor", "compressed-tensors", "auto-round", "lm-eval", "hydra-core", "pydantic")

ENV_PROBE = """
import importlib.metadata as md, json, platform
import torch
import llmcompressor, auto_round, lm_eval, hydra, compressed_tensors, pydantic  # they import
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
out["versions"] = {n: md.version(n) for n in %r}
if out["cuda"]:
    free, total = torch.cuda.mem_get_info()
    out.update(device_name=torch.cuda.get_device_name(), free_gib=round(free / 2**30, 1),
               total_gib=round(total / 2**30, 1), compute_capability="%%d.%%d" %% torch.cuda.get_device_capability())
print(json.dumps(out))
"""


class CheckError(RuntimeError):
    """Input the check cannot start with (a missing or incomplete kit): said before any work."""


class Interrupted(BaseException):
    pass


@dataclass
class Row:
    stage: str
    check: str
    expected: str
    seen: str
    result: str  # PASS | FAIL | SKIP
    at_s: float = 0.0


@dataclass
class Run:
    """Where the check writes, what it runs with, and its budget."""

    out: Path
    work: Path
    device: str  # cuda | cpu
    env: dict
    budget_s: float
    limit: int = LIMIT
    checkpoints: Path | None = None
    started: float = field(default_factory=time.monotonic)
    rows: list[Row] = field(default_factory=list)
    gpu_name: str = "cpu"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def add(self, stage: str, check: str, expected: str, seen: str, ok: bool | None) -> None:
        result = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        row = Row(stage, check, expected, seen, result, round(time.monotonic() - self.started, 1))
        self.rows.append(row)
        with (self.out / "rows.jsonl").open("a") as f:
            f.write(json.dumps(asdict(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def summary(self) -> str:
        count = {k: sum(r.result == k for r in self.rows) for k in ("FAIL", "SKIP")}
        took = time.monotonic() - self.started
        return (
            f"gpu-offline: {len(self.rows)} rows, {count['FAIL']} failed, {count['SKIP']} skipped "
            f"({self.device} variant, {took:.0f} s of a {self.budget_s:.0f} s budget)"
        )

    def write_table(self, final: bool = False) -> None:
        verdict = {"PASS": True, "FAIL": False, "SKIP": None}
        checks = [Check(f"{r.stage}: {r.check}", r.expected, r.seen, verdict[r.result]) for r in self.rows]
        tail = f"\n{self.summary()}\n" if final else ""
        write_atomic(self.out / "table.md", f"```\n{render(checks)}\n```\n{tail}")

    def log(self, text: str) -> None:
        with (self.out / "check.log").open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        print(text, flush=True)


# ---- the kit -------------------------------------------------------------------------------


def kit_folder(kit: Path) -> Path:
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    folder = kit / here
    if not folder.is_dir() or not any(folder.glob("*.whl")):
        held = sorted(p.name for p in kit.glob("cp*") if p.is_dir()) if kit.is_dir() else []
        raise CheckError(
            f"--kit {kit} has no wheels for this Python ({here}; it holds {', '.join(held) or 'nothing'}): "
            "run `make gpu-kit` where pip reaches the package index, and carry .gpu-kit/cp312 for Python 3.12."
        )
    return folder


def check_manifest(folder: Path) -> str:
    """The folder's wheels against its manifest: each listed one there at its size, and no other
    (two versions of a package stop pip's whole install)."""
    path = folder / "manifest.json"
    if not path.is_file():
        raise CheckError(f"{path} is missing: run `make gpu-kit` again and carry the whole {folder.name} folder.")
    m = json.loads(path.read_text())
    listed = {f["file"]: f["bytes"] for f in m["files"]}
    have = {w.name: w.stat().st_size for w in folder.glob("*.whl")}
    wrong = sorted(n for n, size in listed.items() if have.get(n) != size)
    extra = sorted(set(have) - set(listed))
    if wrong or extra:
        raise CheckError(
            f"{folder} does not match its manifest (missing or another size: {', '.join(wrong[:5]) or 'none'}; "
            f"not listed: {', '.join(extra[:5]) or 'none'}): carry the folder `make gpu-kit` made, whole."
        )
    return f"{len(listed)} wheels as the manifest lists, {m['total_bytes'] / 2**20:.1f} MiB"


def install_kit(run: Run, kit: Path) -> None:
    folder = kit_folder(kit)
    seen = check_manifest(folder)
    target = run.work / "kit"
    t0 = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--target",
            str(target),
            *map(str, sorted(folder.glob("*.whl"))),
        ],
        capture_output=True,
        text=True,
    )
    run.log(done.stdout + done.stderr)
    ok = done.returncode == 0
    run.env["PYTHONPATH"] = os.pathsep.join([str(target), str(ROOT)])
    sys.path[:0] = [str(target)]  # the rows are read with the kit's pydantic
    took = f"{time.monotonic() - t0:.0f} s"
    run.add(
        "kit",
        "installed with --no-index --no-deps --target",
        "every wheel, as the manifest lists",
        f"{seen}; pip exit {done.returncode} in {took}",
        ok,
    )


# ---- stages --------------------------------------------------------------------------------


def stream(run: Run, label: str, argv: list[str], timeout_s: float) -> int | None:
    """``argv`` as the harness runs its children (a process group of its own, with a watchdog
    that ends it if this process dies, kill -9 included), output into check.log; None when
    stopped at the budget."""
    run.log(f"\n==== {label}: {' '.join(argv)}")
    with (run.out / "check.log").open("a") as out:
        proc = child.start(argv, out, run.env)
        try:
            rc = proc.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            child.stop(proc)  # run.py ends its children on SIGTERM; what is left after 20 s is killed
    return rc


def env_stage(run: Run) -> None:
    done = subprocess.run(
        [sys.executable, "-c", ENV_PROBE % (KIT_PROBES,)],
        capture_output=True,
        text=True,
        env=run.env,
        cwd=run.work,
        timeout=max(run.left(), 1),
    )
    run.log(done.stderr)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        run.add("env", "the quantize path imports", "llmcompressor, auto_round, lm_eval, hydra", last, False)
        return
    info = json.loads(done.stdout.strip().splitlines()[-1])
    pins = gpu_kit.pins()
    versions = info["versions"]
    off = {n: v for n, v in versions.items() if pins.get(n) not in (None, v)}
    seen = ", ".join(f"{n} {v}" for n, v in versions.items())
    run.add(
        "env",
        "versions",
        "the kit's pins (constraints/quantize.txt)",
        f"python {info['python']}, torch {info['torch']}, {seen}" + (f"; not as pinned: {off}" if off else ""),
        not off,
    )
    if info["cuda"]:
        run.gpu_name = info["device_name"]
        memory = f"{info['free_gib']} of {info['total_gib']} GiB free"
        seen = f"{info['device_name']}, cc {info['compute_capability']}, {memory}"
    else:
        seen = "no CUDA device"
    want = "a CUDA GPU" if run.device == "cuda" else "the CPU (no GPU visible)"
    run.add("env", "device", want, seen, info["cuda"] == (run.device == "cuda"))


def run_py(run: Run, stage: str, args: tuple[str, ...]) -> int | None:
    paths = (
        f"paths.results={run.work / 'results'}",
        f"paths.work={run.work / 'work'}",
        "tracking.enabled=false",
        "fidelity=none",
        "report.readme=null",
        "serve=hf",
    )
    if run.checkpoints is not None:
        paths += (f"paths.checkpoints={run.checkpoints}",)
    argv = [sys.executable, str(ROOT / "run.py"), "-m", *args, *paths]
    return stream(run, stage, argv, run.left() - MARGIN_S)


def records(run: Run) -> list:
    from autoround_exp.store import Store

    return Store(run.work / "results").records()


def ended(run: Run, stage: str, rc: int | None, t0: float, program: str = "run.py") -> None:
    took = f"{time.monotonic() - t0:.0f} s"
    if rc is None:
        run.add(stage, "ran", "within the budget", f"stopped at the budget after {took}", None)
    else:
        run.add(stage, program, "exit 0", f"exit {rc} in {took}", rc == 0)


def tiny_stage(run: Run, scheme: str) -> None:
    stage = f"tiny {scheme}"
    t0 = time.monotonic()
    rc = run_py(
        run,
        stage,
        (
            "model=tiny_llama",
            f"scheme={scheme}",
            "method=autoround",
            f"iters={ITERS}",
            *SMALL_CALIB,
            f"eval.limit={run.limit}",
        ),
    )
    ended(run, stage, rc, t0)
    found = {r.name: r for r in records(run) if r.model.name == "tiny_llama"}
    reference = load_reference(run.limit)
    for name, iters in (
        ("tiny_llama-base", None),
        (f"tiny_llama-{scheme}-rtn", None),
        (f"tiny_llama-{scheme}-autoround-iters{ITERS}", ITERS),
    ):
        if name == "tiny_llama-base" and scheme != "w4a16" and any(r.stage == "tiny w4a16" for r in run.rows):
            continue  # one base for both schemes
        rec = found.get(name)
        if rec is None:
            run.add(
                stage,
                name,
                "stored",
                "not stored" + (" (stopped at the budget)" if rc is None else ""),
                None if rc is None else False,
            )
            continue
        if rec.quantization is not None:
            q = rec.quantization
            run.add(stage, f"{name}: quantized on", run.gpu_name, q.device, q.device == run.gpu_name)
            for c in verification_check(name, rec, iters, "lm_head"):
                run.add(stage, c.name, c.expected, c.seen, c.ok)
        ev = rec.eval
        where = "cuda" if ev.platform.cuda else "cpu"
        run.add(
            stage,
            f"{name}: scored by",
            f"hf on {run.device}, add_bos_token",
            f"{ev.backend} on {where}, add_bos_token={rec.eval_settings.add_bos_token}",
            ev.backend == "hf" and where == run.device and rec.eval_settings.add_bos_token,
        )
        run.add(stage, f"{name}: strict-match", *score_row(rec, reference.get(name), run.limit))


def load_reference(limit: int) -> dict:
    if not REFERENCE.is_file():
        return {}
    data = json.loads(REFERENCE.read_text())
    return data["scores"] if data["limit"] == limit else {}


def score_row(rec, ref: dict | None, limit: int) -> tuple[str, str, bool]:
    """Expected, seen, ok: at least MIN_STRICT on ``limit`` problems (a kernel that computes
    garbage scores ~0), and within two standard errors of the difference from the CPU's score
    for the same run (greedy decoding on other kernels changes a few answers; AutoRound's
    codes differ where it tuned on another device)."""
    row = rec.metric(STRICT)
    if row is None:
        return f">= {MIN_STRICT}", "no strict-match", False
    seen = f"{row.value:.3f} ± {row.stderr or 0:.3f} (n={row.n_samples})"
    ok = row.value >= MIN_STRICT and row.n_samples == limit
    if ref is None:
        return f">= {MIN_STRICT} (n={limit}); no CPU score at this limit", seen, ok
    tol = 2 * math.hypot(ref["stderr"], row.stderr or 0)
    return (
        f">= {MIN_STRICT}, within ±{tol:.3f} of the CPU's {ref['value']:.3f}",
        seen,
        ok and abs(row.value - ref["value"]) <= tol,
    )


def block_stage(run: Run) -> None:
    found = run.work / "block.json"
    t0 = time.monotonic()
    argv = [sys.executable, "-m", "tools.gpu_block", "--device", run.device, "--work", str(run.work / "block")]
    rc = stream(run, "block", [*argv, "--json", str(found)], run.left() - MARGIN_S)
    if rc != 0:  # the rows below tell what was measured before it stopped
        ended(run, "block", rc, t0, "tools.gpu_block")
    data = json.loads(found.read_text()) if found.is_file() else None
    if data is None:
        return
    want, p = gpu_block.plan_for(run.device), data["plan"]
    shape = p["shape"]
    run.add(
        "block",
        "shape and calibration",
        f"{want.shape.label}: {want.shape.hidden_size} / {want.shape.intermediate_size}, "
        f"{want.shape.num_attention_heads} / {want.shape.num_key_value_heads} heads; {want.nsamples} x {want.seqlen}",
        f"{shape['hidden_size']} / {shape['intermediate_size']}, {shape['num_attention_heads']} / "
        f"{shape['num_key_value_heads']} heads, {data['block_params'] / 1e6:.0f}M parameters; "
        f"{p['nsamples']} x {p['seqlen']} tokens",
        p == json.loads(json.dumps(asdict(want))),  # as the JSON holds it (lists, not tuples)
    )
    for c in data["configs"]:
        # the block's Linear layers: q, k, v, o, gate, up, down; lm_head is left as upstream leaves it
        ok = c["device"] == run.gpu_name and c["quantized"] == "7/8"
        expected = f"on {run.gpu_name}, 7/8 Linear quantized (lm_head left)"
        if c["iters"]:
            ok = ok and (c["changed_codes"] or 0) > 0
            expected += ", changed codes > 0"
        codes = f", changed codes {c['changed_codes']:.4f}" if c["changed_codes"] is not None else ""
        seen = (
            f"{c['oneshot_s']:.1f} s, peak {c['peak_memory_gb']:.2f} GB ({c['memory_kind']}) on {c['device']}, "
            f"{c['quantized']} quantized{codes}; {gpu_block.BLOCKS_8B} blocks ≈ {c['projected_s'] / 60:.1f} min"
        )
        run.add("block", f"NVFP4 {c['config']}", expected, seen, ok)
    if data["configs"]:
        parts = ["base: none"] + [f"{c['config']}: {c['projected_s'] / 60:.1f} min" for c in data["configs"]]
        whole = len(data["configs"]) == len(want.iters) + 1  # the AutoRound iters and RTN
        title = f"upstream preset, {gpu_block.BLOCKS_8B} blocks (projected)"
        run.add("block", title, "4 configs", "; ".join(parts), whole or None)


def vlm_stage(run: Run) -> None:
    t0 = time.monotonic()
    rc = run_py(
        run,
        "vlm",
        (
            "model=tiny_qwen3_vl",
            "eval=chartqa",
            "scheme=nvfp4",
            "method=rtn",
            "baselines=false",
            *SMALL_CALIB,
            f"eval.limit={VLM_LIMIT}",
            "eval.max_gen_toks=32",
        ),
    )
    ended(run, "vlm", rc, t0)
    name = "tiny_qwen3_vl-nvfp4-rtn"
    rec = next((r for r in records(run) if r.name == name), None)
    if rec is None:
        run.add("vlm", name, "stored", "not stored", None if rc is None else False)
        return
    ev = rec.eval
    where = "cuda" if ev.platform.cuda else "cpu"
    run.add(
        "vlm", f"{name}: quantized on", run.gpu_name, rec.quantization.device, rec.quantization.device == run.gpu_name
    )
    run.add(
        "vlm",
        f"{name}: scored by",
        f"hf-multimodal on {run.device}, chat template",
        f"{ev.lm_eval_model} on {where}, chat template {rec.eval_settings.apply_chat_template}",
        ev.lm_eval_model == "hf-multimodal" and where == run.device and rec.eval_settings.apply_chat_template,
    )
    n = rec.table[0].n_samples if rec.table else None
    run.add(
        "vlm",
        f"{name}: chartqa",
        f"n={VLM_LIMIT}",
        f"{rec.table[0].value:.3f} (n={n})" if rec.table else "none",
        n == VLM_LIMIT,
    )


# ---- the output ----------------------------------------------------------------------------


def pack_logs(run: Run) -> None:
    """The runs' own logs (quantize.log, lm_eval.log, the block's) as one file beside the rows."""
    tmp = run.out / "logs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for log in sorted(run.work.rglob("*.log")):
            if "kit" not in log.relative_to(run.work).parts[:1]:
                tar.add(log, arcname=str(log.relative_to(run.work)))
    os.replace(tmp, run.out / "logs.tar.gz")


def write_reference(run: Run, path: Path) -> None:
    """The CPU variant's scores, for the GPU variant to compare with (docs/data)."""
    scores, platform = {}, {}
    for rec in records(run):
        row = rec.metric(STRICT)
        if rec.model.name == "tiny_llama" and row is not None and row.n_samples == run.limit:
            scores[rec.name] = {"value": row.value, "stderr": row.stderr or 0.0, "n": row.n_samples}
            platform = {"cpu_isa": rec.eval.platform.cpu_isa, "versions": {k: v for k, v in rec.versions.items() if v}}
    data = {
        "made_by": "python -m tools.gpu_offline --device cpu --write-reference (the CPU variant's own runs)",
        "limit": run.limit,
        **platform,
        "scores": dict(sorted(scores.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    run.log(f"[gpu-offline] CPU scores of {len(scores)} runs written to {path}")


STAGE_FUNCS = {
    "env": env_stage,
    "tiny w4a16": lambda r: tiny_stage(r, "w4a16"),
    "tiny nvfp4": lambda r: tiny_stage(r, "nvfp4"),
    "block": block_stage,
    "vlm": vlm_stage,
}


def run_stages(run: Run, stages: list[str]) -> None:
    for stage in stages:
        if stage == "kit":
            continue
        if run.left() < NEEDS_S[stage]:
            run.add(
                stage,
                "started",
                f"at least {NEEDS_S[stage]} s of the budget left",
                f"{max(run.left(), 0):.0f} s left: skipped",
                None,
            )
        else:
            run.log(f"[gpu-offline] {stage} ({run.left():.0f} s of the budget left)")
            try:
                STAGE_FUNCS[stage](run)
            except Interrupted:
                run.add(stage, "ran", "to its end", "interrupted by a signal", False)
                raise
            except Exception as e:  # a stage's own failure is its row; the next stage still runs
                run.add(stage, "ran", "to its end", f"{type(e).__name__}: {str(e)[:300]}", False)
        run.write_table()
        pack_logs(run)


def interrupted(signum, frame) -> None:
    raise Interrupted()


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 -m tools.gpu_offline", description=__doc__.splitlines()[0])
    ap.add_argument("--kit", type=Path, help="make gpu-kit's folder (.gpu-kit); without it: the installed packages")
    ap.add_argument("--out", type=Path, required=True, help="rows.jsonl, table.md, check.log, logs.tar.gz")
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument(
        "--stages", default=",".join(STAGES), help=f"a comma-separated subset of: {', '.join(STAGES)} (--kit: always)"
    )
    ap.add_argument("--limit", type=int, default=LIMIT, help="gsm8k_arith problems per text run")
    ap.add_argument("--work", type=Path, help="work folder (default: a new temporary one, removed after)")
    ap.add_argument("--checkpoints", type=Path, help="paths.checkpoints to share: checkpoints stored there are reused")
    ap.add_argument("--write-reference", type=Path, help="(CPU variant) write the text runs' scores here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := [s for s in stages if s not in STAGES]:
        print(f"gpu-offline: --stages {', '.join(unknown)} unknown; choose from: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else "cuda" if gpu_visible() else "cpu"
    if args.write_reference and device != "cpu":
        print("gpu-offline: --write-reference is for the CPU variant (--device cpu)", file=sys.stderr)
        return 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU the machine has stays out of the CPU variant
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("rows.jsonl", "table.md", "check.log", "logs.tar.gz"):
        (args.out / name).unlink(missing_ok=True)
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu-offline-"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(
        args.out.resolve(),
        work,
        device,
        env,
        args.budget_s,
        args.limit,
        args.checkpoints.resolve() if args.checkpoints else None,
    )
    run.log(f"[gpu-offline] {device} variant, budget {args.budget_s:.0f} s, work {work}, out {run.out}")
    signal.signal(signal.SIGTERM, interrupted)
    try:
        if args.kit is not None:
            install_kit(run, args.kit.resolve())
        run.write_table()
        run_stages(run, stages)
        if args.write_reference:
            write_reference(run, args.write_reference)
    except CheckError as e:
        print(f"gpu-offline: {e}", file=sys.stderr)
        return 2
    except Interrupted:
        run.write_table()
        print("gpu-offline: stopped by SIGTERM; the finished stages' rows are in", run.out, file=sys.stderr)
        return 143
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    run.write_table(final=True)
    print("\n" + (run.out / "table.md").read_text())
    return 1 if any(r.result == "FAIL" for r in run.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
