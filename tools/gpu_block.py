"""One decoder block at Meta-Llama-3.1-8B-Instruct's shapes, quantized by the harness's own
quantize child as upstream's NVFP4 preset does it: what one block costs in time and memory,
and what that projects to for the 32-block model. A stage of ``tools.gpu_offline``.

    python -m tools.gpu_block --device cuda|cpu --work DIR --json FILE

The block has random bf16 weights (seeded): the cost of AutoRound's tuning does not depend on
what the weights are. The model is that one block with the tiny Llama's tokenizer (384 tokens;
the 128k vocabulary only adds an embedding and lm_head, which the preset leaves out). Its
calibration is the tiny Llama's text, packed into fixed-length samples as every run's is. Each
config's result is added to FILE as soon as it is measured, so a run cut short keeps the ones
before it. The CPU variant runs a block of 1/8 the width with small calibration and iters:
the same code and table, not the 8B numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from autoround_exp.fsutil import write_atomic

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = ROOT / "autoround_exp" / "tiny" / "assets" / "tiny_llama"
TINY_CALIB = ROOT / "autoround_exp" / "tiny" / "assets" / "data" / "arith_gsm8k" / "calib.jsonl"
BLOCKS_8B = 32  # Meta-Llama-3.1-8B-Instruct's decoder blocks


@dataclass(frozen=True)
class Shape:
    label: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 128


LLAMA_8B = Shape("Llama-3.1-8B", 4096, 14336, 32, 8)
EIGHTH = Shape("1/8 width", 512, 1792, 4, 1)


@dataclass(frozen=True)
class Plan:
    """What the block stage runs: the shape, the upstream preset's calibration and the
    AutoRound iters it measures (the CPU variant: the same configs, scaled down)."""

    shape: Shape
    nsamples: int
    seqlen: int
    iters: tuple[int, ...]  # AutoRound's; RTN is measured after them


def plan_for(device: str) -> Plan:
    if device == "cuda":  # upstream's preset: 128 samples x 2048 tokens, iters 0 and 200
        return Plan(LLAMA_8B, 128, 2048, (200, 0))
    return Plan(EIGHTH, 8, 128, (4, 0))


def build_block(folder: Path, shape: Shape, seed: int = 0) -> int:
    """A one-block Llama at ``shape`` with random bf16 weights, saved with the tiny Llama's
    tokenizer. Returns the block's parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.model.layers[0].parameters())


def calibration_text(folder: Path, tokens_needed: int) -> Path:
    """The tiny Llama's calibration text, repeated until packing it gives ``tokens_needed``."""
    from transformers import AutoTokenizer

    lines = [ln for ln in TINY_CALIB.read_text().splitlines() if ln.strip()]
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    have = sum(len(tokenizer(json.loads(ln)["text"], add_special_tokens=False)["input_ids"]) + 1 for ln in lines)
    path = folder / "calib.jsonl"
    path.write_text("\n".join(lines * (math.ceil(tokens_needed / have) + 1)) + "\n")
    return path


def experiment(block: Path, calib: Path, plan: Plan, device: str, method: str, iters: int):
    """The harness's own config for the run: upstream's Llama-3.1-8B model config with the
    block in place of the hub model, composed and checked as run.py does."""
    from hydra import compose, initialize_config_dir

    from autoround_exp.config import register_configs
    from autoround_exp.config_checks import validate

    overrides = [
        "model=llama3_1_8b_instruct",
        f"model.path={block}",
        f"model.quantize_device={device}",
        f"model.linear_in_features=[{plan.shape.hidden_size},{plan.shape.intermediate_size}]",
        "scheme=nvfp4",
        f"method={method}",
        f"iters={iters}",
        f"calibration.source={calib}",
        "calibration.mode=pack",
        f"calibration.nsamples={plan.nsamples}",
        f"calibration.seqlen={plan.seqlen}",
        "tracking.enabled=false",
        "fidelity=none",
    ]
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return validate(compose("config", overrides=overrides))


def measure(block: Path, calib: Path, plan: Plan, device: str, method: str, iters: int | None, work: Path) -> dict:
    from autoround_exp import quantize

    label = "rtn" if method == "rtn" else f"autoround-iters{iters}"
    exp = experiment(block, calib, plan, device, method, iters or 0)
    out = work / "checkpoints" / label
    t0 = time.perf_counter()
    q = quantize.quantize(exp, out, work / f"quantize-{label}.log")
    v = q.verification
    codes = v.changed_codes if v is not None else None
    return {
        "config": label,
        "method": method,
        "iters": iters,
        "oneshot_s": q.oneshot_seconds,
        "child_s": round(time.perf_counter() - t0, 1),
        "peak_memory_gb": q.peak_memory_gb,
        "memory_kind": q.memory_kind,
        "device": q.device,
        "quantized": f"{v.quantized}/{v.linear_layers}" if v is not None else None,
        "changed_codes": codes.fraction if codes is not None and codes.measured else None,
        "projected_s": round(BLOCKS_8B * q.oneshot_seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.gpu_block", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    plan = plan_for(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    block = args.work / "block"
    t0 = time.perf_counter()
    params = build_block(block, plan.shape)
    calib = calibration_text(args.work, plan.nsamples * plan.seqlen)
    found = {"plan": asdict(plan), "block_params": params, "build_s": round(time.perf_counter() - t0, 1)}
    found["configs"] = []
    write_atomic(args.json, json.dumps(found, indent=2))  # the plan, before the first config is measured
    print(
        f"[block] {plan.shape.label} block, {params / 1e6:.0f}M parameters, built in {found['build_s']} s", flush=True
    )
    for method, iters in [*(("autoround", i) for i in plan.iters), ("rtn", None)]:
        found["configs"].append(measure(block, calib, plan, args.device, method, iters, args.work))
        write_atomic(args.json, json.dumps(found, indent=2))
        print(f"[block] {json.dumps(found['configs'][-1])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
