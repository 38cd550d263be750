"""The report on stored runs of the tiny model (tests/data/report/): table shape, recovery,
Δ vs RTN, the paired test, seeds, thresholds, published references, the notebook.

tests/data/report/results/ is what run.py stores (records + per-document scores) for the
demo sweep; see tests/data/report/README.md for how it was made.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from autoround_exp import lmeval_results
from autoround_exp.report import runs, tables
from autoround_exp.report.render import published, render
from tests.support import ROOT

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "report" / "results"
GOLDEN = DATA / "report" / "expected_report.md"
WRITE_GOLDEN = "python -m tests.test_report  # rewrites expected_report.md"
STRICT = "exact_match,strict-match"
ALPHA = 0.05


@pytest.fixture
def loaded() -> list[runs.Run]:
    return runs.from_store(FIXTURE)


def by_name(loaded) -> dict[str, runs.Run]:
    return {r.record.name: r for r in loaded}


def metric(run: runs.Run, col: str = STRICT) -> float:
    return tables.value(run, col)[0]


def test_one_section_with_rows_in_upstreams_order(loaded):
    (section,) = runs.sections(loaded)
    assert section.title.startswith("TinyLlama-Arith — gsm8k_arith, 5-shot, all 1000 documents")
    assert [row.first.label for row in section.rows] == [
        "TinyLlama-Arith (unquantized)",
        "TinyLlama-Arith-NVFP4-RTN (QuantizationModifier)",
        "TinyLlama-Arith-NVFP4-AutoRound (AutoRoundModifier, iters=0)",
        "TinyLlama-Arith-NVFP4-AutoRound (AutoRoundModifier, iters=200)",
        "TinyLlama-Arith-W4A16-G128-RTN (QuantizationModifier)",
        "TinyLlama-Arith-W4A16-G128-AutoRound (AutoRoundModifier, iters=0)",
        "TinyLlama-Arith-W4A16-G128-AutoRound (AutoRoundModifier, iters=200)",
    ]


def test_lm_eval_table_is_lm_evals_own_format(loaded):
    from lm_eval.utils import make_table

    run = by_name(loaded)["tiny_llama-w4a16-autoround-iters200"]
    table = tables.lm_eval_table(run)
    assert table == make_table(run.record.lm_eval).strip()
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header == ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]


def test_recovery_is_quantized_over_base_and_threshold_marks_it(loaded):
    (section,) = runs.sections(loaded)
    df, below = tables.comparison_frame(section, tables.Thresholds(0.95), ALPHA)
    base = metric(by_name(loaded)["tiny_llama-base"])
    for row, cells in zip(section.rows, df.to_dict("records"), strict=True):
        rec = row.first.record
        assert cells["strict-match"].startswith(f"{metric(row.first):.4f} ± ")
        if rec.method == "none":
            assert cells["strict-match recovery"] == ""
            continue
        recovery = metric(row.first) / base
        assert cells["strict-match recovery"].startswith(f"{100 * recovery:.1f} %")
        assert cells["strict-match recovery"].endswith("✗") == (recovery < 0.95)
        assert any(row.first.short_label in b for b in below) == (recovery < 0.95)
        assert cells["Backend"] == "hf" and cells["MLflow run"] == f"`{rec.mlflow_run_id}`"


def test_per_metric_threshold_overrides_the_default(loaded):
    (section,) = runs.sections(loaded)
    _, below = tables.comparison_frame(section, tables.Thresholds(0.5, {"exact_match/strict-match": 0.999}), ALPHA)
    assert below and all("strict-match" in b and "flexible" not in b for b in below)


def raw_scores(run: runs.Run, col: str = STRICT) -> np.ndarray:
    return np.array(run.samples["gsm8k_arith"][col])


def test_delta_vs_rtn_is_the_paired_mcnemar_test_on_the_same_documents(loaded):
    runs_ = by_name(loaded)
    rtn, ar = runs_["tiny_llama-w4a16-rtn"], runs_["tiny_llama-w4a16-autoround-iters200"]
    assert rtn.samples["gsm8k_arith"]["doc_hash"] == ar.samples["gsm8k_arith"]["doc_hash"]
    a, b = raw_scores(rtn), raw_scores(ar)
    gained, lost = int(((a == 0) & (b == 1)).sum()), int(((a == 1) & (b == 0)).sum())
    expected_p = binomtest(gained, gained + lost, 0.5).pvalue
    # the per-document scores add up to lm-eval's own numbers
    assert a.mean() == pytest.approx(metric(rtn)) and b.mean() == pytest.approx(metric(ar))

    (section,) = runs.sections(loaded)
    rows = {row.first.record.name: row for row in section.rows}
    t = tables.compare(rows["tiny_llama-w4a16-rtn"], rows["tiny_llama-w4a16-autoround-iters200"], STRICT, ALPHA)
    assert t.delta == pytest.approx(metric(ar) - metric(rtn)) and t.p == pytest.approx(expected_p)
    df, _ = tables.comparison_frame(section, tables.Thresholds(), ALPHA)
    cell = df.set_index("Config").loc["W4A16 AutoRound iters=200", "strict-match Δ vs RTN"]
    assert cell.startswith(tables.signed(t.delta)) and f"p={t.p:.2g}" in cell
    assert ("noise" in cell) == (expected_p >= ALPHA)


def test_paired_table_lists_each_comparison_the_tables_show(loaded):
    (section,) = runs.sections(loaded)
    kinds = [(kind, a.first.short_label, b.first.short_label) for kind, a, b in tables.comparisons(section)]
    assert ("vs RTN", "W4A16 RTN", "W4A16 AutoRound iters=200") in kinds
    assert ("iters vs iters", "W4A16 AutoRound iters=0", "W4A16 AutoRound iters=200") in kinds
    assert ("quantized vs base", "base (unquantized)", "NVFP4 RTN") in kinds
    assert len(kinds) == 6 + 4 + 2  # 6 vs base, 4 AutoRound vs RTN, 2 iters vs iters
    table = tables.paired_table(section, ALPHA)
    # header, rule, one row per comparison: strict-match and flexible-extract agree on every document here
    assert table.count("\n") == 2 + len(kinds) - 1
    assert table.count("exact_match (strict-match = flexible-extract)") == len(kinds)


def test_paired_rows_split_where_metrics_disagree(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    path = next(
        (results / "samples").glob(f"{by_name(runs.from_store(FIXTURE))['tiny_llama-w4a16-rtn'].record.key}.json")
    )
    samples = json.loads(path.read_text())
    flexible = samples["gsm8k_arith"]["exact_match,flexible-extract"]
    samples["gsm8k_arith"]["exact_match,flexible-extract"] = [1.0 - x for x in flexible[:50]] + flexible[50:]
    path.write_text(json.dumps(samples))
    (section,) = runs.sections(runs.from_store(results))
    table = tables.paired_table(section, ALPHA)
    w4a16_rtn = [line for line in table.splitlines() if line.startswith("| W4A16 RTN vs base")]
    assert [("strict-match" in line, "flexible-extract" in line) for line in w4a16_rtn] == [
        (True, False),
        (False, True),
    ]


def test_auto_rounds_own_api_sits_beside_the_modifier_with_the_paired_test(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    for path in (results / "runs").glob("tiny_llama-w4a16-autoround-iters*__*.json"):
        rec = json.loads(path.read_text())
        key = rec["key"]
        rec["method"], rec["key"] = "autoround_native", f"native{rec['iters']}"
        rec["name"] = f"tiny_llama-w4a16-autoround_native-iters{rec['iters']}"
        rec["checkpoint_name"] = "TinyLlama-Arith-W4A16-G128-AutoRound-native"
        (results / "runs" / f"{rec['name']}__{rec['key']}.json").write_text(json.dumps(rec))
        samples = results / "samples" / f"{key}.json"
        if samples.exists():
            shutil.copy(samples, results / "samples" / f"{rec['key']}.json")
    (section,) = runs.sections(runs.from_store(results))
    labels = [row.first.label for row in section.rows]
    assert labels[-2:] == [
        "TinyLlama-Arith-W4A16-G128-AutoRound-native (auto-round's AutoRound API, iters=0)",
        "TinyLlama-Arith-W4A16-G128-AutoRound-native (auto-round's AutoRound API, iters=200)",
    ]
    kinds = {(kind, a.first.short_label, b.first.short_label) for kind, a, b in tables.comparisons(section)}
    for iters in (0, 200):
        modifier, native = f"W4A16 AutoRound iters={iters}", f"W4A16 auto-round API iters={iters}"
        assert ("modifier vs auto-round API", modifier, native) in kinds
    assert ("iters vs iters", "W4A16 auto-round API iters=0", "W4A16 auto-round API iters=200") in kinds
    assert "modifier vs auto-round API" in tables.paired_table(section, ALPHA)


def test_a_recipe_that_quantizes_the_vision_tower_is_its_own_row_against_upstreams(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    path = next((results / "runs").glob("tiny_llama-w4a16-rtn__*.json"))
    rec = json.loads(path.read_text())
    key = rec["key"]
    rec["vision_quantized"], rec["key"] = True, "vision"
    rec["name"] += "-vision"
    rec["checkpoint_name"] += "-VisionQuantized"
    for m in rec["table"]:
        m["value"] -= 0.1
    (results / "runs" / f"{rec['name']}__{rec['key']}.json").write_text(json.dumps(rec))
    shutil.copy(results / "samples" / f"{key}.json", results / "samples" / "vision.json")
    (section,) = runs.sections(runs.from_store(results))
    labels = [row.first.short_label for row in section.rows]
    assert labels.index("W4A16 RTN + vision tower") == labels.index("W4A16 RTN") + 1  # not merged into it
    kinds = {(kind, a.first.short_label, b.first.short_label) for kind, a, b in tables.comparisons(section)}
    assert ("vision tower quantized vs not", "W4A16 RTN", "W4A16 RTN + vision tower") in kinds
    assert "W4A16 RTN + vision tower vs W4A16 RTN" in tables.paired_table(section, ALPHA)
    df, _ = tables.comparison_frame(section, tables.Thresholds(), ALPHA)
    vision = section.rows[labels.index("W4A16 RTN + vision tower")].first
    assert df.set_index("Config").loc["W4A16 RTN + vision tower", "strict-match"].startswith(f"{metric(vision):.4f}")


def test_seeds_aggregate_to_mean_and_std(tmp_path, loaded):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    rec = json.loads(next((results / "runs").glob("tiny_llama-w4a16-autoround-iters200__*.json")).read_text())
    seeds = []
    for seed, delta in ((0, 0.0), (1, 0.01), (2, -0.02)):
        r = copy.deepcopy(rec)
        r["seed"], r["key"] = seed, f"seed{seed}"
        for m in r["table"]:
            m["value"] += delta
        seeds.append(r["table"][0]["value"])
        (results / "runs" / f"{r['name']}__{r['key']}.json").write_text(json.dumps(r))
    (results / "runs" / f"{rec['name']}__{rec['key']}.json").unlink()
    (section,) = runs.sections(runs.from_store(results))
    df, _ = tables.comparison_frame(section, tables.Thresholds(), ALPHA)
    cell = df.set_index("Config").loc["W4A16 AutoRound iters=200", "flexible-extract"]
    assert cell == f"{np.mean(seeds):.4f} ± {np.std(seeds, ddof=1):.4f} (mean ± std, 3 seeds)"


def seeded(run: runs.Run, seed: int, flip: list[int]) -> runs.Run:
    """A copy of ``run`` as seed ``seed``, its 0/1 scores flipped on the documents at ``flip``."""
    rec = run.record.model_copy(deep=True)
    rec.seed = seed
    samples = copy.deepcopy(run.samples)
    col = samples["gsm8k_arith"][STRICT]
    for i in flip:
        col[i] = 1.0 - col[i]
    return runs.Run(rec, samples)


def test_the_paired_test_uses_every_seed_with_the_document_as_its_unit(loaded):
    runs_ = by_name(loaded)
    rtn, ar = runs_["tiny_llama-w4a16-rtn"], runs_["tiny_llama-w4a16-autoround-iters200"]
    a = raw_scores(rtn)
    lost = [i for i in range(len(a)) if raw_scores(ar)[i] == 1][:40]  # seeds 1 and 2 lose 40 documents
    three = runs.Row([seeded(ar, 0, []), seeded(ar, 1, lost), seeded(ar, 2, lost)])
    t = tables.compare(runs.Row([rtn]), three, STRICT, ALPHA)
    b = np.mean([raw_scores(r) for r in three.runs], axis=0)  # each document's mean over the 3 seeds
    assert t.n == len(a) == 1000  # documents, not documents x seeds
    assert t.delta == pytest.approx(b.mean() - a.mean())
    assert t.se == pytest.approx((b - a).std(ddof=1) / np.sqrt(len(a)))
    assert t.test == "paired z on per-document means over 1 vs 3 seeds"
    first_seed_only = tables.compare(runs.Row([rtn]), runs.Row([three.runs[0]]), STRICT, ALPHA)
    assert first_seed_only.delta != pytest.approx(t.delta)  # the other seeds count
    # seeds paired with seeds: both rows of three
    assert tables.compare(three, three, STRICT, ALPHA).delta == 0


def test_one_line_per_scheme_names_the_best_method_and_whether_the_next_is_told_apart(loaded):
    (section,) = runs.sections(loaded)
    lines = tables.best_method_lines(section, section.rows, ALPHA)
    rows = {row.first.record.name: row for row in section.rows}
    # W4A16: AutoRound iters=200 0.710 over RTN 0.675, p=0.00037 (McNemar)
    t = tables.compare(rows["tiny_llama-w4a16-rtn"], rows["tiny_llama-w4a16-autoround-iters200"], STRICT, ALPHA)
    assert (
        t.p < ALPHA
        and (
            f"Best method for W4A16 on strict-match: W4A16 AutoRound iters=200 (0.7100); next W4A16 RTN (0.6750): "
            f"distinguishable (Δ {tables.signed(t.delta)}, p={t.p:.2g}, McNemar exact)."
        )
        in lines
    )
    # NVFP4: RTN 0.635 over AutoRound at its best iters (0, 0.616): within noise
    (nvfp4,) = [line for line in lines if line.startswith("Best method for NVFP4")]
    assert "NVFP4 RTN (0.6350); next NVFP4 AutoRound iters=0 (0.6160): not distinguishable" in nvfp4
    assert len(lines) == 2
    # one method alone in a scheme: nothing to name
    only_rtn = [r for r in section.rows if r.first.record.method in ("none", "rtn")]
    assert tables.best_method_lines(section, only_rtn, ALPHA) == []


def test_latest_run_of_a_config_replaces_an_older_one(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    path = next((results / "runs").glob("tiny_llama-base__*.json"))
    old = json.loads(path.read_text())
    old["key"], old["finished_at"], old["mlflow_run_id"] = "older", "2000-01-01T00:00:00", "old-run"
    (results / "runs" / "tiny_llama-base__older.json").write_text(json.dumps(old))
    (section,) = runs.sections(runs.from_store(results))
    assert section.rows[0].first.record.mlflow_run_id != "old-run" and len(section.rows) == 7


def as_llama_gsm8k(tmp_path: Path, limit: int | None = None) -> list[runs.Run]:
    """The fixture's runs relabelled as Llama-3.1-8B-Instruct gsm8k runs (with ``limit``)."""
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    for path in (results / "runs").glob("*.json"):
        rec = json.loads(path.read_text())
        rec["model"]["path"] = "meta-llama/Llama-3.1-8B-Instruct"
        rec["model"]["display_name"] = "Meta-Llama-3.1-8B-Instruct"
        rec["eval"]["task"] = "gsm8k"
        rec["config"]["eval"]["limit"] = limit
        for m in rec["table"]:
            m["task"] = "gsm8k"
        path.write_text(json.dumps(rec))
    return runs.from_store(results)


