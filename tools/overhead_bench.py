"""What the harness costs on top of the work it orchestrates, measured on the embedded tiny
model (numbers printed, nothing asserted: `make bench`).

1. one harness run (`run.py`: validate, quantize in a child, lm-eval in a child, MLflow,
   report) vs the raw steps a user would otherwise type: a plain llm-compressor `oneshot`
   script and the same `lm_eval` command line. Goal: ratio <= 1.05.
2. re-running the finished sweep (everything reused) vs its first run. Goal: <= 0.05.
3. `python run.py --help`, and rejecting bad input, each as a fresh process.

    python -m tools.overhead_bench [--iters 16] [--limit 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autoround_exp.store import Store

ROOT = Path(__file__).resolve().parents[1]

# A plain llm-compressor script, as upstream's examples write one: nothing of the harness.
RAW_QUANTIZE = """
import json, random, sys
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.autoround import AutoRoundModifier

model_path, calib, out, iters, nsamples, seqlen = sys.argv[1:7]
iters, nsamples, seqlen = int(iters), int(nsamples), int(seqlen)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(model_path)
texts = [json.loads(line)["text"] for line in open(calib)]
random.Random(0).shuffle(texts)
ids = [t for text in texts for t in tok(text)["input_ids"]]
samples = [ids[i * seqlen:(i + 1) * seqlen] for i in range(nsamples)]
ds = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * seqlen for _ in samples]})
recipe = AutoRoundModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], iters=iters, batch_size=4,
                           enable_torch_compile=False)
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=nsamples,
        shuffle_calibration_samples=False)
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
"""

BAD_INPUT = [
    ["scheme=nvfp5"],
    ["iters=-1"],
    ["model.path=/nonexistent/model"],
    ["eval=chartqa"],
    ["-m", "iters=0,-1"],
]


def timed(argv: list[str], cwd: Path, check: bool = True, datasets_cache: Path | None = None) -> float:
    """Wall seconds of ``argv``. ``datasets_cache``: a Hugging Face datasets cache of its own, so
    that no measured step finds the task data already converted by another (the raw lm_eval
    run reuses the harness's task files: with a shared cache it would skip their conversion)."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(datasets_cache)} if datasets_cache else None
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(argv[:4])} ... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds


def harness_argv(work: Path, iters: int, limit: int) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "run.py"),
        "method=autoround",
        f"iters={iters}",
        "scheme=w4a16",
        "baselines=false",
        "serve=hf",
        f"eval.limit={limit}",
        "method.batch_size=4",
        "method.enable_torch_compile=false",
        f"paths.results={work / 'results'}",
        f"paths.work={work / 'work'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"tracking.artifact_root={work / 'mlartifacts'}",
        "report.readme=null",
        # the raw steps have no comparison with the base: like with like (its cost: tools.fidelity_bench)
        "fidelity=none",
    ]


def one_round(tmp: Path, iters: int, limit: int) -> dict[str, float]:
    work = tmp / "harness"
    work.mkdir()
    first = timed(harness_argv(work, iters, limit), work, datasets_cache=tmp / "cache-harness")
    rerun = timed(harness_argv(work, iters, limit), work, datasets_cache=tmp / "cache-harness")
    (rec,) = Store(work / "results").records()
    calib = rec.calibration

    raw = tmp / "raw"
    raw.mkdir()
    script = raw / "quantize.py"
    script.write_text(RAW_QUANTIZE)
    ckpt = raw / "checkpoint"
    model = rec.model.path
    calib_args = [calib.source, str(ckpt), str(iters), str(calib.nsamples), str(calib.seqlen)]
    raw_quant = timed([sys.executable, str(script), model, *calib_args], raw, datasets_cache=tmp / "cache-raw")
    # the harness's own lm_eval command line, pointed at the raw checkpoint and a new output
    argv = [a.replace(rec.checkpoint, str(ckpt)) for a in rec.eval.command]
    out_at = argv.index("--output_path") + 1
    argv[out_at] = str(raw / "lm_eval")
    raw_eval = timed(argv, raw, datasets_cache=tmp / "cache-raw")
    quant_s, eval_s = rec.stages.get("quantize", 0.0), rec.stages.get("evaluate", 0.0)
    return {
        "harness": first,
        "rerun": rerun,
        "raw_quantize": raw_quant,
        "raw_eval": raw_eval,
        "harness_quantize": quant_s,  # the stages as the harness timed them (its record's stages)
        "harness_evaluate": eval_s,
        "harness_rest": first - quant_s - eval_s,  # start-up, config, MLflow, the record
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 16: on an AVX2-only CPU no iteration of 4 improves on the start in any block, and the
    # harness refuses the round-to-nearest checkpoint it gets as an AutoRound no-op
    ap.add_argument("--iters", type=int, default=16, help="AutoRound iters of the measured run")
    ap.add_argument("--limit", type=int, default=40, help="gsm8k documents evaluated")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; medians are printed")
    args = ap.parse_args(argv)

    rounds = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="autoround-exp-bench-") as tmp:
            rounds.append(one_round(Path(tmp), args.iters, args.limit))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in rounds[-1].items()), flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    raw = med["raw_quantize"] + med["raw_eval"]

    with tempfile.TemporaryDirectory(prefix="autoround-exp-bench-") as tmp:
        help_s = timed([sys.executable, str(ROOT / "run.py"), "--help"], Path(tmp))
        bad = {
            " ".join(a): timed([sys.executable, str(ROOT / "run.py"), *a], Path(tmp), check=False) for a in BAD_INPUT
        }
        left = [p.name for p in Path(tmp).iterdir()]

    print(
        f"\ntiny model, AutoRound W4A16 iters={args.iters}, gsm8k limit={args.limit}, {args.repeats} round(s), median"
    )
    print(f"{'measure':<44} {'seconds':>8} {'ratio':>7} {'goal':>6}")
    print(f"{'harness run (run.py, one job)':<44} {med['harness']:8.1f}")
    print(f"{'raw steps (oneshot script + lm_eval CLI)':<44} {raw:8.1f}")
    print(f"{'  harness / raw':<44} {'':8} {med['harness'] / raw:7.3f} {'<=1.05':>6}")
    overhead = med["harness"] - raw
    print(f"{'  overhead (harness - raw)':<44} {overhead:8.1f}")
    print(f"{'    quantize stage - oneshot script':<44} {med['harness_quantize'] - med['raw_quantize']:8.1f}")
    print(f"{'    evaluate stage - lm_eval CLI':<44} {med['harness_evaluate'] - med['raw_eval']:8.1f}")
    print(f"{'    outside the stages (start, config, log)':<44} {med['harness_rest']:8.1f}")
    # The overhead is fixed (composition, the serve probe, MLflow, the report), so the ratio
    # meets 1.05 for any job whose raw steps take longer than this:
    print(f"{'  raw job length where ratio = 1.05':<44} {max(overhead, 0) / 0.05:8.0f}")
    print(f"{'re-run of the finished sweep':<44} {med['rerun']:8.1f}")
    print(f"{'  re-run / first run':<44} {'':8} {med['rerun'] / med['harness']:7.3f} {'<=0.05':>6}")
    print(f"{'python run.py --help':<44} {help_s:8.2f}")
    for args_, s in bad.items():
        print(f"{'rejected: ' + args_:<44} {s:8.2f}")
    print(f"files left by the rejected runs: {left or 'none'}")


if __name__ == "__main__":
    main()
