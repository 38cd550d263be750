"""What the fidelity stage costs and how close its top-k store comes to the exact KL divergence,
measured on the embedded tiny Llama (numbers printed, nothing asserted: `make bench`).

1. A W4A16 RTN run through ``run.py`` with the stage on (serve=hf: it runs in the evaluation
   child, after lm-eval): the stage's wall seconds in the base's job (its distributions stored)
   and in the checkpoint's (compared). Goal: at most 10 s per checkpoint.
2. The fidelity child alone on that checkpoint, for several top-k: mean KLD against the exact
   value, seconds, positions per second, the base's store per 1 M tokens on disk, peak RSS.

    python -m tools.fidelity_bench [--ks 16,64,256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autoround_exp.assets import asset

ROOT = Path(__file__).resolve().parents[1]


def harness_run(tmp: Path) -> dict:
    """The RTN run with its base, as a user runs it; its records' stage times."""
    argv = [sys.executable, str(ROOT / "run.py"), "scheme=w4a16", "method=rtn", "serve=hf", "eval.limit=4"]
    argv += [f"paths.results={tmp / 'results'}", f"paths.work={tmp / 'work'}", "tracking.enabled=false"]
    argv += ["report.readme=null"]
    subprocess.run(argv, cwd=tmp, check=True, capture_output=True, text=True)
    recs = [json.loads(p.read_text()) for p in (tmp / "results" / "runs").glob("*.json")]
    return {r["name"]: r for r in recs}


def child(tmp: Path, checkpoint: str, k: int) -> tuple[dict, float, int, float]:
    """(summary, wall seconds, the base store's bytes, peak RSS GB) of one ``run`` of the child:
    the base stored with top ``k``, then the checkpoint compared."""
    req = {
        "text": asset("data/arith_gsm8k/dev.jsonl"),
        "seqlen": 128,
        "max_tokens": 4096,
        "top_k": k,
        "base_model": asset("tiny_llama"),
        "base": str(tmp / f"base-{k}.npz"),
        "make_base": True,
        "model": checkpoint,
        "out": str(tmp / f"positions-{k}.npz"),
        "summary": str(tmp / f"summary-{k}.json"),
    }
    path = tmp / f"request-{k}.json"
    path.write_text(json.dumps(req))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autoround_exp.fidelity_child", "run", str(path)], cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    return json.loads(Path(req["summary"]).read_text()), wall, Path(req["base"]).stat().st_size, rss_gb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="16,64,256", help="top-k stores to compare with the exact one")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        recs = harness_run(tmp)
        base, rtn = recs["tiny_llama-base"], recs["tiny_llama-w4a16-rtn"]
        print("fidelity stage in run.py (wall seconds; serve=hf: in the evaluation child, after lm-eval):")
        print(f"  base job (its distributions stored): {base['stages']['fidelity']:.1f} s")
        print(f"  W4A16 RTN job (compared with them):  {rtn['stages']['fidelity']:.1f} s")
        vocab = rtn["fidelity"]["vocab"]
        print(f"\nthe child alone, base stored and W4A16 RTN compared in one process (vocabulary {vocab}):")
        print("| top k | mean KLD | vs exact | child wall | positions/s (compare) | base store per 1 M tokens", end="")
        print(" | peak RSS |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        exact = None
        for k in sorted({vocab, *map(int, args.ks.split(","))}, reverse=True):
            s, wall, size, rss = child(tmp, rtn["checkpoint"], k)
            kld = s["kld_mean"]["value"]
            exact = kld if k >= vocab else exact
            rel = "exact" if k >= vocab else f"{100 * (kld - exact) / exact:+.3f} %"
            per_m = size / s["positions"] * 1e6 / 1e9
            print(
                f"| {k} | {kld:.6f} | {rel} | {wall:.1f} s | {s['positions'] / s['seconds']:.0f} "
                f"| {per_m:.2f} GB | {rss:.2f} GB |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