def test_published_numbers_are_shown_beside_ours_and_labelled(tmp_path):
    """Our runs, relabelled as the real model's full gsm8k runs, meet upstream's numbers."""
    loaded = as_llama_gsm8k(tmp_path)
    (section,) = runs.sections(loaded)
    pub = tables.published_table(section, published())
    lines = [line for line in pub.splitlines() if line.startswith("| NVFP4 AutoRound iters=200")]
    ours = metric(next(r for r in loaded if r.record.name == "tiny_llama-nvfp4-autoround-iters200"))
    ours_se = tables.value(next(r for r in loaded if r.record.name == "tiny_llama-nvfp4-autoround-iters200"), STRICT)[1]
    pub_se = np.sqrt(0.6945 * (1 - 0.6945) / 1318)
    gap = (ours - 0.6945) / np.sqrt(ours_se**2 + pub_se**2)
    strict_line = next(line for line in lines if "strict-match" in line)
    assert "0.6945 ± 0.0127" in strict_line and f"({gap:+.1f} σ)".replace("-", "−") in strict_line
    # W4A16 has no published number: never shown as if it had one
    assert "W4A16" not in pub
    report = render(loaded, tables.Thresholds(), ALPHA, None, tmp_path / "results", "test")
    assert "Ours vs **published** (upstream" in report.markdown


