"""The fidelity child on the tiny Llama for real (transformers, compressed-tensors): the base
against itself, an RTN checkpoint, and a copy with one layer damaged on purpose; the top-k
store against the exact one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from autoround_exp import fidelity
from autoround_exp.assets import asset
from tests.support import ROOT, SMALL_CALIB, records, run_py

pytestmark = pytest.mark.slow

TEXT = asset("data/arith_gsm8k/dev.jsonl")  # held out: neither trained on nor scored by gsm8k_arith
SETTINGS = {"text": TEXT, "seqlen": 128, "max_tokens": 4096}


def child(mode: str, tmp: Path, name: str, **req) -> dict:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({**SETTINGS, **req}))
    proc = subprocess.run(
        [sys.executable, "-m", "autoround_exp.fidelity_child", mode, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(Path(req["summary"]).read_text()) if req.get("model") else {}


def against(
    tmp: Path, base: Path, model: str, name: str, top_k: int = 384, make_base: bool = False
) -> tuple[dict, list]:
    """``model`` against the base's store; ``make_base``: the store made first, in the same
    process (the pipeline's ``run`` mode)."""
    out = tmp / f"{name}.npz"
    s = child(
        "run" if make_base else "compare",
        tmp,
        name,
        model=model,
        base=str(base),
        base_model=asset("tiny_llama"),
        make_base=make_base,
        top_k=top_k,
        out=str(out),
        summary=str(tmp / f"{name}-summary.json"),
    )
    positions = fidelity.load_positions(out)
    assert len(positions) == s["chunks"]
    return s, positions


def damaged_copy(tmp: Path) -> str:
    out = tmp / "damaged"
    shutil.copytree(asset("tiny_llama"), out)
    weights = load_file(str(out / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"] *= 1.5  # one layer's weights scaled
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def test_identical_rtn_and_damaged_checkpoints_against_the_base(tmp_path):
    base = tmp_path / "base.npz"
    same, _ = against(tmp_path, base, asset("tiny_llama"), "same", make_base=True)
    assert same["exact"] and same["positions"] == 32 * 128
    assert same["kld_mean"]["value"] == 0 and same["kld_max"]["value"] == 0 and same["same_top"]["value"] == 1
    assert same["ln_ppl_ratio"]["value"] == 0

    # the session's RTN checkpoints: W4A16, and NVFP4 (W4A4: its compressed layers run in bfloat16 only)
    args = ["-m", "method=rtn", "scheme=w4a16,nvfp4", "baselines=false", "serve=hf", "eval.limit=2", *SMALL_CALIB]
    run_py(tmp_path, *args, "report.readme=null")
    recs = records(tmp_path)
    rec = recs["tiny_llama-w4a16-rtn"]
    rtn, rtn_pos = against(tmp_path, base, rec["checkpoint"], "rtn")
    nvfp4, _ = against(tmp_path, base, recs["tiny_llama-nvfp4-rtn"]["checkpoint"], "nvfp4")
    assert nvfp4["kld_mean"]["value"] > 0 and nvfp4["same_top"]["value"] < 1 and nvfp4["dtype"] == "bfloat16 (cpu)"
    damaged, damaged_pos = against(tmp_path, base, damaged_copy(tmp_path), "damaged")
    assert 0 < rtn["kld_mean"]["value"] < damaged["kld_mean"]["value"]
    assert rtn["same_top"]["value"] > damaged["same_top"]["value"]
    t = fidelity.paired(rtn_pos, damaged_pos)
    assert t.low > 0 and t.p < 0.05, t

    # the top-16 store: never above the exact divergence, and how far below it is measured here
    approx, _ = against(tmp_path, tmp_path / "top16.npz", rec["checkpoint"], "rtn16", top_k=16, make_base=True)
    assert not approx["exact"] and approx["kld_mean"]["value"] <= rtn["kld_mean"]["value"]
    print(f"top-16 mean KLD {approx['kld_mean']['value']:.6f} vs exact {rtn['kld_mean']['value']:.6f}")
