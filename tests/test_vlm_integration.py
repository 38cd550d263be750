"""The real chain on the embedded tiny Qwen3-VL, on CPU: llm-compressor (AutoRound and RTN,
upstream's Qwen3-VL recipe) -> lm-eval's stock chartqa through ``hf-multimodal`` with the
chat template, in a child process -> MLflow -> report. Nothing mocked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from autoround_exp.assets import asset
from autoround_exp.report import runs, tables
from tests.support import ROOT, SMALL_CALIB, mlflow_runs, paths_args, records

pytestmark = pytest.mark.slow

LIMIT = 12
SWEEP = [
    "-m",
    "model=tiny_qwen3_vl",
    "eval=chartqa",
    # upstream's Qwen3-VL scheme; W4A16 on the VLM: the image-calibration and AWQ tests below
    "scheme=nvfp4",
    "iters=16",
    f"eval.limit={LIMIT}",
    "eval.max_gen_toks=32",
    *SMALL_CALIB,  # gpu-check's: its NVFP4 RTN checkpoint is made once
]


def run(workdir: Path, args: list[str], fidelity: bool = False) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "run.py"), *args, *paths_args(workdir, fidelity=fidelity), "report.readme=null"]
    proc = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vlm")
    # the fidelity stage on, as a user's sweep has it; 16 of the 50 held-out charts
    return workdir, run(workdir, [*SWEEP, f"fidelity.max_images={CHARTS}"], fidelity=True)


CHARTS = 16


def test_each_quantized_run_is_compared_with_its_base_on_text_and_on_charts_with_their_images(sweep):
    """Fidelity on a vision-language model, in the evaluation child (hf-multimodal) after chartqa:
    the next-token distributions on the held-out text, and on the text after the image of
    held-out charts with their questions; both in the record, MLflow and the report."""
    workdir, proc = sweep
    recs = records(workdir)
    assert proc.stdout.count("the base's distributions stored") == 1, proc.stdout[-3000:]
    _, logged = mlflow_runs(workdir)
    for name, rec in recs.items():
        f = rec["fidelity"]
        if name == "tiny_qwen3_vl-base":
            assert f is None and rec["stages"]["fidelity"] > 0
            continue
        assert f["measured"] and f["backend"] == "hf bfloat16 (cpu), in the evaluation child", f
        assert f["settings"]["text"].endswith("arith_gsm8k/dev.jsonl") and f["positions"] > 0
        assert f["vocab"] == 1024 and not f["exact"]  # the default top 512 of its 1024 tokens, the tail one bucket
        assert 0 < f["figures"]["kld_mean"]["value"] and 0.5 < f["figures"]["same_top"]["value"] < 1, (name, f)
        charts = f["images"]
        assert f["settings"]["images"].endswith("charts/dev.parquet") and f["settings"]["max_images"] == CHARTS
        assert charts["measured"] and charts["chunks"] == CHARTS and charts["positions"] > 10 * CHARTS, charts
        assert 0 < charts["figures"]["kld_mean"]["value"] and 0.5 < charts["figures"]["same_top"]["value"] <= 1
        assert Path(charts["per_position"]).is_file() and Path(charts["base"]).is_file()
        (run_,) = [r for r in logged if r.info.run_id == rec["tracking"]["run_id"]]
        assert run_.data.metrics["fidelity_images/kld_mean"] == charts["figures"]["kld_mean"]["value"]
    report = (workdir / "results" / "report.md").read_text()
    assert f"positions of the text after the image of {CHARTS} charts of `dev.parquet`" in report


def test_the_base_read_against_its_own_chart_store_gives_zero_divergence(sweep, tmp_path):
    """The charts pair position by position: the base model against the distributions the sweep
    stored for it (its tokens and pixels checked) gives KLD 0 and the same top token everywhere."""
    workdir, _ = sweep
    rec = records(workdir)["tiny_qwen3_vl-nvfp4-rtn"]
    req = json.loads((workdir / "work" / "fidelity" / rec["key"] / "request.json").read_text())
    req |= {"model": req["base_model"], "make_base": False, "done": None}
    req |= {"out": str(tmp_path / "t.npz"), "summary": str(tmp_path / "t.json")}
    req |= {"images_out": str(tmp_path / "c.npz"), "images_summary": str(tmp_path / "c.json")}
    (tmp_path / "req.json").write_text(json.dumps(req))
    argv = [sys.executable, "-m", "autoround_exp.fidelity_child", "compare", str(tmp_path / "req.json")]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for summary in ("t.json", "c.json"):
        s = json.loads((tmp_path / summary).read_text())
        assert s["kld_max"]["value"] == 0 and s["same_top"]["value"] == 1 and s["ln_ppl_ratio"]["value"] == 0, s
    assert json.loads((tmp_path / "c.json").read_text())["chunks"] == CHARTS


def test_every_job_of_the_sweep_finished_with_chartqa_scores_in_mlflow(sweep):
    workdir, proc = sweep
    recs = records(workdir)
    assert set(recs) == {
        "tiny_qwen3_vl-base",
        "tiny_qwen3_vl-nvfp4-rtn",
        "tiny_qwen3_vl-nvfp4-autoround-iters16",
    }
    _, runs = mlflow_runs(workdir)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        for metric in ("relaxed_accuracy", "anywhere_accuracy", "exact_match"):
            assert f"chartqa_charts/{metric}/none" in r.data.metrics
        assert r.data.tags["add_bos_token"] == "False" and r.data.tags["double_bos"] == "False"
    for rec in recs.values():
        ev = rec["eval"]
        assert ev["lm_eval_model"] == "hf-multimodal" and "--apply_chat_template" in ev["command"]
        assert rec["table"][0]["n_samples"] == LIMIT


def test_checkpoints_keep_the_vision_tower_and_lm_head_unquantized(sweep):
    workdir, _ = sweep
    for rec in records(workdir).values():
        if rec["method"] == "none":
            continue
        ckpt = Path(rec["checkpoint"])
        q = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        vision_linears = {k[: -len(".weight")] for k in keys if k.startswith("model.visual.") and k.endswith(".weight")}
        vision_linears = {k for k in vision_linears if "norm" not in k and "embed" not in k}
        assert vision_linears and vision_linears <= set(q["ignore"])  # every vision Linear listed
        assert all("visual" in name or "lm_head" in name for name in q["ignore"])
        # the vision tower's weights stay 16-bit; the language model's Linear layers are packed
        assert "model.visual.blocks.0.attn.qkv.weight" in keys
        assert "model.language_model.layers.0.self_attn.q_proj.weight_packed" in keys
        if rec["method"] == "autoround":  # text calibration, as upstream's Qwen3-VL example
            assert rec["calibration"]["mode"] == "pack" and rec["calibration"]["images"] == 0


def test_the_report_has_the_chartqa_section_with_the_bos_choice(sweep):
    workdir, _ = sweep
    report = (workdir / "results" / "report.md").read_text()
    title = "### TinyQwen3-VL-Charts — chartqa_charts, 0-shot, first 12 documents (add_bos_token=False, chat template)"
    assert title in report
    assert "relaxed_accuracy" in report and "AutoRound iters=16" in report
    # image documents are paired across runs (lm-eval's own doc hash of them differs each run)
    section = report[report.index(title) :]
    assert "no samples" not in section
    assert re.search(r"McNemar exact\)\s*\|\s*12\s*\|", section)


def test_image_text_calibration_tunes_on_charts(tmp_path):
    """calibration.source=<ChartQA-format parquet>: each sample a chart and its question,
    seqlen tokens with the image whole; the images are counted and hashed with the tokens."""
    calib = asset("data/charts/calib.parquet")
    args = ["model=tiny_qwen3_vl", "eval=chartqa", "scheme=w4a16", "iters=16", "baselines=false"]
    args += [f"calibration.source={calib}", "calibration.nsamples=8", "calibration.seqlen=64"]
    run(tmp_path, [*args, "eval.limit=2", "eval.max_gen_toks=16"])
    (rec,) = records(tmp_path).values()
    cal = rec["calibration"]
    assert cal["mode"] == "image_text" and cal["images"] == 8 and cal["seqlen"] == 64
    assert cal["source"] == calib and len(cal["token_sha256"]) == 64
    tokens = json.loads((Path(rec["checkpoint"]) / "calibration_tokens.json").read_text())
    assert tokens["token_sha256"] == cal["token_sha256"] and [len(t) for t in tokens["input_ids"]] == [64] * 8


def test_gsm8k_on_the_vision_language_model_goes_through_hf_multimodal(tmp_path):
    run(tmp_path, ["model=tiny_qwen3_vl", "method=none", "eval=gsm8k", "eval.limit=8"])
    (rec,) = records(tmp_path).values()
    assert rec["eval"]["lm_eval_model"] == "hf-multimodal" and rec["eval"]["task"] == "gsm8k_arith"
    assert "gsm8k_arith/exact_match/strict-match" in rec["metrics"]


def test_a_recipe_that_quantizes_the_vision_tower_scores_clearly_below_upstreams(tmp_path):
    """The mistake upstream's ignore list guards against, made on purpose
    (model.quantize_vision=true): NVFP4 RTN of the vision tower too. The embedded model reads
    its charts, so the score falls, by a paired test on the same charts."""
    args = ["model=tiny_qwen3_vl", "eval=chartqa", "scheme=nvfp4", "method=rtn", "baselines=false"]
    # the sweep's calibration: its NVFP4 RTN checkpoint is reused (the session's shared checkpoints).
    # 20 charts: the upstream recipe read 13 of them and the vision-quantized one none (measured on
    # the AVX2-only machine), an exact McNemar p of 2 x 0.5^13 = 2e-4
    args += ["eval.limit=20", "eval.max_gen_toks=16", *SMALL_CALIB]
    run(tmp_path, args)
    run(tmp_path, [*args, "model.quantize_vision=true", "model.ignore=[re:.*lm_head]"])
    recs = records(tmp_path)
    upstream, vision = recs["tiny_qwen3_vl-nvfp4-rtn"], recs["tiny_qwen3_vl-nvfp4-rtn-vision"]
    assert vision["vision_quantized"] and vision["checkpoint_name"].endswith("-VisionQuantized")
    with safe_open(Path(vision["checkpoint"]) / "model.safetensors", "pt") as f:
        assert any(k.startswith("model.visual.") and k.endswith("weight_packed") for k in f.keys())
    metric = "chartqa_charts/relaxed_accuracy/none"
    assert vision["metrics"][metric] <= upstream["metrics"][metric] - 0.1, (vision["metrics"], upstream["metrics"])
    (section,) = runs.sections(runs.from_store(tmp_path / "results"))
    table = tables.paired_table(section, 0.05)
    rows = [ln for ln in table.splitlines() if ln.startswith("| NVFP4 RTN + vision tower vs NVFP4 RTN")]
    relaxed = [ln for ln in rows if "relaxed_accuracy" in ln]
    assert len(relaxed) == 1 and relaxed[0].rstrip(" |").endswith("worse"), table  # lower, p < 0.05


def test_awq_smooths_the_language_model_with_llm_compressors_mappings_and_leaves_the_vision_tower(tmp_path):
    """method=awq on Qwen3-VL: llm-compressor's mappings (no entry for the architecture: its
    Llama-named defaults) reach the language model's layers and nothing of the vision tower."""
    args = ["model=tiny_qwen3_vl", "eval=chartqa", "scheme=w4a16", "method=awq", "baselines=false"]
    args += [*SMALL_CALIB, "method.n_grid=4", "eval.limit=2", "eval.max_gen_toks=16"]
    run(tmp_path, args)
    (rec,) = records(tmp_path).values()
    v = rec["quantization"]["verification"]
    assert v["method"] == "awq" and v["changed_codes"]["measured"] and v["changed_codes"]["fraction"] > 0
    assert v["left_out"] and all("visual" in name or "lm_head" in name for name in v["left_out"])
    with safe_open(str(Path(rec["checkpoint"]) / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.visual.blocks.0.attn.qkv.weight" in keys  # 16-bit, as upstream's recipe leaves it
    assert "model.language_model.layers.0.mlp.down_proj.weight_packed" in keys
    # what docs/methods.md says of it: the default mappings, and v -> o skipped (grouped-query attention)
    log = next((tmp_path / "work" / "logs").rglob("quantize.log")).read_text()
    assert "Qwen3VLForConditionalGeneration not found in mappings. Using default mappings" in log
    assert "mappings were skipped due to incompatible shapes" in log