def test_limited_runs_never_meet_the_published_full_test_set_numbers(tmp_path):
    (section,) = runs.sections(as_llama_gsm8k(tmp_path, limit=200))
    assert tables.published_table(section, published()) is None
    # nor does another model's full run
    (tiny,) = runs.sections(runs.from_store(FIXTURE))
    assert tables.published_table(tiny, published()) is None


def test_rendered_report_matches_the_golden_file(loaded, tmp_path):
    report = render(loaded, tables.Thresholds(), ALPHA, tmp_path / "plots", tmp_path, "`results/`")
    # Never rewritten by a test run: a change of the report is reviewed, then written by hand
    # with `python -m tests.test_report` (see tests/data/report/README.md).
    assert report.markdown == GOLDEN.read_text(), f"report changed; review it, then {WRITE_GOLDEN}"
    (png,) = report.plots
    again = render(loaded, tables.Thresholds(), ALPHA, tmp_path / "plots", tmp_path, "`results/`")
    assert again.markdown == report.markdown and png.read_bytes() == again.plots[0].read_bytes()


def test_per_document_scores_from_lm_evals_samples_log():
    (path,) = DATA.glob("samples_gsm8k_arith_*.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    scores = lmeval_results.per_sample([str(path)])["gsm8k_arith"]
    assert scores["doc_id"] == list(range(10))
    for s in lines:
        assert scores[f"exact_match,{s['filter']}"][s["doc_id"]] == s["exact_match"]
        assert scores["doc_hash"][s["doc_id"]] == s["doc_hash"][:16]


def test_readme_without_markers_is_refused_with_what_to_add(tmp_path):
    from autoround_exp.config import ReportConfig
    from autoround_exp.report.generate import generate

    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    cfg = ReportConfig(readme=str(readme))
    assert generate(cfg, FIXTURE.parent / "does-not-matter", check=True) == 2
    assert readme.read_text() == "# no markers\n"


def test_notebook_is_stripped_and_runs_on_stored_results(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "report.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    os.environ["AUTOROUND_EXP_RESULTS"] = str(FIXTURE)
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        del os.environ["AUTOROUND_EXP_RESULTS"]
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", "")) for c in code for o in c.outputs
    )
    assert "7 runs from" in text and "W4A16 AutoRound iters=200" in text
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = render(
            runs.from_store(FIXTURE), tables.Thresholds(), ALPHA, Path(tmp) / "plots", Path(tmp), "`results/`"
        )
    GOLDEN.write_text(report.markdown)
    print(f"wrote {GOLDEN}; review `git diff {GOLDEN}`")


def test_the_full_reports_rows_say_their_backend_next_to_their_config(tmp_path):
    """A config scored by several backends has a row each: the backend is the second column,
    not the twelfth, so "base (unquantized)" three times reads as three backends at a glance."""
    from tests.support import make_demo_store, table_rows

    results = make_demo_store(tmp_path)
    loaded = runs.from_store(results)
    report = render(loaded, tables.Thresholds(), 0.05, results / "plots", results, "test", write_plots=False)
    rows = table_rows(report.markdown, "TinyLlama-Arith")
    assert rows[0][:2] == ["Config", "Backend"]
    bases = [r[1] for r in rows[2:] if r[0] == "base (unquantized)"]
    assert sorted(bases) == ["hf", "vllm", "vllm_server"]
