"""What the README block shows is chosen, not accumulated (issue 35): a user's quick sweeps
with eval.limit go to results/report.md, MLflow and the sweep's end table, while the README
keeps the demo's full-set sections, first, within its page budget."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from autoround_exp.config import ConfigError, ReportConfig
from autoround_exp.config_checks import check_report
from autoround_exp.report import compact, readme, runs, tables
from autoround_exp.report.generate import generate
from tests.support import ALPHA, README_MAX_LINES, committed_readme, make_demo_store, variant, write_run

QUICK_LIMITS = (50, 37, 200)  # the three quick sweeps of the report


def add_quick_runs(results: Path, limits=QUICK_LIMITS) -> None:
    """Limited runs of the tiny Llama (base and W4A16 RTN), as `eval.limit=N` sweeps leave them."""
    for limit in limits:
        for name in ("tiny_llama-base", "tiny_llama-w4a16-rtn"):
            src = json.loads(next((results / "runs").glob(f"{name}__*.json")).read_text())
            samples = json.loads((results / "samples" / f"{src['key']}.json").read_text())
            rec, smp = variant(src, samples, f"quick-{name}-{limit}", config__eval__limit=limit)
            write_run(results, rec, smp)


def readme_copy(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    path.write_text(committed_readme())
    return path


def run_report(results: Path, readme_path: Path, capsys, **cfg) -> str:
    assert generate(ReportConfig(readme=str(readme_path), **cfg), results) == 0
    return capsys.readouterr().out


def titles(text: str) -> list[str]:
    return re.findall(r"^### (.+)$", text, flags=re.M)


def test_quick_limited_sweeps_after_the_demo_leave_the_readme_as_it_was(tmp_path, capsys):
    results = make_demo_store(tmp_path)
    path = readme_copy(tmp_path)
    run_report(results, path, capsys)
    after_demo = path.read_text()
    add_quick_runs(results)
    out = run_report(results, path, capsys)
    assert path.read_text() == after_demo
    assert len(after_demo.splitlines()) <= README_MAX_LINES
    # every quick run is in the full report, and the report says in one line where they went
    report = (results / "report.md").read_text()
    for limit in QUICK_LIMITS:
        assert f"first {limit} documents" in report
    (line,) = [x for x in out.splitlines() if "README shows the headline sections" in x]
    assert "3 with eval.limit (report.readme_scope=full)" in line and "report.md" in line


def test_readme_scope_all_puts_full_sections_first_then_more_documents_first(tmp_path, capsys):
    results = make_demo_store(tmp_path)
    add_quick_runs(results)
    path = readme_copy(tmp_path)
    run_report(results, path, capsys, readme_scope="all", readme_max_lines=10_000)
    shown = titles(path.read_text().split(readme.BEGIN, 1)[1])
    scopes = [re.search(r"(all \d+|first \d+) documents", t)[1] for t in shown]
    full = [s for s in scopes if s.startswith("all")]
    assert scopes[: len(full)] == full and len(full) == 2
    assert scopes[len(full) :] == ["first 200", "first 50", "first 37"]


def test_sections_order_full_first_then_model_task_then_documents():
    key = runs.SectionKey
    keys = [
        key("TinyLlama", "/p", "gsm8k", 5, 37, True, False),
        key("TinyVLM", "/v", "chartqa", 0, None, False, True),
        key("TinyLlama", "/p", "gsm8k", 5, 200, True, False),
        key("TinyLlama", "/p", "gsm8k", 5, None, True, False),
    ]
    ordered = sorted(keys, key=runs.section_order)
    assert [(k.model, k.limit) for k in ordered] == [
        ("TinyLlama", None),
        ("TinyVLM", None),
        ("TinyLlama", 200),
        ("TinyLlama", 37),
    ]


def test_a_block_over_its_page_budget_keeps_the_headline_and_says_so(tmp_path, capsys):
    results = make_demo_store(tmp_path)
    path = readme_copy(tmp_path)
    out = run_report(results, path, capsys, readme_max_lines=60)
    block = path.read_text().split(readme.BEGIN, 1)[1].split(readme.END, 1)[0]
    first, second = (s.title for s in runs.sections(runs.from_store(results)))
    assert titles(block) == [first]  # the first section always shows, even past the budget
    (line,) = [x for x in out.splitlines() if "README shows the headline sections" in x]
    assert "1 past its 60-line budget (report.readme_max_lines)" in line
    assert second in (results / "report.md").read_text() and second not in block


def test_a_store_of_limited_runs_only_says_where_they_are(tmp_path):
    results = make_demo_store(tmp_path)
    full = list((results / "runs").glob("*.json"))
    add_quick_runs(results)
    for path in full:
        path.unlink()
    secs = runs.sections(runs.from_store(results))
    block = compact.readme_block(secs, tables.Thresholds(), ALPHA, None, tmp_path, "`results/`")
    assert compact.NO_FULL_RUNS in block.text and "###" not in block.text
    assert len(block.out_of_scope) == len(QUICK_LIMITS) and not block.over_budget
    everything = compact.readme_block(secs, tables.Thresholds(), ALPHA, None, tmp_path, "`results/`", scope="all")
    assert len(titles(everything.text)) == len(QUICK_LIMITS)


def test_readme_settings_are_checked_at_the_door():
    with pytest.raises(ConfigError, match="report.readme_scope=some is unknown; choose one of full, all"):
        check_report(ReportConfig(readme_scope="some"))
    with pytest.raises(ConfigError, match="report.readme_max_lines=5"):
        check_report(ReportConfig(readme_max_lines=5))


def test_recovery_is_computed_against_a_row_the_table_shows(tmp_path):
    """The demo scores NVFP4 in hf and the rest in vLLM: the hf base is shown beside the vLLM
    one, so NVFP4's recovery can be recomputed from the rows on the page."""
    results = make_demo_store(tmp_path)
    (llama, _) = runs.sections(runs.from_store(results))
    rows = compact.shown_rows(llama)
    shown = {(r.first.short_label, r.first.config.backend) for r in rows}
    assert {("base (unquantized)", "vllm"), ("base (unquantized)", "hf")} <= shown
    for row in rows:
        base = tables.baseline_of(llama, row)
        assert any(base is r for r in rows), row.first.short_label
