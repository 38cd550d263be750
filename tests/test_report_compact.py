"""The short results block (README, end-of-sweep console): one table per model x eval
setting in upstream's order, one row per config, numbers equal to the stored records,
nothing that changes between renderings, and small enough to read in a minute."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest

from autoround_exp.report import compact, readme, runs, tables
from autoround_exp.store import Store
from tests.conftest import ROOT

FIXTURE = Path(__file__).parent / "data" / "report" / "results"
ALPHA = 0.05
CHARTQA = ("relaxed_accuracy", "anywhere_accuracy", "exact_match")


def _write(results: Path, rec: dict, samples: dict | None) -> None:
    (results / "runs" / f"{rec['name']}__{rec['key']}.json").write_text(json.dumps(rec))
    if samples is not None:
        (results / "samples" / f"{rec['key']}.json").write_text(json.dumps(samples))


def _variant(rec: dict, samples: dict | None, key: str, **changes) -> tuple[dict, dict | None]:
    r = copy.deepcopy(rec)
    r["key"] = key
    for path, value in changes.items():
        node = r
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return r, copy.deepcopy(samples)


def _chartqa(rec: dict, samples: dict | None, key: str) -> tuple[dict, dict]:
    """A run of the fixture relabelled as a tiny VLM's chartqa run with chartqa's three metrics."""
    r = copy.deepcopy(rec)
    r["key"] = key
    r["name"] = "vlm-" + rec["name"]
    r["model"] = {"name": "tiny_vlm", "path": "/x/tiny_vlm", "display_name": "TinyVLM"}
    r["checkpoint_name"] = rec["checkpoint_name"].replace("TinyLlama-Arith", "TinyVLM")
    r["eval"]["task"] = "chartqa_charts"
    r["eval"]["task_versions"] = {"chartqa_charts": 0.0}
    r["config"]["eval"] |= {"num_fewshot": 0, "add_bos_token": False, "apply_chat_template": True}
    strict = next(m for m in rec["table"] if m["filter"] == "strict-match")
    src = samples["gsm8k_arith"]
    scores = {}
    r["table"], results = [], {"name": "chartqa_charts", "alias": "chartqa_charts"}
    for i, metric in enumerate(CHARTQA):
        # three metrics that differ: each drops a different number of right answers
        col = src["exact_match,strict-match"][: 150 - 10 * i] + [0.0] * (10 * i)
        value = sum(col[:150]) / 150
        r["table"].append(strict | {"task": "chartqa_charts", "metric": metric, "filter": "none", "value": value})
        r["table"][-1]["n_shot"], r["table"][-1]["n_samples"] = 0, 150
        results[f"{metric},none"], results[f"{metric}_stderr,none"] = value, strict["stderr"]
        scores[f"{metric},none"] = col[:150]
    r["lm_eval"] = {
        "results": {"chartqa_charts": results},
        "versions": {"chartqa_charts": 0.0},
        "n-shot": {"chartqa_charts": 0},
        "higher_is_better": {"chartqa_charts": dict.fromkeys(CHARTQA, True)},
        "n-samples": {"chartqa_charts": {"original": 150, "effective": 150}},
    }
    r["metrics"] = {}
    return r, {"chartqa_charts": {"doc_id": src["doc_id"][:150], "doc_hash": src["doc_hash"][:150], **scores}}


@pytest.fixture
def demo_store(tmp_path) -> Path:
    return make_demo_store(tmp_path)


def make_demo_store(tmp_path: Path) -> Path:
    """A store shaped like `make demo`'s: the tiny Llama scored by hf, vllm and vllm_server
    (W4A16 and W8A8 in vLLM, NVFP4 in hf), both AutoRound paths, and a VLM on chartqa."""
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    # the stored JSON, as run.py wrote it (the first record layout: read through its migration)
    by = {}
    for path in sorted((results / "runs").glob("*.json")):
        rec = json.loads(path.read_text())
        samples = results / "samples" / f"{rec['key']}.json"
        by[rec["name"]] = (rec, json.loads(samples.read_text()) if samples.is_file() else None)
    n = 0

    def add(rec, samples):
        _write(results, rec, samples)

    for name, (rec, smp) in by.items():
        if "nvfp4" in name:
            continue
        n += 1
        add(*_variant(rec, smp, f"vllm{n}", eval__backend="vllm", eval__lm_eval_model="vllm"))
        if name == "tiny_llama-base":
            add(*_variant(rec, smp, "server0", eval__backend="vllm_server", eval__lm_eval_model="local-completions"))
    for iters in (0, 200):
        rec, smp = by[f"tiny_llama-w4a16-autoround-iters{iters}"]
        native, smp = _variant(
            rec, smp, f"native{iters}", eval__backend="vllm", eval__lm_eval_model="vllm", method="autoround_native"
        )
        native["name"] = f"tiny_llama-w4a16-autoround_native-iters{iters}"
        native["checkpoint_name"] = "TinyLlama-Arith-W4A16-G128-AutoRound-native"
        add(native, smp)
    rtn, rtn_smp = by["tiny_llama-w4a16-rtn"]
    for backend in ("vllm", "vllm_server"):
        model = "vllm" if backend == "vllm" else "local-completions"
        w8, smp = _variant(
            rtn, rtn_smp, f"w8a8{backend}", eval__backend=backend, eval__lm_eval_model=model, scheme="w8a8"
        )
        w8["name"], w8["config"]["scheme"]["preset"] = "tiny_llama-w8a8-rtn", "W8A8"
        w8["checkpoint_name"] = "TinyLlama-Arith-W8A8-RTN"
        add(w8, smp)
    for i, (rec, smp) in enumerate(by.values()):
        add(*_chartqa(rec, smp, f"vlm{i}"))
    return results


def block_of(results: Path, **kwargs) -> str:
    loaded = runs.from_store(results)
    text, _ = compact.render_block(
        runs.sections(loaded), tables.Thresholds(), ALPHA, results / "plots", results.parent, "`results/`", **kwargs
    )
    return text


def visible(block: str) -> list[str]:
    return re.sub(r"<details>.*?</details>", "", block, flags=re.S).strip().splitlines()


def table_rows(block: str, section_prefix: str) -> list[list[str]]:
    """The cells of the compact table under the section whose title starts with the prefix."""
    after = block.split(f"### {section_prefix}", 1)[1].split("\n### ", 1)[0]
    # the section's first table: the plot's image line may come before it
    part = next(p for p in after.split("\n\n") if p.startswith("|"))
    lines = [line for line in part.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_one_row_per_config_in_upstreams_order_preferring_vllm(demo_store):
    (llama, vlm) = [s for s in runs.sections(runs.from_store(demo_store))]
    rows = compact.shown_rows(llama)
    assert [r.first.short_label for r in rows] == [
        "base (unquantized)",
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
    assert backends == ["vllm", "hf", "hf", "hf", "vllm", "vllm", "vllm", "vllm", "vllm", "vllm"]
    block = block_of(demo_store)
    assert "shows one row (vllm, vllm_server, hf first); its `vllm_server`, `hf` scores are in the full report" in block
    assert "Recovery and Δ vs RTN compare runs scored by the same backend." in block


def test_demo_sized_block_reads_in_a_minute(demo_store):
    block = block_of(demo_store)
    assert len(visible(block)) <= 60
    widths = [len(line) for line in block.splitlines() if line.startswith("|")]
    assert widths and max(widths) <= 200
    # upstream's per-config lm-eval tables, collapsed: one <details> per model
    assert block.count("<details>") == 2 and block.count("#### ") == 10 + 7
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

NUMBER = re.compile(r"([+−-]?\d+\.\d+)")


def check_block_against_records(block: str, loaded: list[runs.Run]) -> int:
    """Assert each value ± stderr, recovery and Δ in the block's tables against the records;
    the number of cells checked."""
    checked = 0
    for section in runs.sections(loaded):
        title = f"### {section.title}"
        if title not in block:
            continue
        cells = table_rows(block, section.title)
        header, body = cells[0], cells[2:]
        by_label = {r.first.short_label: r for r in compact.shown_rows(section)}
        groups = {tables.column_name(c): c for c in tables.columns(section)}
        groups |= {c.split(",", 1)[0]: c for c in tables.columns(section)}
        for row_cells in body:
            row = by_label[row_cells[0]]
            rec = row.first.record
            col = None
            for name, cell in zip(header, row_cells, strict=True):
                if name in groups:
                    col = groups[name]  # recovery and Δ vs RTN that follow belong to this metric
                if not cell or name == "Config" or name in compact.FACTS:
                    continue
                stored = rec.metric(col)
                nums = [float(x.replace("−", "-")) for x in NUMBER.findall(cell)]
                if name == "recovery":
                    base_value = tables.baseline_of(section, row).first.record.metric(col).value
                    assert nums[0] == pytest.approx(100 * stored.value / base_value, abs=0.051), (name, cell)
                elif name == "Δ vs RTN":
                    rtn_value = tables.rtn_of(section, row).first.record.metric(col).value
                    assert nums[0] == pytest.approx(stored.value - rtn_value, abs=0.00051), (name, cell)
                else:
                    assert nums[:2] == pytest.approx([stored.value, stored.stderr], abs=0.000051), (name, cell)
                checked += 1
    # upstream-shaped tables: lm-eval's own rendering of each stored record
    for heading, table in re.findall(r"^#### (.+)\n((?:\|.*\n?)+)", block, flags=re.M):
        run = next(r for r in loaded if heading.startswith(r.label) and tables.lm_eval_table(r) == table.strip())
        assert run is not None
        checked += 1
    return checked


def test_every_number_in_the_block_is_the_records(demo_store):
    loaded = runs.from_store(demo_store)
    assert check_block_against_records(block_of(demo_store), loaded) == 25 + 51 + 17  # cells + lm-eval tables


def test_a_number_that_is_not_the_records_is_caught(demo_store):
    loaded = runs.from_store(demo_store)
    block = block_of(demo_store).replace("0.6350 ± 0.0152", "0.6360 ± 0.0152", 1)
    with pytest.raises(AssertionError):
        check_block_against_records(block, loaded)


def test_the_readme_block_is_this_clones_stored_runs():
    """After `make demo`, the README's block holds exactly the stored records' numbers.
    A clone that has not run the demo has no stored runs to compare with."""
    loaded = runs.from_store(ROOT / "results")
    text = (ROOT / "README.md").read_text()
    block = text.split(readme.BEGIN, 1)[1].split(readme.END, 1)[0]
    shown = {s.title for s in runs.sections(loaded)}
    titles = re.findall(r"^### (.+)$", block, flags=re.M)
    if not loaded or not set(titles) <= shown:
        pytest.skip("results/runs/ lacks the README's runs: run `make demo` in this clone first")
    assert check_block_against_records(block, loaded) > 0
