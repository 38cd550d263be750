"""Reading lm-eval's results JSON into metric rows and MLflow names."""

from __future__ import annotations

import json
from pathlib import Path

from autoround_exp import lmeval_results

GOLDEN = Path(__file__).parent / "data" / "lm_eval_results_tiny_gsm8k_arith.json"


def test_golden_results_json_from_a_real_run():
    """Written by lm-eval 0.4.13 for the tiny model (base, limit 40) on gsm8k_arith."""
    results = lmeval_results.load(GOLDEN)
    rows = {r.filter: r for r in lmeval_results.metrics(results)}
    assert set(rows) == {"strict-match", "flexible-extract"}
    raw = results["results"]["gsm8k_arith"]
    for flt, row in rows.items():
        assert row.value == raw[f"exact_match,{flt}"] and row.stderr == raw[f"exact_match_stderr,{flt}"]
        assert (row.task, row.metric, row.version, row.n_shot) == ("gsm8k_arith", "exact_match", "3.0", 5)
        assert row.n_samples == 40


def test_mlflow_names_have_no_comma():
    rows = lmeval_results.metrics(lmeval_results.load(GOLDEN))
    names = lmeval_results.mlflow_metrics(rows)
    assert "gsm8k_arith/exact_match/strict-match" in names
    assert "gsm8k_arith/exact_match/flexible-extract/stderr" in names
    assert not any("," in n for n in names)


def test_missing_stderr_is_none_not_a_number():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.25, "acc_stderr,none": "N/A"}}}
    (row,) = lmeval_results.metrics(results)
    assert row.value == 0.25 and row.stderr is None
    assert lmeval_results.mlflow_metrics([row]) == {"t/acc/none": 0.25}


def test_lm_eval_table_is_lm_evals_own():
    table = lmeval_results.table(json.loads(GOLDEN.read_text()))
    assert "|   Tasks   |Version|     Filter     |n-shot|  Metric   |" in table
    assert "strict-match" in table and "flexible-extract" in table
