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


def request(tmp: Path, base: Path, model: str, name: str, top_k: int = 384, make_base: bool = False):
    """(mode, request path): ``model`` against the base's store; ``make_base``: the store made
    first, in the same process (the pipeline's ``run`` mode)."""
    req = {**SETTINGS, "model": model, "base": str(base), "base_model": asset("tiny_llama"), "top_k": top_k}
    req |= {"make_base": make_base, "out": str(tmp / f"{name}.npz"), "summary": str(tmp / f"{name}-summary.json")}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(req))
    return "run" if make_base else "compare", path


def against(*requests: tuple[str, Path]) -> list[tuple[dict, list]]:
    """Each request through the child's ``main``, in order, in one process (its start-up paid
    once: each request loads its models as a child of the stage does): (summary, positions) each."""
    code = "import sys; from autoround_exp.fidelity_child import main; "
    code += "sys.exit(max(main([m, p]) for m, p in zip(sys.argv[1::2], sys.argv[2::2])))"
    argv = [sys.executable, "-c", code, *(str(x) for r in requests for x in r)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = []
    for _, path in requests:
        req = json.loads(path.read_text())
        s, positions = json.loads(Path(req["summary"]).read_text()), fidelity.load_positions(Path(req["out"]))
        assert len(positions) == s["chunks"]
        out.append((s, positions))
    return out


def damaged_copy(tmp: Path) -> str:
    out = tmp / "damaged"
    shutil.copytree(asset("tiny_llama"), out)
    weights = load_file(str(out / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"] *= 1.5  # one layer's weights scaled
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def test_identical_rtn_and_damaged_checkpoints_against_the_base(tmp_path):
    # the session's RTN checkpoints: W4A16, and NVFP4 (W4A4: its compressed layers run in bfloat16 only)
    args = ["-m", "method=rtn", "scheme=w4a16,nvfp4", "baselines=false", "serve=hf", "eval.limit=2", *SMALL_CALIB]
    run_py(tmp_path, *args, "report.readme=null")
    recs = records(tmp_path)
    w4a16, nvfp4_ckpt = recs["tiny_llama-w4a16-rtn"]["checkpoint"], recs["tiny_llama-nvfp4-rtn"]["checkpoint"]
    base = tmp_path / "base.npz"
    (same, _), (rtn, rtn_pos), (nvfp4, _), (damaged, damaged_pos), (approx, _) = against(
        request(tmp_path, base, asset("tiny_llama"), "same", make_base=True),  # the store made first
        request(tmp_path, base, w4a16, "rtn"),
        request(tmp_path, base, nvfp4_ckpt, "nvfp4"),
        request(tmp_path, base, damaged_copy(tmp_path), "damaged"),
        request(tmp_path, tmp_path / "top16.npz", w4a16, "rtn16", top_k=16, make_base=True),
    )
    assert same["exact"] and same["positions"] == 32 * 128
    assert same["kld_mean"]["value"] == 0 and same["kld_max"]["value"] == 0 and same["same_top"]["value"] == 1
    assert same["ln_ppl_ratio"]["value"] == 0

    assert nvfp4["kld_mean"]["value"] > 0 and nvfp4["same_top"]["value"] < 1 and nvfp4["dtype"] == "bfloat16 (cpu)"
    assert 0 < rtn["kld_mean"]["value"] < damaged["kld_mean"]["value"]
    assert rtn["same_top"]["value"] > damaged["same_top"]["value"]
    t = fidelity.paired(rtn_pos, damaged_pos)
    assert t.low > 0 and t.p < 0.05, t

    # the top-16 store: never above the exact divergence, and how far below it is measured here
    assert not approx["exact"] and approx["kld_mean"]["value"] <= rtn["kld_mean"]["value"]
    print(f"top-16 mean KLD {approx['kld_mean']['value']:.6f} vs exact {rtn['kld_mean']['value']:.6f}")
