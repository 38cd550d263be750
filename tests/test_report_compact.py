"""The short results block (README, end-of-sweep console): one table per model x eval
setting in upstream's order, one row per config, numbers equal to the stored records,
nothing that changes between renderings, and small enough to read in a minute."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from autoround_exp.report import compact, runs, tables
from autoround_exp.store import Store
from tests.support import (
    ALPHA,
    CHARTQA,
    FIXTURE,
    block_of,
    check_block_against_records,
    make_demo_store,
    table_rows,
    visible,
)


@pytest.fixture
def demo_store(tmp_path) -> Path:
    return make_demo_store(tmp_path)


def test_one_row_per_config_in_upstreams_order_preferring_vllm(demo_store):
    (llama, vlm) = [s for s in runs.sections(runs.from_store(demo_store))]
    rows = compact.shown_rows(llama)
    assert [r.first.short_label for r in rows] == [
        "base (unquantized)",
        "base (unquantized)",  # scored by hf too: NVFP4's recovery is computed against it
        "NVFP4 RTN",
        "NVFP4 AutoRound iters=0",
        "NVFP4 AutoRound iters=200",
        "W4A16 RTN",
        "W4A16 AutoRound iters=0",
        "W4A16 auto-round API iters=0",
        "W4A16 AutoRound iters=200",
        "W4A16 auto-round API iters=200",
        "W8A8 RTN",
    ]
    backends = [r.first.config.backend for r in rows]
    assert backends == ["vllm", "hf", "hf", "hf", "hf", "vllm", "vllm", "vllm", "vllm", "vllm", "vllm"]
    block = block_of(demo_store)
    assert "shows one row (vllm, vllm_server, hf first); its `vllm_server`, `hf` scores are in the full report" in block
    assert "Recovery and Δ vs RTN compare runs scored by the same backend." in block


def test_demo_sized_block_reads_in_a_minute(demo_store):
    block = block_of(demo_store)
    assert len(visible(block)) <= 60
    widths = [len(line) for line in block.splitlines() if line.startswith("|")]
    assert widths and max(widths) <= 200
    # upstream's per-config lm-eval tables, collapsed: one <details> per model
    assert block.count("<details>") == 2 and block.count("#### ") == 11 + 7
    # the base scored by vllm and by hf (NVFP4's recovery is against the latter): headings say which
    assert "#### TinyLlama-Arith (unquantized), vllm\n" in block and "#### TinyLlama-Arith (unquantized), hf\n" in block
    assert "#### TinyLlama-Arith-W4A16-G128-AutoRound (AutoRoundModifier, iters=200)\n|   Tasks   |" in block


def test_filters_that_agree_share_one_column_and_say_so(demo_store):
    block = block_of(demo_store)
    header = table_rows(block, "TinyLlama-Arith")[0]
    assert header[:4] == ["Config", "exact_match", "recovery", "Δ vs RTN"] and "strict-match" not in header
    assert "exact_match: strict-match and flexible-extract give identical values on every row" in block
    # three chartqa metrics that differ: each once, with its own recovery and Δ
    vlm_header = table_rows(block, "TinyVLM")[0]
    assert [h for h in vlm_header if h in CHARTQA] == list(CHARTQA)
    assert vlm_header[1:4] == ["relaxed_accuracy", "recovery", "Δ vs RTN"] and vlm_header.count("recovery") == 3


def test_filters_that_differ_get_a_column_each(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    path = next((results / "runs").glob("tiny_llama-nvfp4-rtn__*.json"))
    rec = json.loads(path.read_text())
    next(m for m in rec["table"] if m["filter"] == "flexible-extract")["value"] += 0.01
    path.write_text(json.dumps(rec))
    header = table_rows(block_of(results), "TinyLlama-Arith")[0]
    assert "strict-match" in header and "flexible-extract" in header and "exact_match" not in header


def test_backend_hardware_and_versions_are_a_caption_when_all_rows_agree(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    block = block_of(results)
    header = table_rows(block, "TinyLlama-Arith")[0]
    assert "Backend" not in header and "Hardware" not in header
    assert "Scored by `hf` (lm-eval `hf` 0.4.13) on CPU (avx512f/avx512_bf16/avx2); task gsm8k_arith v3" in block
    assert "quantized with llm-compressor 0.14.0.1, auto-round 0.15.1" in block


def test_no_run_ids_times_or_dates_and_regenerating_changes_no_byte(demo_store):
    block = block_of(demo_store)
    assert block_of(demo_store) == block
    for rec in Store(demo_store).records():
        assert rec.mlflow_run_id not in block and rec.finished_at[:10] not in block
    assert not re.search(r"\b\d+(\.\d+)? (s|min)\b", block)


def test_short_p_values(demo_store):
    llama = runs.sections(runs.from_store(demo_store))[0]
    rows = {r.first.short_label: r for r in compact.shown_rows(llama)}
    cell = tables.delta_cell(llama, rows["W4A16 AutoRound iters=200"], "exact_match,strict-match", ALPHA, short=True)
    assert cell == "+0.035 (p<0.001)"
    cell = tables.delta_cell(llama, rows["NVFP4 AutoRound iters=200"], "exact_match,strict-match", ALPHA, short=True)
    assert cell == "−0.025 (noise)"


def test_console_summary_shows_only_the_runs_a_sweep_touched(demo_store):
    loaded = runs.from_store(demo_store)
    keys = {
        r.record.key for r in loaded if r.record.scheme in (None, "w4a16") and r.record.method != "autoround_native"
    }
    keys = {k for k in keys if not k.startswith("vlm")}
    text = block_of(demo_store, keys=keys, details=False)
    labels = [row[0] for row in table_rows(text, "TinyLlama-Arith")[2:]]
    assert labels == ["base (unquantized)", "W4A16 RTN", "W4A16 AutoRound iters=0", "W4A16 AutoRound iters=200"]
    assert "<details>" not in text and "TinyVLM" not in text


# -- every number in the block is the stored record's ---------------------------------------------


def test_every_number_in_the_block_is_the_records(demo_store):
    loaded = runs.from_store(demo_store)
    assert check_block_against_records(block_of(demo_store), loaded) == 26 + 51 + 18  # cells + lm-eval tables


def test_a_number_that_is_not_the_records_is_caught(demo_store):
    loaded = runs.from_store(demo_store)
    block = block_of(demo_store).replace("0.6350 ± 0.0152", "0.6360 ± 0.0152", 1)
    with pytest.raises(AssertionError):
        check_block_against_records(block, loaded)


def test_the_sweeps_results_table_goes_to_mlflow_as_rows_not_parsed_markdown(demo_store):
    (llama, _) = runs.sections(runs.from_store(demo_store))
    cs = compact.compact(llama, tables.Thresholds(), ALPHA)
    rows = cs.row_dicts()
    headers, body = cs.cells()
    assert len(rows) == len(body) and rows[0]["Section"] == llama.title
    assert rows[2]["Config"] == "NVFP4 RTN" and rows[2]["exact_match"] == body[2][1]
    assert rows[2]["exact_match recovery"] == body[2][2] and rows[3]["exact_match Δ vs RTN"] == body[3][3]
